"""SubLoRA: second-order, submodular rank allocation for SVD-form adapters (docs/sublora.md)."""

from peft_ctrl._registry import register

from .allocator import greedy_select, project_submodular
from .config import SubLoRAConfig
from .layer import SubLoRALayer
from .model import SubLoRAModel

__all__ = ["SubLoRAConfig", "SubLoRALayer", "SubLoRAModel", "greedy_select", "project_submodular"]

register("sublora", config_cls=SubLoRAConfig, model_cls=SubLoRAModel, prefix=SubLoRAModel.prefix)
