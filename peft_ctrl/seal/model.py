from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from peft_ctrl._registry import StrictLoadMixin

from .config import SealConfig
from .keys import initial_a, passport
from .layer import SealLayer


class SealModel(StrictLoadMixin, BaseTuner):
    """Adds SEAL adapters (LoRA with a key-derived passport, DESIGN.md section 9) to the target Linear modules.

    Module names are the keys of the PRF: the passport and initial A of ``model.layers.0.self_attn.q_proj``
    depend only on the key and that name, so release and verification re-derive them without storing them.
    """

    prefix: str = "seal_"
    method_name = "SEAL"
    tuner_layer_cls = SealLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        config: SealConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        key = config.secret_key()
        base = target.get_base_layer() if isinstance(target, SealLayer) else target
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"SEAL adapts torch.nn.Linear modules only; {current_key!r} is a {type(base).__name__}. Narrow "
                "target_modules to Linear layers."
            )
        kwargs = {
            "r": config.r,
            "scaling": config.scaling,
            "dropout": config.lora_dropout,
            "passport": passport(key, current_key, config.r),
            "initial_a": initial_a(key, current_key, config.r, base.in_features),
            "init_weights": config.init_weights,
        }
        if isinstance(target, SealLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = SealLayer(target, adapter_name, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
