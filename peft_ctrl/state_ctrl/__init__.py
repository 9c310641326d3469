"""State-based parallel control: one low-rank edge per residual sub-block (docs/state_ctrl.md)."""

from peft_ctrl._registry import register

from .architectures import ARCHITECTURES, Architecture
from .config import StateCtrlConfig
from .layer import StateCtrlLayer, StateCtrlLoraLayer
from .model import StateCtrlModel, resolve_bridges

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "StateCtrlConfig",
    "StateCtrlLayer",
    "StateCtrlLoraLayer",
    "StateCtrlModel",
    "resolve_bridges",
]

register("state_ctrl", config_cls=StateCtrlConfig, model_cls=StateCtrlModel, prefix=StateCtrlModel.prefix)
