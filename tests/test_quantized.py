"""Every method over a quantised base (bitsandbytes 4-bit nf4 with double quantisation, bf16 or fp32 compute,
and 8-bit), the QLoRA recipe: ``prepare_model_for_kbit_training``, train, save, reload onto a freshly quantised
base, generate with a KV cache. Runs on bitsandbytes' CPU backend."""

from __future__ import annotations

import pytest
import torch
from models import QUANTS, quantised_base, save_quantisable_llama
from peft import LoraConfig, PeftModel, get_peft_model

from peft_ctrl import SealConfig, StateCtrlConfig, SubLoRAConfig, set_adapter_dtype
from peft_ctrl.optim import create_odelora_optimizer
from peft_ctrl.seal.keys import KEY_ENV

bnb = pytest.importorskip("bitsandbytes")

KEY = "quantised-key-0123456789abcdef"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    save_quantisable_llama(folder)
    return folder


QUANTISED_LINEAR = {"nf4-fp32": "Linear4bit", "nf4-bf16": "Linear4bit", "int8": "Linear8bitLt"}

QV = ["q_proj", "v_proj"]
CONFIGS = {
    "qcontrol-mlp": lambda: StateCtrlConfig(r=4, blocks="mlp", task_type="CAUSAL_LM"),
    "qcontrol-both": lambda: StateCtrlConfig(r=4, blocks="both", task_type="CAUSAL_LM"),
    "control_lora": lambda: StateCtrlConfig.control_lora(r=4, lora_r=2, task_type="CAUSAL_LM"),
    "seal": lambda: SealConfig(r=4, target_modules=QV, key=KEY, task_type="CAUSAL_LM"),
    "sublora": lambda: SubLoRAConfig(r=4, target_r=2, target_modules=QV, task_type="CAUSAL_LM"),
    "odelora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=QV, task_type="CAUSAL_LM"),
}


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 64, (4, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quant", list(QUANTS))
@pytest.mark.parametrize("method", list(CONFIGS))
def test_train_save_reload_generate_on_quantised_base(base_dir, tmp_path, monkeypatch, method, quant):
    monkeypatch.setenv(KEY_ENV, KEY)  # SEAL's loading needs the owner's key
    model = get_peft_model(quantised_base(base_dir, quant), CONFIGS[method]())
    assert QUANTISED_LINEAR[quant] in {type(m).__name__ for m in model.modules()}
    params = trainable(model)
    # Adapters live in a float dtype (float32 by default) over the integer storage of the base.
    assert params and {p.dtype for p in params.values()} == {torch.float32}
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in params)
    opt = (
        create_odelora_optimizer(model, lr=5e-2, warmup_steps=1)
        if method == "odelora"
        else torch.optim.AdamW(params.values(), lr=1e-2)
    )
    before = {n: p.detach().clone() for n, p in params.items()}
    data = batch()
    model.train()
    losses = []
    for _ in range(4):

        def closure():
            opt.zero_grad()
            loss = model(**data).loss
            loss.backward()
            return loss

        if method == "odelora":
            losses.append(float(opt.step(closure)))
        else:
            losses.append(float(closure()))
            opt.step()
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert any(not torch.equal(before[n], p) for n, p in params.items())

    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(quantised_base(base_dir, quant), tmp_path / "adapter")
    model.eval()
    ids = data["input_ids"][:2, :6]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    mask = torch.ones_like(ids)
    out = loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 10) and torch.equal(out, ref)


@pytest.mark.parametrize("method", ["qcontrol-mlp", "seal", "sublora"])
def test_adapters_train_in_the_dtype_the_user_chooses(base_dir, tmp_path, method):
    """bf16 adapters over a 4-bit base with bf16 compute: trained in bf16, saved as bf16."""
    from safetensors.torch import load_file

    model = get_peft_model(quantised_base(base_dir, "nf4-bf16"), CONFIGS[method]())
    assert set_adapter_dtype(model, torch.bfloat16) > 0
    params = trainable(model)
    assert {n: p.dtype for n, p in params.items() if p.dtype != torch.bfloat16} == {}
    model.train()
    loss = model(**batch()).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in params.values())
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.bfloat16}


def test_set_adapter_dtype_refuses_bad_input(base_dir):
    model = get_peft_model(quantised_base(base_dir, "int8"), CONFIGS["qcontrol-mlp"]())
    with pytest.raises(ValueError, match="floating-point torch.dtype"):
        set_adapter_dtype(model, torch.int8)
    with pytest.raises(ValueError, match="No layer of this model holds an adapter named 'other'"):
        set_adapter_dtype(model, torch.bfloat16, adapter_name="other")


@pytest.mark.parametrize("quant", ["nf4-fp32", "int8"])
@pytest.mark.parametrize("method", ["seal", "sublora"])
def test_merge_into_a_quantised_base_is_refused_and_changes_nothing(base_dir, method, quant):
    model = get_peft_model(quantised_base(base_dir, quant), CONFIGS[method]())
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(0.1)
    ids = batch()["input_ids"][:1, :6]
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with pytest.raises(ValueError, match="into a quantised base layer .* the model is unchanged"):
        model.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_lean_lora_over_a_quantised_base_is_refused_and_names_peft_s_layers(base_dir):
    """lean_lora covers LoRA over a plain nn.Linear; peft's QLoRA layers keep their forward, and the error says so."""
    from peft_ctrl.ops import lean_lora

    model = get_peft_model(quantised_base(base_dir, "nf4-fp32"), LoraConfig(r=4, target_modules=QV))
    forwards = {n: m.forward for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"lean_lora covers .* \['peft.tuners.lora.bnb.Linear4bit'\].*unquantised"):
        lean_lora(model)
    assert {n: m.forward for n, m in model.named_modules()} == forwards
