"""QLoRA's base model for the planner: nf4 weights with double quantisation, on the meta device or a real one.

``quantize_nf4`` replaces the linear layers of a model built from its config with bitsandbytes' ``Linear4bit``, as
``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True))`` loads them (every ``nn.Linear`` but the output embedding; a test holds the two to
the same modules and bytes). bitsandbytes' quantisation and 4-bit matmul have meta kernels, so a meta model quantises
without weights and its forward and backward run the real ``MatMul4Bit`` autograd function.
"""

from __future__ import annotations

import torch
from torch import nn

from ..metrics.memory import _storage_key


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ValueError(
            "Planning QLoRA or QControl needs bitsandbytes, which quantises the base: "
            "pip install 'peft-ctrl[quantized]' (or bitsandbytes>=0.50)."
        ) from err
    return bitsandbytes


def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """``model`` with every ``nn.Linear`` except its output embedding held in nf4 (block 64, double quantisation,
    uint8 storage), computing in ``compute_dtype``; on the device its weights are on (meta included)."""
    bnb = _bitsandbytes()
    # bitsandbytes caches the code book of double quantisation on the device of the first tensor it quantises; a
    # meta one would break every later quantisation on a real device, so the cache holds a CPU copy (moved per call).
    cached = bnb.functional.name2qmap.get("dynamic")
    if cached is None or cached.is_meta:
        bnb.functional.name2qmap["dynamic"] = bnb.functional.create_dynamic_map()
    keep = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child is keep:
                continue
            device = child.weight.device
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
                device=device,
            )
            weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=layer
            )
            layer.weight = weight._quantize(device)
            if child.bias is not None:
                layer.bias = child.bias
            setattr(parent, name, layer)
    model.is_loaded_in_4bit = True
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter's storage, and of the quantisation state of nf4 weights (block scales, their own
    scales, offset and code books), each storage once."""
    storages: dict[tuple[str, int], int] = {}
    for param in model.parameters():
        tensors = [param]
        state = getattr(param, "quant_state", None)
        while state is not None:
            tensors += [state.absmax, state.code, getattr(state, "offset", None)]
            state = state.state2 if state.nested else None
        for t in tensors:
            if t is not None:
                storages[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(storages.values())
