"""Measurement helpers shared by every method (DESIGN.md section 7)."""

from .memory import SavedTensorMeter, saved_activation_bytes

__all__ = ["SavedTensorMeter", "saved_activation_bytes"]
