"""peft_ctrl.ops.lean_mlp: the SwiGLU product that keeps two tensors instead of three, and its use by state-ctrl."""

import pytest
import torch
from models import build, inputs
from peft import LoraConfig, get_peft_model

from peft_ctrl import StateCtrlConfig
from peft_ctrl.metrics import SavedTensorMeter
from peft_ctrl.ops import lean_mlp, restore_mlp, swiglu
from peft_ctrl.ops.lean_mlp import is_gated_mlp


def test_swiglu_values_and_gradients_equal_autograd():
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    torch.testing.assert_close(swiglu(gate, up), torch.nn.functional.silu(gate) * up)
    assert torch.autograd.gradcheck(swiglu, (gate, up))


def test_swiglu_keeps_gate_and_up_only():
    gate, up = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    with SavedTensorMeter() as plain:
        (torch.nn.functional.silu(gate) * up).sum().backward()
    with SavedTensorMeter() as lean:
        swiglu(gate, up).sum().backward()
    assert (plain.total_bytes, lean.total_bytes) == (3 * 24 * 4, 2 * 24 * 4)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_lean_model_equals_the_stock_model_and_keeps_one_tensor_less_per_mlp(family):
    """Also guards the assumption that these transformers MLPs compute down(silu(gate(x)) * up(x))."""
    batch = inputs(family, batch=2, seq=5)
    runs = []
    for lean in (False, True):
        model = build(family).train()
        model.model.embed_tokens.weight.requires_grad_(False)  # inputs to the first layer need no gradient
        if lean:
            assert lean_mlp(model) == model.config.num_hidden_layers
        with SavedTensorMeter(exclude=model) as meter:
            out = model(**batch).logits
            out.square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        runs.append((out.detach(), grads, meter.total_bytes))
    (out0, grads0, bytes0), (out1, grads1, bytes1) = runs
    torch.testing.assert_close(out1, out0)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6)
    intermediate = 2 * 5 * 48 * 4  # one (batch, seq, intermediate) fp32 tensor per layer
    assert bytes0 - bytes1 == 2 * intermediate


def test_restore_and_models_without_gated_mlps():
    model = build("llama")
    lean_mlp(model)
    assert all("forward" in vars(m) for m in model.modules() if is_gated_mlp(m))
    restore_mlp(model)
    assert not any("forward" in vars(m) for m in model.modules() if is_gated_mlp(m))
    assert lean_mlp(build("gpt2")) == 0


def test_state_ctrl_uses_it_by_default_and_unload_restores():
    lean = [m for m in get_peft_model(build("llama"), StateCtrlConfig(r=4)).modules() if is_gated_mlp(m)]
    assert lean and all("forward" in vars(m) for m in lean)
    model = get_peft_model(build("llama"), StateCtrlConfig(r=4, lean_mlp=False))
    assert not any("forward" in vars(m) for m in model.modules() if is_gated_mlp(m))
    model = get_peft_model(build("llama"), StateCtrlConfig(r=4))
    base = model.unload()
    assert not any("forward" in vars(m) for m in base.modules() if is_gated_mlp(m))


def test_peft_lora_models_can_use_it():
    batch = inputs("llama", batch=2, seq=5)
    config = LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(build("llama"), config)
    before = model(**batch).logits
    assert lean_mlp(model) == 2
    torch.testing.assert_close(model(**batch).logits, before)


def test_bad_config_value():
    with pytest.raises(ValueError, match="StateCtrlConfig.lean_mlp must be True or False"):
        StateCtrlConfig(lean_mlp="yes")
