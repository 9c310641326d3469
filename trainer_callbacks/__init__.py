"""Trainer callbacks for peft-ctrl methods (importing this also registers the methods with peft)."""

from .adalora import AdaLoRACallback
from .memory import MemoryReportCallback
from .odelora import ODELoRAMixin, ODELoRATrainer
from .sublora import SubLoRACallback
from .timing import StepTimeCallback

__all__ = [
    "AdaLoRACallback",
    "MemoryReportCallback",
    "ODELoRAMixin",
    "ODELoRATrainer",
    "StepTimeCallback",
    "SubLoRACallback",
]
