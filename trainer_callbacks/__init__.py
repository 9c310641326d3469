"""Trainer callbacks for peft-ctrl methods (importing this also registers the methods with peft)."""

from .memory import MemoryReportCallback

__all__ = ["MemoryReportCallback"]
