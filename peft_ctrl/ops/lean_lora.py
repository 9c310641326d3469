"""Memory-lean PEFT LoRA: route the low-rank path of ordinary peft LoRA layers through ``lowrank``.

``lean_lora(model)`` changes nothing in the adapter (weights, config, saving, merging stay peft's); it
only replaces, per layer instance, how ``lora_B(lora_A(dropout(x))) * scaling`` is computed, so the
backward keeps x by reference and regenerates the dropout mask instead of keeping the mask and a
dropped copy of x per adapted layer. Anything the lean path does not cover (DoRA and other LoRA
variants, mixed-adapter batches, merged or disabled adapters, extra forward arguments) runs peft's own
forward unchanged.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn

from .._registry import cast_lora_input, lora_uses_variant
from .lowrank import dropout_probability, lowrank


def _lean_forward(self: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = [name for name in self.active_adapters if name in self.lora_A]
    if args or kwargs or self.disable_adapters or self.merged or any(lora_uses_variant(self, n) for n in active):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    result_dtype = result.dtype
    for name in active:
        A = self.lora_A[name].weight
        p = dropout_probability(self.lora_dropout[name])
        x = cast_lora_input(self, x, A.dtype)
        delta = lowrank(x, A, self.lora_B[name].weight, scale=self.scaling[name], dropout=p, training=self.training)
        result = result + delta
    return result.to(result_dtype)


def lean_lora(model: nn.Module) -> int:
    """Make every plain peft LoRA ``Linear`` layer of ``model`` use the fused low-rank op; returns how many.

    Raises ``ValueError`` when the model has no such layer (for example before ``get_peft_model``).
    """
    layers = [m for m in model.modules() if type(m) is LoraLinear]
    if not layers:
        others = {f"{type(m).__module__}.{type(m).__name__}" for m in model.modules() if isinstance(m, LoraLayer)}
        if others:
            raise ValueError(
                f"lean_lora covers peft's LoRA layers over a plain nn.Linear only; this model's LoRA layers are "
                f"{sorted(others)} (over quantised or non-Linear base layers), which peft runs with its own forward. "
                "Train this model without lean_lora, or load the base unquantised to use it."
            )
        raise ValueError(
            "lean_lora found no peft LoRA Linear layer; call it on the model returned by get_peft_model(model, "
            "LoraConfig(...))."
        )
    for layer in layers:
        layer.forward = types.MethodType(_lean_forward, layer)
    return len(layers)
