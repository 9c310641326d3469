"""One generic battery for every method, like upstream peft's ``testing_common.py``: each check runs over every
row of (model family, config) in ``ROWS``. Method-specific behaviour lives in the per-method test files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from models import build, enable_checkpointing, inputs, output
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

from peft_ctrl import SealConfig, StateCtrlConfig, SubLoRAConfig
from peft_ctrl.seal.keys import KEY_ENV

KEY = "battery-key-0123456789abcdef"

# row id -> (model family, config factory taking init_weights)
ROWS: dict[str, tuple[str, Callable[..., object]]] = {
    "state-ctrl-llama-mlp": ("llama", lambda **kw: StateCtrlConfig(r=4, blocks="mlp", **kw)),
    "state-ctrl-llama-both": ("llama", lambda **kw: StateCtrlConfig(r=4, blocks="both", **kw)),
    "state-ctrl-gpt2-attn": ("gpt2", lambda **kw: StateCtrlConfig(r=4, blocks="attn", **kw)),
    "state-ctrl-bert": ("bert", lambda **kw: StateCtrlConfig(r=4, **kw)),
    "control-lora-llama": ("llama", lambda **kw: StateCtrlConfig.control_lora(r=4, lora_r=2, **kw)),
    "control-lora-bert": (
        "bert",
        lambda **kw: StateCtrlConfig(r=4, lora_target_modules=["query", "key", "value"], lora_r=2, **kw),
    ),
    "sublora-llama": ("llama", lambda **kw: SubLoRAConfig(r=4, target_r=2, target_modules=["q_proj", "v_proj"], **kw)),
    "sublora-bert": ("bert", lambda **kw: SubLoRAConfig(r=4, target_r=2, target_modules=["query", "value"], **kw)),
    "seal-llama": ("llama", lambda **kw: SealConfig(r=4, target_modules=["q_proj", "v_proj"], **kw)),
    "seal-bert": ("bert", lambda **kw: SealConfig(r=4, target_modules=["query", "value"], **kw)),
}
CAUSAL_ROWS = [row for row, (family, _) in ROWS.items() if family in ("llama", "gpt2")]
MERGEABLE = [row for row in ROWS if not row.startswith(("state-ctrl", "control-lora"))]


@pytest.fixture(autouse=True)
def seal_key(monkeypatch):
    """SEAL derives passports from the owner's key; every load reads it from the environment."""
    monkeypatch.setenv(KEY_ENV, KEY)


def make(row: str, init_weights: bool = False, seed: int = 0, adapter_seed: int = 1) -> tuple[nn.Module, dict]:
    family, config = ROWS[row]
    base = build(family, seed)
    torch.manual_seed(adapter_seed)
    return get_peft_model(base, config(init_weights=init_weights)), inputs(family)


def base_output(row: str, batch: dict, seed: int = 0) -> torch.Tensor:
    return output(build(ROWS[row][0], seed), batch)


def tuner_layers(model: nn.Module) -> int:
    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())


def adapter_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.mark.parametrize("row", ROWS)
def test_zero_init_is_the_base_model(row):
    model, batch = make(row, init_weights=True)
    torch.testing.assert_close(output(model, batch), base_output(row, batch))


@pytest.mark.parametrize("row", ROWS)
def test_non_zero_init_changes_the_output(row):
    model, batch = make(row, init_weights=False)
    assert not torch.allclose(output(model, batch), base_output(row, batch), atol=1e-6)


@pytest.mark.parametrize("row", ROWS)
def test_save_and_load_round_trip(row, tmp_path):
    model, batch = make(row)
    expected = output(model, batch)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert KEY not in json.dumps(config)
    loaded = PeftModel.from_pretrained(build(ROWS[row][0]), tmp_path)
    torch.testing.assert_close(output(loaded, batch), expected)


@pytest.mark.parametrize("row", ROWS)
def test_disable_adapter_gives_the_base_model(row):
    model, batch = make(row)
    with model.disable_adapter():
        torch.testing.assert_close(output(model, batch), base_output(row, batch))
    assert not torch.allclose(output(model, batch), base_output(row, batch), atol=1e-6)


@pytest.mark.parametrize("row", ROWS)
def test_unload_returns_the_untouched_base_model(row):
    model, batch = make(row)
    base = model.unload()
    assert tuner_layers(base) == 0
    assert not any(m._forward_pre_hooks for m in base.modules())
    torch.testing.assert_close(output(base, batch), base_output(row, batch))


@pytest.mark.parametrize("row", ROWS)
def test_multiple_adapters_add_set_delete_save_load(row, tmp_path):
    model, batch = make(row)
    first = output(model, batch)
    torch.manual_seed(7)
    model.add_adapter("other", ROWS[row][1](init_weights=False))
    model.set_adapter("other")
    second = output(model, batch)
    assert not torch.allclose(first, second, atol=1e-6)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(build(ROWS[row][0]), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    torch.testing.assert_close(output(loaded, batch), first)
    loaded.set_adapter("other")
    torch.testing.assert_close(output(loaded, batch), second)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(output(model, batch), first)


@pytest.mark.parametrize("row", ROWS)
def test_low_cpu_mem_usage(row, tmp_path):
    model, batch = make(row)
    expected = output(model, batch)
    model.save_pretrained(tmp_path)
    family, config = ROWS[row]
    empty = get_peft_model(build(family), config(init_weights=False), low_cpu_mem_usage=True)
    adapter = [p for n, p in empty.named_parameters() if p.requires_grad]
    assert adapter and all(p.is_meta for p in adapter)  # created empty, as peft's own tuners do
    loaded = PeftModel.from_pretrained(build(family), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    torch.testing.assert_close(output(loaded, batch), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("row", ROWS)
def test_autocast_training_step(row, dtype):
    model, batch = make(row)
    model.train()
    with torch.autocast("cpu", dtype=dtype):
        out = output(model, batch)
    out.float().pow(2).mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


@pytest.mark.parametrize("row", ROWS)
def test_strict_loading_refuses_unexpected_and_missing_tensors(row, tmp_path):
    model, batch = make(row)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if "layers.0." in k or "layer.0." in k or ".h.0." in k)
    stray = name.replace(".0.", ".7.", 1)  # a tensor for a layer this model does not have
    save_file({**tensors, stray: tensors[name].clone()}, weights)
    base = build(ROWS[row][0])
    with pytest.raises(ValueError, match=rf"(?s)does not fit.*{stray.replace('.', '[.]')}: in the checkpoint"):
        PeftModel.from_pretrained(base, tmp_path)
    assert tuner_layers(base) == 0  # the failed load left the base model as it was
    torch.testing.assert_close(output(base, batch), base_output(row, batch))
    save_file({k: v for k, v in tensors.items() if k != name}, weights)
    with pytest.raises(ValueError, match=rf"(?s)does not fit.*{name.replace('.', '[.]')}: missing"):
        PeftModel.from_pretrained(build(ROWS[row][0]), tmp_path)


@pytest.mark.parametrize("row", ROWS)
def test_failed_saves_leave_the_previous_adapter_intact(row, tmp_path, monkeypatch):
    import peft.peft_model

    target = tmp_path / "adapter"

    old, _ = make(row, adapter_seed=1)
    old.save_pretrained(target)
    (target / "optimizer.pt").write_bytes(b"trainer state")  # a Trainer checkpoint holds more than the adapter
    before = adapter_files(target)
    new, batch = make(row, adapter_seed=2)

    def disk_full(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(peft.peft_model, "safe_save_file", disk_full)  # raising=True: fails if peft renames it
        with pytest.raises(OSError, match="No space"):
            new.save_pretrained(target)
    assert adapter_files(target) == before
    config_cls = type(new.peft_config["default"])

    def config_write_fails(self, *args, **kwargs):
        raise OSError("config write failed")

    with monkeypatch.context() as patch:
        patch.setattr(config_cls, "save_pretrained", config_write_fails)
        with pytest.raises(OSError, match="config write failed"):
            new.save_pretrained(target)
    assert adapter_files(target) == before  # no new weights beside the old config
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left
    new.save_pretrained(target)
    assert (target / "optimizer.pt").read_bytes() == b"trainer state"
    loaded = PeftModel.from_pretrained(build(ROWS[row][0]), target)
    torch.testing.assert_close(output(loaded, batch), output(new, batch))


@pytest.mark.parametrize("row", MERGEABLE)
def test_merge_and_unload_equals_the_adapted_model(row):
    model, batch = make(row)
    expected = output(model, batch)
    model.merge_adapter()
    torch.testing.assert_close(output(model, batch), expected, atol=1e-5, rtol=1e-4)
    model.unmerge_adapter()
    torch.testing.assert_close(output(model, batch), expected)
    merged = model.merge_and_unload(safe_merge=True)
    assert tuner_layers(merged) == 0
    torch.testing.assert_close(output(merged, batch), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("row", [row for row in ROWS if row not in MERGEABLE])
def test_merge_is_refused_with_the_reason(row):
    model, batch = make(row)
    expected = output(model, batch)
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match="cannot be merged.*nonlinearity"):
            merge()
    torch.testing.assert_close(output(model, batch), expected)  # nothing changed


@pytest.mark.parametrize("row", CAUSAL_ROWS)
def test_generation_with_and_without_kv_cache(row):
    model, batch = make(row)
    with_cache = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=True)
    without = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


def _gradients(row: str, checkpointing: str | None) -> dict[str, torch.Tensor]:
    model, batch = make(row)
    model.train()
    enable_checkpointing(model, checkpointing)
    torch.manual_seed(3)  # the same dropout masks in every run
    output(model, batch).pow(2).mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
@pytest.mark.parametrize("row", ROWS)
def test_gradient_checkpointing_gives_the_same_gradients(row, mode):
    expected = _gradients(row, None)
    got = _gradients(row, mode)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-4, msg=name)
