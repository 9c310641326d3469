"""Measurement helpers shared by every method (docs/state_ctrl.md, "Measuring activation memory")."""

from .memory import SavedTensorMeter, saved_activation_bytes

__all__ = ["SavedTensorMeter", "saved_activation_bytes"]
