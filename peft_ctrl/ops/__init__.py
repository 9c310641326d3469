"""Fused low-rank op shared by the methods (docs/ops.md)."""

from ._dispatch import force_triton, triton_available, triton_reason
from .lean_lora import lean_lora
from .lean_mlp import lean_mlp, restore_mlp, swiglu
from .lowrank import dropout_probability, keep_mask, lowrank

__all__ = [
    "dropout_probability",
    "force_triton",
    "keep_mask",
    "lean_lora",
    "lean_mlp",
    "lowrank",
    "restore_mlp",
    "swiglu",
    "triton_available",
    "triton_reason",
]
