from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING
from torch import nn

from peft_ctrl._registry import StrictLoadMixin
from peft_ctrl.linear_adapter import install_linear_adapter

from .config import SubLoRAConfig
from .layer import SubLoRALayer


class SubLoRAModel(StrictLoadMixin, BaseTuner):
    """Adds SubLoRA adapters to the target Linear modules; ``rank_pattern`` sets each module's size on load."""

    prefix: str = "sublora_"
    method_name = "SubLoRA"
    tuner_layer_cls = SubLoRALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        config: SubLoRAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        kwargs = {
            "r": (config.rank_pattern or {}).get(current_key, config.r),
            "scaling": config.lora_alpha / config.r,
            "dropout": config.lora_dropout,
            "init_weights": config.init_weights,
            "inference_mode": config.inference_mode,
        }
        install_linear_adapter(self, SubLoRALayer, adapter_name, target, target_name, parent, current_key, **kwargs)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for name, param in model.named_parameters():
            if "sublora_mask" in name:
                param.requires_grad_(False)

    def sublora_layers(self, adapter_name: str = "default") -> dict[str, SubLoRALayer]:
        """{module path: layer} of every layer carrying ``adapter_name``, in model order."""
        return {
            name.removeprefix("model."): module
            for name, module in self.named_modules()
            if isinstance(module, SubLoRALayer) and adapter_name in module.sublora_P
        }

    def truncate(self, adapter_name: str = "default") -> dict[str, int]:
        """Drop masked components from every layer and record the ranks in the config's ``rank_pattern``, so
        the saved adapter is smaller and loads back with identical outputs. Call it after training: it
        replaces the adapter's parameters, so an optimizer built before no longer points at them."""
        pattern = {name: layer.truncate(adapter_name) for name, layer in self.sublora_layers(adapter_name).items()}
        self.peft_config[adapter_name].rank_pattern = pattern
        return pattern
