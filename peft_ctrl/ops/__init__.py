"""Fused low-rank op shared by the methods (docs/ops.md)."""

from ._dispatch import force_triton, triton_available
from .lean_lora import lean_lora
from .lowrank import dropout_probability, keep_mask, lowrank

__all__ = ["dropout_probability", "force_triton", "keep_mask", "lean_lora", "lowrank", "triton_available"]
