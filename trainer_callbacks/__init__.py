"""Trainer callbacks for peft-ctrl methods (importing this also registers the methods with peft)."""

from .memory import MemoryReportCallback
from .odelora import ODELoRATrainer

__all__ = ["MemoryReportCallback", "ODELoRATrainer"]
