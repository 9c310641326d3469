"""Which attention kernel a device runs, modelled on the meta device.

On the meta device ``F.scaled_dot_product_attention`` takes its math path, which saves the full attention
probabilities for backward; real devices take a fused kernel that saves far less. ``attention_like(target)`` is
a ``TorchFunctionMode`` that sends every ``scaled_dot_product_attention`` call to the fused kernel the target device
would pick, called as the ATen op with its own autograd formula, so what autograd saves is what that kernel saves:

* ``"cpu"``: ``_scaled_dot_product_flash_attention_for_cpu`` (query, key, value, output and the row log-sum-exp; key
  and value at their own head count), what CPU SDPA runs for causal attention without a mask. The tests compare the
  planner with the meter on CPU through this target.
* ``"cuda"``: ``_scaled_dot_product_flash_attention`` (FlashAttention-2: the same tensors, plus the RNG seed and
  offset), what CUDA SDPA runs for bf16/fp16 causal attention without a mask on sm_80 and newer; for fp32, which
  FlashAttention does not take, ``_scaled_dot_product_efficient_attention`` (the same tensors, the log-sum-exp
  padded to 32 rows), when query and key have the same head count (it does not read grouped heads).

The mode is entered inside the model's attention function (``attention_function(target)``, registered with
transformers' ``AttentionInterface``), so it also holds when the backward recomputes a checkpointed layer on
autograd's device thread.

Dropout differs too: CPU (and the meta device) multiply by a float mask, which autograd saves in the input's dtype;
CUDA runs the fused ``native_dropout``, which saves a bool mask (one byte per element). ``cuda_dropout(model)``
swaps every dropout module for one that runs ``torch.native_dropout``.

Calls the fused kernels cannot take (an explicit attention mask, fp32 with grouped key/value heads on CUDA, a
head size over 256, a query length other than the key length) keep the math path, as the device would fall back
to a path that saves at least as much.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..dtypes import autocast_state

TARGETS = ("cuda", "cpu")


class attention_like(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch's own modes
    """Run SDPA calls as the fused kernel of ``target`` ("cuda" or "cpu") would (see the module docstring)."""

    def __init__(self, target: str) -> None:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}.")
        super().__init__()
        self.target = target

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        return func(*args, **kwargs)

    def _sdpa(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        enabled, dtype = autocast_state(query.device.type)
        if enabled:  # SDPA is on autocast's lower-precision list (CPU and CUDA): this call replaces it, so it casts
            query, key, value = (t.to(dtype) if t.is_floating_point() else t for t in (query, key, value))
        if key.shape[1] != query.shape[1] and not enable_gqa:
            raise ValueError("query and key head counts differ but enable_gqa is False.")
        fused = attn_mask is None and query.shape[-2] == key.shape[-2] and query.shape[-1] <= 256
        flash = fused and (self.target == "cpu" or query.dtype in (torch.bfloat16, torch.float16))
        # The flash kernels read grouped key/value heads as they are (GQA), so key and value are saved at their own
        # count; the memory-efficient kernel (CUDA's choice for fp32) takes equal head counts only.
        if flash and self.target == "cpu":
            op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            return op(query, key, value, dropout_p, is_causal, attn_mask=None, scale=scale)[0]
        if flash:
            op = torch.ops.aten._scaled_dot_product_flash_attention
            return op(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        if fused and self.target == "cuda" and key.shape[1] == query.shape[1]:
            op = torch.ops.aten._scaled_dot_product_efficient_attention
            return op(query, key, value, None, True, dropout_p, is_causal, scale=scale)[0]
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )


def attention_function(target: str) -> str:
    """Register and return the name of a transformers attention implementation: transformers' own SDPA
    attention with ``target``'s fused kernel (``attention_like``)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    name = f"peft_ctrl_plan_{target}"

    def attention(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        with attention_like(target):
            return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register(name, attention)  # registering again replaces it with the same function
    return name


class _NativeDropout(torch.nn.Dropout):
    """``nn.Dropout`` as CUDA runs it: the fused ``native_dropout``, which saves a bool mask."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return input
        return torch.native_dropout(input, self.p, True)[0]


def cuda_dropout(model: torch.nn.Module) -> int:
    """Swap every ``nn.Dropout`` with p > 0 in ``model`` for ``_NativeDropout``; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout and child.p > 0:
                setattr(parent, name, _NativeDropout(child.p))
                swapped += 1
    return swapped
