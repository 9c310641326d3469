"""``--dtype autocast``: fp32 weights trained under bf16 autocast, planned without weights.

Autocast is a dispatcher key of real devices; the meta device has none. So an autocast plan builds the model on the
meta device as every plan does, then gives each parameter and buffer a fake CPU tensor (``FakeTensorMode``: a
tensor that says it lives on the CPU but has no storage) and runs the step under CPU autocast: torch's own autocast
kernels decide every cast, autograd records them, and the fake tensors compute nothing.

CPU and CUDA autocast share their lower-precision list for the ops these models run (linear, matmul, bmm, addmm,
baddbmm, convolutions, and scaled dot-product attention, which ``kernels.attention_like`` casts itself because it
replaces the call). Their float32 lists differ: CUDA also runs softmax, log-softmax, norms, pow, exp, log, rsqrt,
sum and a few more in float32. ``cuda_float32_ops`` applies that list on top for the CUDA target: a call of one
of those functions with a half-precision input gets its floating inputs cast to float32 first, as CUDA autocast
would. It sees the functions Python calls (``torch.softmax``, ``Tensor.pow``, ``F.layer_norm``), not the ops a
composite op runs inside the dispatcher.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

AUTOCAST_DTYPE = torch.bfloat16
# CUDA autocast's "ops that can autocast to float32" (torch.amp documentation), by Python function name.
CUDA_FLOAT32_OPS = frozenset(
    """__pow__ __rdiv__ __rpow__ __rtruediv__ acos asin binary_cross_entropy_with_logits cosh cosine_embedding_loss
    cdist cosine_similarity cross_entropy cumprod cumsum dist erfinv exp expm1 group_norm hinge_embedding_loss kl_div
    l1_loss layer_norm log log_softmax log10 log1p log2 margin_ranking_loss mse_loss multilabel_margin_loss
    multi_margin_loss nll_loss norm normalize pdist poisson_nll_loss pow prod reciprocal rsqrt sinh smooth_l1_loss
    soft_margin_loss softmax softmin softplus sum renorm tan triplet_margin_loss""".split()
)
_HALF = (torch.float16, torch.bfloat16)


def to_fake_cpu(model: nn.Module, mode: Any) -> nn.Module:
    """Give every parameter and buffer of ``model`` a fake CPU tensor of ``mode`` with its shape, stride and dtype
    (tied parameters stay tied; an nf4 weight keeps its quantisation state, made fake too).
    ``torch.empty_strided`` reserves address space but touches no page."""
    memo: dict[int, Any] = {}

    def fake(t: torch.Tensor, parameter: bool = False) -> torch.Tensor:
        if id(t) not in memo:
            real = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
            memo[id(t)] = mode.from_tensor(nn.Parameter(real, t.requires_grad) if parameter else real)
            state = getattr(t, "quant_state", None)
            if state is not None:
                memo[id(t)].quant_state = fake_state(state)
        return memo[id(t)]

    def fake_state(state: Any) -> Any:
        if id(state) not in memo:
            copied = copy.copy(state)
            for name in ("absmax", "code", "offset"):
                if isinstance(getattr(state, name, None), torch.Tensor):
                    setattr(copied, name, fake(getattr(state, name)))
            if getattr(state, "state2", None) is not None:
                copied.state2 = fake_state(state.state2)
            memo[id(state)] = copied
        return memo[id(state)]

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = fake(param, parameter=True)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = fake(buffer)
        if getattr(module, "quant_state", None) is not None:  # bitsandbytes' Linear4bit keeps its weight's too
            module.quant_state = fake_state(module.quant_state)
    return model


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in _HALF:
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v) for v in value)
    return value


def _has_half(values: Any) -> bool:
    return any(
        (isinstance(v, torch.Tensor) and v.dtype in _HALF) or (isinstance(v, (list, tuple)) and _has_half(v))
        for v in values
    )


class cuda_float32_ops(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch's own modes
    """Apply CUDA autocast's float32 list on top of CPU autocast (see the module docstring)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in CUDA_FLOAT32_OPS and torch.is_autocast_enabled("cpu") and _has_half([*args, *kwargs.values()]):
            args = _to_float32(args)
            kwargs = {k: _to_float32(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)
