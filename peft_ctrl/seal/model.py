from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from peft_ctrl._registry import StrictLoadMixin
from peft_ctrl.linear_adapter import install_linear_adapter, linear_base

from .config import SealConfig
from .keys import initial_a, passport
from .layer import SealLayer


class SealModel(StrictLoadMixin, BaseTuner):
    """Adds SEAL adapters (LoRA with a key-derived passport, docs/seal.md) to the target Linear modules.

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
        base = linear_base(target, "SEAL", current_key)
        kwargs = {
            "r": config.r,
            "scaling": config.scaling,
            "dropout": config.lora_dropout,
            "passport": passport(key, current_key, config.r),
            "initial_a": initial_a(key, current_key, config.r, base.in_features),
            "init_weights": config.init_weights,
        }
        install_linear_adapter(self, SealLayer, adapter_name, target, target_name, parent, current_key, **kwargs)
