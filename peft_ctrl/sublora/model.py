from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING
from torch import nn

from peft_ctrl._registry import StrictLoadMixin

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
        base = target.get_base_layer() if isinstance(target, SubLoRALayer) else target
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"SubLoRA adapts torch.nn.Linear modules only; {current_key!r} is a {type(base).__name__}. Narrow "
                "target_modules to Linear layers."
            )
        rank = (config.rank_pattern or {}).get(current_key, config.r)
        kwargs = {
            "r": rank,
            "scaling": config.lora_alpha / config.r,
            "dropout": config.lora_dropout,
            "init_weights": config.init_weights,
            "inference_mode": config.inference_mode,
        }
        if isinstance(target, SubLoRALayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = SubLoRALayer(target, adapter_name, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

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
