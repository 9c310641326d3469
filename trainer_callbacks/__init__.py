"""Trainer callbacks for peft-ctrl methods (importing this also registers the methods with peft)."""

from .memory import MemoryReportCallback
from .odelora import ODELoRAMixin, ODELoRATrainer
from .sublora import SubLoRACallback

__all__ = ["MemoryReportCallback", "ODELoRAMixin", "ODELoRATrainer", "SubLoRACallback"]
