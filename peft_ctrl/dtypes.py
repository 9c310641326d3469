"""Choosing the float dtype adapters train in, whatever the base model's storage (fp32, bf16, 4-bit or 8-bit).

peft creates adapter weights in float32 over a quantised base (its int8 or packed 4-bit storage has no float
dtype to follow) and, by default, upcasts bf16/fp16 adapters to float32 (``autocast_adapter_dtype=True``).
``set_adapter_dtype`` casts them to the dtype the user wants afterwards, for this package's methods and for
peft's own (LoRA, DoRA) alike: every layer's forward casts its input to the adapter's dtype and its output
back to the base layer's.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def set_adapter_dtype(model: nn.Module, dtype: torch.dtype, adapter_name: str | None = None) -> int:
    """Cast the weights of adapter ``adapter_name`` (every adapter when None) in every peft tuner layer of
    ``model`` to the float ``dtype``; returns the number of tensors cast. Frozen adapter parameters (SubLoRA's
    mask) follow, so that the adapter computes in one dtype. The base model's weights, quantised or not, are
    left as they are; so are buffers (SEAL's passports are cast to the input's dtype where they are used)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype must be a floating-point torch.dtype (torch.bfloat16, torch.float32, ...), got {dtype!r}."
        )
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if adapter_name is not None and not any(
        adapter_name in getattr(layer, name, {}) for layer in layers for name in layer.adapter_layer_names
    ):
        raise ValueError(f"No layer of this model holds an adapter named {adapter_name!r}.")
    cast = 0
    for layer in layers:
        for container_name in (*layer.adapter_layer_names, *layer.other_param_names):
            container = getattr(layer, container_name, None)
            if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
                continue
            for name, entry in container.items():
                if adapter_name is not None and name != adapter_name:
                    continue
                tensors = entry.parameters() if isinstance(entry, nn.Module) else [entry]
                for tensor in tensors:
                    if tensor.is_floating_point() and tensor.dtype != dtype:
                        tensor.data = tensor.data.to(dtype)
                        cast += 1
    return cast


def autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    """``(torch.is_autocast_enabled(device_type), its dtype)``, and ``(False, None)`` for device types autocast does
    not know (the meta device, where the memory planner runs models without weights)."""
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except RuntimeError:
        return False, None
