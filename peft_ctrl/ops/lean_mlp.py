"""Memory-lean gated MLPs: the SwiGLU product keeps two tensors for backward instead of three.

A LLaMA-family MLP computes ``down(silu(gate(x)) * up(x))``. Plain autograd keeps ``gate(x)`` for the SiLU and both
``silu(gate(x))`` and ``up(x)`` for the product: three intermediate-width tensors per token and layer, about half
of what a frozen LLaMA block keeps for the backward pass. ``swiglu`` keeps ``gate(x)`` and ``up(x)`` only and
recomputes the SiLU in the backward pass (one sigmoid per element), so the block keeps a third less in its MLP and
gives the same values and gradients (to rounding).

``lean_mlp(model)`` switches every gated-SiLU MLP of a LLaMA, Mistral, Qwen2 or Qwen3 model to it, per module
instance, and works under any adapter (state-ctrl turns it on by default, ``StateCtrlConfig(lean_mlp=...)``; for
PEFT LoRA call it on the model). ``restore_mlp(model)`` undoes it.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# transformers' MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x));
# tests/test_ops.py checks each against the lean forward, so a change upstream fails there, not silently.
GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
_SILU = frozenset({"SiLU", "SiLUActivation"})


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        grad_gate = grad * up * sig * (1 + gate * (1 - sig)) if ctx.needs_input_grad[0] else None
        grad_up = grad * gate * sig if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, keeping only ``gate`` and ``up`` for the backward pass."""
    return _SwiGLU.apply(gate, up)


def is_gated_mlp(module: nn.Module) -> bool:
    """Whether ``module`` is one of the transformers MLPs ``lean_mlp`` rewrites (with a SiLU activation)."""
    return type(module).__name__ in GATED_MLPS and type(getattr(module, "act_fn", None)).__name__ in _SILU


def _lean_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def lean_mlp(model: nn.Module) -> int:
    """Make every gated-SiLU MLP of ``model`` keep two tensors instead of three; returns how many it changed
    (0 for models without one, e.g. GPT-2 or BERT)."""
    mlps = [m for m in model.modules() if is_gated_mlp(m)]
    for mlp in mlps:
        mlp.forward = types.MethodType(_lean_forward, mlp)
    return len(mlps)


def restore_mlp(model: nn.Module) -> None:
    """Undo ``lean_mlp``: the MLPs run their class's own forward again."""
    for mlp in model.modules():
        if is_gated_mlp(mlp) and "forward" in vars(mlp):
            del mlp.forward
