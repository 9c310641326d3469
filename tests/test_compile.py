"""torch.compile of models in training mode with dropout on: no graph break inside peft_ctrl, and the compiled
step gives the loss and gradients of the eager one."""

import importlib

import pytest
import torch
import torch._dynamo
from models import build
from peft import LoraConfig, get_peft_model

from peft_ctrl import SealConfig, StateCtrlConfig, SubLoRAConfig
from peft_ctrl.ops import lean_lora

# The module, not the function of the same name that peft_ctrl.ops exports.
lowrank_module = importlib.import_module("peft_ctrl.ops.lowrank")

KEY = "compile-key-0123456789abcdef"


def make(method: str, dropout: float = 0.1):
    if method == "lean_lora":
        model = get_peft_model(build("llama"), LoraConfig(r=4, lora_dropout=dropout, target_modules="all-linear"))
        lean_lora(model)
    elif method == "seal":
        config = SealConfig(r=4, lora_dropout=dropout, target_modules=["q_proj", "v_proj"], key=KEY)
        model = get_peft_model(build("llama"), config)
    elif method == "sublora":
        config = SubLoRAConfig(r=4, target_r=2, lora_dropout=dropout, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(build("llama"), config)
    elif method == "control_lora":
        model = get_peft_model(build("llama"), StateCtrlConfig.control_lora(r=4, lora_r=2, dropout=dropout))
    else:
        model = get_peft_model(build("llama"), StateCtrlConfig(r=4, blocks=method.split("-")[1], dropout=dropout))
    model.train()
    return model


METHODS = ["state_ctrl-mlp", "state_ctrl-both", "state_ctrl-attn", "control_lora", "lean_lora", "seal", "sublora"]


@pytest.mark.parametrize("method", METHODS)
def test_no_graph_break_inside_peft_ctrl(method):
    model = make(method)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda: model(input_ids=ids, labels=ids).loss)()
    ours = [
        f"{b.reason.splitlines()[0]} at {b.user_stack[-1].filename}:{b.user_stack[-1].lineno}"
        for b in explained.break_reasons
        if b.user_stack and "peft_ctrl" in b.user_stack[-1].filename
    ]
    assert ours == [], ours


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["state_ctrl-both", "lean_lora"])
def test_compiled_step_matches_eager(method, monkeypatch):
    """Same seed, same masks: inductor draws its random numbers like eager under ``fallback_random``; the eager
    reference runs the op's traced expression (what the compiled graph holds) instead of the seeded kernel."""
    import torch._inductor.config as inductor_config

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    eager, compiled = make(method), make(method)
    compiled.load_state_dict(eager.state_dict())
    # An untrained adapter has B = 0, so A would get no gradient: move B off zero in both.
    with torch.no_grad():
        for (_, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
                q.copy_(p)
    torch._dynamo.reset()
    step = torch.compile(lambda m: m(input_ids=ids, labels=ids).loss)
    with inductor_config.patch(fallback_random=True):
        torch.manual_seed(3)
        loss_c = step(compiled)
        loss_c.backward()
    with monkeypatch.context() as patch:
        patch.setattr(lowrank_module, "_compiling", lambda: True)
        torch.manual_seed(3)
        loss_e = eager(input_ids=ids, labels=ids).loss
        loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    ge, gc = grads(eager), grads(compiled)
    assert ge.keys() == gc.keys() and len(ge) > 0
    for name in ge:
        torch.testing.assert_close(gc[name], ge[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("scheme", ["euler", "heun"])
def test_odelora_steps_a_compiled_model_as_it_steps_the_eager_one(scheme):
    """ODELoRA is an optimizer over peft LoRA: under a compiled forward and backward it takes the eager steps."""
    from peft_ctrl.optim import create_odelora_optimizer

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    eager, compiled = get_peft_model(build("llama"), config), get_peft_model(build("llama"), config)
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    forwards = {
        "eager": lambda: eager(input_ids=ids, labels=ids).loss,
        "compiled": torch.compile(lambda: compiled(input_ids=ids, labels=ids).loss),
    }
    losses = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        opt = create_odelora_optimizer(model, lr=5e-2, scheme=scheme, warmup_steps=1)

        def closure(forward=forwards[name], opt=opt):
            opt.zero_grad()
            loss = forward()
            loss.backward()
            return loss

        losses[name] = torch.stack([opt.step(closure).detach() for _ in range(3)])
    assert losses["eager"][-1] < losses["eager"][0]
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-4, atol=1e-5)
    for (n, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)
