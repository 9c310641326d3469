"""State-based parallel control: one low-rank edge per residual sub-block (docs/state_ctrl.md)."""

from peft_ctrl._registry import register

from .config import StateCtrlConfig
from .decompose import SubBlock
from .layer import StateCtrlLayer, StateCtrlLoraLayer
from .model import StateCtrlModel
from .placement import find_bridges

__all__ = [
    "StateCtrlConfig",
    "StateCtrlLayer",
    "StateCtrlLoraLayer",
    "StateCtrlModel",
    "SubBlock",
    "find_bridges",
]

register("state_ctrl", config_cls=StateCtrlConfig, model_cls=StateCtrlModel, prefix=StateCtrlModel.prefix)
