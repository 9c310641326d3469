"""State-based parallel control: the peft-style generic battery over every supported family, then the
method-specific behaviour (controllers, generation, dtypes, checkpointing) and bad input."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import CAUSAL, FAMILIES, build, inputs, output
from peft import PeftModel, get_peft_model
from torch import nn

from peft_ctrl import StateCtrlConfig
from peft_ctrl.state_ctrl import StateCtrlLayer

BLOCKS = ["mlp", "attn", "both"]


def adapted(family: str, seed: int = 0, **kw) -> nn.Module:
    kw.setdefault("r", 4)
    if family == "custom":
        kw.setdefault("bridges", [("norm", "ff")])
    return get_peft_model(build(family, seed), StateCtrlConfig(**kw))


def n_bridges(model: nn.Module) -> int:
    return sum(isinstance(m, StateCtrlLayer) for m in model.modules())


# ---------------------------------------------------------------- generic battery over every family


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_init_equals_base_model(family, blocks):
    batch = inputs(family)
    ref = output(build(family), batch)
    model = adapted(family, blocks=blocks)
    assert n_bridges(model) == (4 if blocks == "both" else 2)
    torch.testing.assert_close(output(model, batch), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES + ["custom"])
def test_only_adapter_params_train_and_change(family):
    batch = inputs(family)
    model = adapted(family, blocks=None if family == "custom" else "both")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("state_ctrl_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        output(model, batch).float().pow(2).mean().backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p)
        assert changed == (n in trainable), n


@pytest.mark.parametrize("family", FAMILIES + ["custom"])
def test_save_load_round_trip(family, tmp_path):
    batch = inputs(family)
    model = adapted(family, init_weights=False)
    expected = output(model, batch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(build(family), tmp_path)
    torch.testing.assert_close(output(loaded, batch), expected, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "vit"])
def test_disable_enable_and_unload(family):
    batch = inputs(family)
    ref = output(build(family), batch)
    model = adapted(family, blocks="both", init_weights=False)
    adapted_out = output(model, batch)
    assert not torch.allclose(adapted_out, ref)
    with model.disable_adapter():
        torch.testing.assert_close(output(model, batch), ref, atol=0, rtol=0)
    torch.testing.assert_close(output(model, batch), adapted_out, atol=0, rtol=0)
    base = model.unload()
    assert n_bridges(base) == 0
    assert not any(m._forward_pre_hooks for m in base.modules()), "capture hooks must be removed on unload"
    torch.testing.assert_close(output(base, batch), ref, atol=0, rtol=0)


def test_a_fresh_process_loads_the_adapter_with_only_import_peft_ctrl(tmp_path):
    model = adapted("llama", init_weights=False)
    model.save_pretrained(tmp_path)
    torch.save(output(model, inputs("llama")), tmp_path / "expected.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
import peft_ctrl
from peft import PeftModel
from models import build, inputs, output
model = PeftModel.from_pretrained(build("llama"), {str(tmp_path)!r})
assert type(model.peft_config["default"]).__name__ == "StateCtrlConfig"
expected = torch.load({str(tmp_path / "expected.pt")!r})
torch.testing.assert_close(output(model, inputs("llama")), expected, atol=0, rtol=0)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_merge_is_refused_with_an_explanation():
    model = adapted("llama", init_weights=False)
    with pytest.raises(ValueError, match="cannot be merged.*unload"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    assert n_bridges(model) == 2  # nothing was changed by the refused merge


def test_multiple_adapters_add_set_delete(tmp_path):
    batch = inputs("llama")
    ref = output(build("llama"), batch)
    model = adapted("llama", init_weights=False)
    model.add_adapter("other", StateCtrlConfig(r=2, blocks="attn", init_weights=False))
    out_default = output(model, batch)
    model.set_adapter("other")
    out_other = output(model, batch)
    assert not torch.allclose(out_default, out_other)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()

    model.delete_adapter("other")
    assert "other" not in model.peft_config
    model.set_adapter("default")
    torch.testing.assert_close(output(model, batch), out_default, atol=0, rtol=0)
    # The attention blocks lost their only adapter: their capture hooks are gone too.
    attn_heads = [m for n, m in model.named_modules() if n.endswith("input_layernorm")]
    assert all(not m._forward_pre_hooks for m in attn_heads)
    assert not torch.allclose(out_default, ref)


def test_deleting_the_active_adapter_switches_to_the_remaining_one():
    batch = inputs("llama")
    model = adapted("llama", init_weights=False)
    model.add_adapter("other", StateCtrlConfig(r=2, blocks="both", init_weights=False))
    model.set_adapter("other")
    out_other = output(model, batch)
    model.set_adapter("default")
    with pytest.warns(UserWarning, match="Setting active adapter to other"):
        model.delete_adapter("default")
    assert list(model.peft_config) == ["other"]
    torch.testing.assert_close(output(model, batch), out_other, atol=0, rtol=0)


def test_print_trainable_parameters_counts_bridges(capsys):
    model = adapted("llama", r=4, blocks="both")
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 4 * (4 * 32 + 32 * 4)  # 4 bridges, A: r x d, B: d x r
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


def test_layers_to_transform():
    model = adapted("llama", blocks="both", layers_to_transform=[1])
    names = [n for n, m in model.named_modules() if isinstance(m, StateCtrlLayer)]
    assert names and all(".layers.1." in n for n in names)


def test_alpha_scales_the_control_linearly():
    batch = inputs("llama")
    ref = output(build("llama"), batch)
    delta1 = output(adapted("llama", init_weights=False, alpha=1.0), batch) - ref
    small = output(adapted("llama", init_weights=False, alpha=1e-3), batch) - ref
    # At a tiny scale the network is linear in the control.
    torch.testing.assert_close(small * 1e3, delta1, atol=2e-3, rtol=5e-2)


def test_dropout_only_in_training():
    model = adapted("llama", init_weights=False, dropout=0.5)
    batch = inputs("llama")
    model.eval()
    torch.testing.assert_close(output(model, batch), output(model, batch), atol=0, rtol=0)
    model.train()
    assert not torch.allclose(output(model, batch), output(model, batch))


def test_control_reads_the_head_input_without_copying_it():
    model = adapted("llama")
    seen = {}
    layer = next(m for m in model.modules() if isinstance(m, StateCtrlLayer))
    head = model.base_model.model.get_submodule(layer.head_name["default"])
    head.register_forward_pre_hook(lambda mod, args: seen.setdefault("h", args[0]))
    original_control = layer.control

    def spy(name, h):
        seen["bridge_h"] = h
        return original_control(name, h)

    layer.control = spy
    output(model, inputs("llama"))
    assert seen["bridge_h"] is seen["h"]
    assert layer._captured == {}  # the reference is released once the tail ran


# ---------------------------------------------------------------- generation, dtypes, checkpointing


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_with_and_without_kv_cache(family):
    model = adapted(family, blocks="both", init_weights=False)
    prompt = inputs(family, batch=2, seq=5)
    with_cache = model.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    without = model.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    assert with_cache.shape[1] == 11


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_step(dtype):
    model = adapted("llama", blocks="both", init_weights=False)
    model.train()
    batch = inputs("llama")
    with torch.autocast("cpu", dtype=dtype):
        out = output(model, batch)
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_half_precision_base_model_keeps_fp32_adapters():
    base = build("llama").to(torch.bfloat16)
    model = get_peft_model(base, StateCtrlConfig(r=4, init_weights=False))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "state_ctrl_" in n)
    out = output(model, inputs("llama"))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_gradient_checkpointing_gives_the_same_gradients(family, reentrant):
    batch = inputs(family)

    def grads(checkpointing: bool):
        model = adapted(family, blocks="both", init_weights=False)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        output(model, batch).pow(2).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- attention controller


@pytest.mark.parametrize("family", CAUSAL)
def test_attention_controller_is_causal(family):
    model = adapted(family, controller="attention", init_weights=False)
    batch = inputs(family)
    out = output(model, batch)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][:, -1] = (changed["input_ids"][:, -1] + 1) % 64
    out2 = output(model, changed)
    torch.testing.assert_close(out2[:, :-1], out[:, :-1], atol=1e-6, rtol=0)
    assert not torch.allclose(out2[:, -1], out[:, -1])


def test_attention_controller_mixes_tokens_and_ignores_padding():
    model = adapted("bert", controller="attention", init_weights=False, blocks="both")
    model.eval()
    batch = inputs("bert", batch=1, seq=6)
    ref = output(model, batch)
    padded = {
        "input_ids": torch.cat([batch["input_ids"], torch.ones(1, 3, dtype=torch.long)], dim=1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(1, 3, dtype=torch.long)], dim=1),
    }
    torch.testing.assert_close(output(model, padded), ref, atol=1e-5, rtol=0)
    # Tokens are mixed: the linear controller with the same weights gives another result.
    linear = copy.deepcopy(model)
    for m in linear.modules():
        if isinstance(m, StateCtrlLayer):
            m.controller["default"] = "linear"
    assert not torch.allclose(output(linear, batch), ref)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attention_controller_refuses_kv_cache_decoding(family):
    model = adapted(family, controller="attention", init_weights=False)
    prompt = inputs(family, batch=1, seq=4)
    no_cache = model.generate(**prompt, max_new_tokens=3, do_sample=False, use_cache=False)
    assert no_cache.shape[1] == 7
    with pytest.raises(ValueError, match="KV cache"):
        model.generate(**prompt, max_new_tokens=3, do_sample=False, use_cache=True)


class _FakeCache:
    """Any object with ``get_seq_length`` counts as a KV cache, whatever the argument is called."""

    def __init__(self, length: int) -> None:
        self.length = length

    def get_seq_length(self) -> int:
        return self.length


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"past_key_values": _FakeCache(4)}, True),  # transformers <= 5.23
        ({"cache": _FakeCache(4)}, True),  # transformers >= 5.24
        ({"some_future_name": _FakeCache(4)}, True),
        ({"cache": _FakeCache(0)}, False),  # the prefill of a generate call
        ({"past_key_values": ((torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8)),)}, True),  # legacy tuples
        ({"cache_position": torch.tensor([4])}, True),
        ({"cache_position": torch.arange(4)}, False),
        ({"attention_mask": torch.ones(1, 5)}, True),  # more mask columns than tokens fed
        ({"attention_mask": torch.ones(1, 1)}, False),
        ({}, False),
    ],
)
def test_incremental_decoding_is_detected_whatever_the_cache_argument_is_called(kwargs, expected):
    from peft_ctrl.state_ctrl.layer import continues_a_cache

    assert continues_a_cache((), {"input_ids": torch.zeros(1, 1, dtype=torch.long), **kwargs}) is expected


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("cache_name", ["past_key_values", "cache"])
def test_attention_controller_refuses_a_filled_cache_under_either_calling_convention(family, cache_name):
    import transformers

    model = adapted(family, controller="attention", init_weights=False)
    prompt = inputs(family, batch=1, seq=4)
    cache = transformers.DynamicCache()
    with model.disable_adapter():
        model(**prompt, **{cache_name: cache}, use_cache=True)
    if cache.get_seq_length() == 0:  # this transformers does not take the cache under this name
        cache = _FakeCache(4)
    step = {"input_ids": prompt["input_ids"][:, -1:], "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with pytest.raises(ValueError, match="KV cache"):
        model(**step, **{cache_name: cache}, use_cache=True)
    del step["attention_mask"]  # transformers drops an all-ones mask: the cache alone must be enough
    with pytest.raises(ValueError, match="KV cache"):
        model(**step, **{cache_name: cache}, use_cache=True)


def test_attention_controller_needs_causality_for_unknown_models():
    with pytest.raises(ValueError, match="causal"):
        adapted("custom", controller="attention")
    model = adapted("custom", controller="attention", causal=False, init_weights=False)
    assert torch.isfinite(output(model, inputs("custom"))).all()


# ---------------------------------------------------------------- custom bridges and bad input


def test_custom_bridges_on_a_plain_torch_model():
    model = adapted("custom", init_weights=False)
    assert n_bridges(model) == 3
    base = build("custom")
    x = inputs("custom")["x"]
    # out = x + ff(norm(x)) + B A x for each block
    expected = x
    for i, block in enumerate(base.blocks):
        layer = model.base_model.model.blocks[i].ff
        ctrl = layer.state_ctrl_B["default"](layer.state_ctrl_A["default"](expected))
        expected = block(expected) + ctrl
    torch.testing.assert_close(model(x=x), base.head(expected), atol=1e-6, rtol=1e-5)


def test_a_plain_torch_model_without_bridges_says_how_to_give_them():
    """No transformers config: no probe input to find bridges with, so the error says to pass them."""
    with pytest.raises(ValueError, match=r"(?s)no transformers config to build a probe input.*bridges"):
        get_peft_model(build("custom"), StateCtrlConfig(r=4))


def test_bridges_matching_nothing():
    model = build("custom")
    with pytest.raises(ValueError, match="No state-ctrl bridge matched"):
        get_peft_model(model, StateCtrlConfig(r=4, bridges=[("nonexistent", "ff")]))
    assert n_bridges(model) == 0 and not any(m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="layers_to_transform"):
        get_peft_model(build("llama"), StateCtrlConfig(r=4, layers_to_transform=[7]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, r"StateCtrlConfig.r must be an integer >= 1, got 0"),
        ({"r": -3}, r"StateCtrlConfig.r must be an integer >= 1"),
        ({"r": 2.5}, r"StateCtrlConfig.r must be an integer >= 1"),
        ({"blocks": "ffn"}, "StateCtrlConfig.blocks must be one of"),
        ({"controller": "mlp"}, "StateCtrlConfig.controller must be one of"),
        ({"dropout": 1.0}, "dropout"),
        ({"alpha": float("nan")}, "alpha"),
        ({"blocks": "mlp", "bridges": [("a", "b")]}, "either `blocks`"),
        ({"bridges": [("a",)]}, r"\(head, tail\) pair"),
        ({"bridges": []}, "empty"),
        ({"layers_to_transform": []}, "empty"),
        ({"lora_target_modules": "q_proj"}, "list of module names"),
        ({"lora_target_modules": []}, "empty"),
        ({"lora_target_modules": ["q_proj"], "lora_r": 0}, "lora_r must be an integer >= 1"),
        ({"lora_target_modules": ["q_proj"], "lora_dropout": 1.5}, "lora_dropout"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StateCtrlConfig(**kwargs)


def test_loading_onto_a_model_of_other_shapes_fails_cleanly(tmp_path):
    adapted("llama", init_weights=False).save_pretrained(tmp_path)
    import transformers

    torch.manual_seed(0)
    wider = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    before = copy.deepcopy(wider.state_dict())
    with pytest.raises(
        ValueError, match=r"does not fit this base model(?s:.*)checkpoint \(4, 32\) vs model \(4, 48\)"
    ):
        PeftModel.from_pretrained(wider, tmp_path)
    assert n_bridges(wider) == 0 and not any(m._forward_pre_hooks for m in wider.modules())
    after = wider.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_corrupted_adapter_file_raises_and_keeps_the_base_weights(tmp_path):
    adapted("llama", init_weights=False).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    base = build("llama")
    params = list(base.parameters())
    copies = [p.detach().clone() for p in params]
    with pytest.raises(Exception, match="deserializing header"):
        PeftModel.from_pretrained(base, tmp_path)
    # peft attaches the adapter before it reads the weights; the base weights themselves are untouched.
    assert all(torch.equal(p, c) for p, c in zip(params, copies, strict=True))


# ---------------------------------------------------------------- fused low-rank op in the bridges


def test_fused_and_unfused_bridges_agree():
    batch = inputs("llama")
    results = {}
    for fused in (True, False):
        model = adapted("llama", blocks="both", init_weights=False, fused=fused)
        model.train()
        out = output(model, batch)
        out.pow(2).mean().backward()
        results[fused] = (out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-6, rtol=1e-6)
    for name, grad in results[True][1].items():
        torch.testing.assert_close(grad, results[False][1][name], atol=1e-6, rtol=1e-5)


def test_fused_bridge_with_dropout_keeps_no_mask_and_no_dropped_copy():
    from peft_ctrl.metrics import saved_activation_bytes

    batch = inputs("llama", batch=2, seq=16)
    saved = {}
    for fused in (True, False):
        model = adapted("llama", blocks="mlp", dropout=0.1, fused=fused)
        model.train()
        saved[fused] = saved_activation_bytes(lambda m=model: output(m, batch).sum().backward(), exclude=model)
    tokens, d, layers = 2 * 16, 32, 2
    # Unfused dropout keeps a float mask (CPU) and the dropped copy of h in every bridged layer whose h needs a
    # gradient (layers 1+). In layer 0 h needs none: unfused keeps only the dropped copy, fused keeps h itself.
    assert saved[False] - saved[True] == (layers - 1) * 2 * tokens * d * 4


def test_an_adapter_for_more_layers_is_refused(tmp_path):
    get_peft_model(build("llama", layers=3), StateCtrlConfig(r=4)).save_pretrained(tmp_path)
    base = build("llama", layers=2)
    with pytest.raises(ValueError, match=r"(?s)2 problem.*layers\.2\.mlp\.state_ctrl_A\.weight: in the checkpoint"):
        PeftModel.from_pretrained(base, tmp_path)
    assert n_bridges(base) == 0


def test_tensors_of_blocks_the_config_does_not_bridge_are_refused(tmp_path):
    import json

    get_peft_model(build("llama"), StateCtrlConfig(r=4, blocks="both")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "blocks": "mlp"}))
    with pytest.raises(ValueError, match=r"(?s)self_attn\.state_ctrl_A\.weight: in the checkpoint, but this model"):
        PeftModel.from_pretrained(build("llama"), tmp_path)


# ---------------------------------------------------------------- Control+LoRA (bridges plus LoRA in one adapter)


def test_control_lora_adds_lora_to_the_chosen_linears_of_the_same_adapter():
    """Control+LoRA = the bridged model plus ``(lora_alpha / lora_r) B A x`` on q,k,v, every weight in one adapter."""
    config = StateCtrlConfig.control_lora(r=4, lora_r=2, lora_alpha=6.0, init_weights=False)
    model = get_peft_model(build("llama"), config)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features)
    A, B = layer.state_ctrl_lora_A["default"].weight, layer.state_ctrl_lora_B["default"].weight
    model.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 3.0 * x @ A.T @ B.T)
    n_layers = len(model.base_model.model.model.layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum("state_ctrl_lora_A" in n for n in trainable) == 3 * n_layers  # q, k, v
    assert sum(".mlp.state_ctrl_A" in n for n in trainable) == n_layers  # one MLP bridge per layer
    assert all("state_ctrl_" in n for n in trainable)


def test_control_lora_changes_nothing_at_step_zero_and_both_parts_train():
    model = get_peft_model(build("llama"), StateCtrlConfig.control_lora(r=4, lora_r=2))
    batch = inputs("llama")
    torch.testing.assert_close(output(model, batch), output(build("llama"), batch))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(2):  # B moves on the first step, A (whose gradient is B^T ...) from the second
        output(model, batch).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p)}
    assert any("state_ctrl_lora_A" in n for n in changed) and any("state_ctrl_lora_B" in n for n in changed)
    assert any(".mlp.state_ctrl_A" in n for n in changed) and any(".mlp.state_ctrl_B" in n for n in changed)


def test_control_lora_unload_restores_every_linear():
    model = get_peft_model(build("llama"), StateCtrlConfig.control_lora(r=4, lora_r=2, init_weights=False))
    base = model.unload()
    assert not any("state_ctrl" in n for n, _ in base.named_modules())
    batch = inputs("llama")
    torch.testing.assert_close(output(base, batch), output(build("llama"), batch))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"blocks": "both", "lora_target_modules": ["q_proj"]}, "lies inside the bridged block"),
        ({"blocks": "mlp", "lora_target_modules": ["down_proj"]}, "lies inside the bridged block"),
        ({"blocks": "mlp", "lora_target_modules": ["nonexistent"]}, "No module matched"),
        ({"blocks": "attn", "lora_target_modules": ["mlp"]}, "adapts torch.nn.Linear modules only"),
    ],
)
def test_control_lora_bad_targets(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(build("llama"), StateCtrlConfig(r=4, **kwargs))


def test_control_lora_layers_to_transform_applies_to_both_parts():
    model = get_peft_model(build("llama"), StateCtrlConfig.control_lora(r=4, lora_r=2, layers_to_transform=[1]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n for n in names)
