from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from peft_ctrl._registry import StrictLoadMixin
from peft_ctrl.linear_adapter import install_linear_adapter, linear_base

from .config import SealConfig
from .keys import initial_a, key_schedule, passport
from .layer import SealLayer


class SealModel(StrictLoadMixin, BaseTuner):
    """Adds SEAL adapters (LoRA with a key-derived passport, docs/seal.md) to the target Linear modules.

    The passport and initial A of ``model.layers.0.self_attn.q_proj`` depend on the key, that name and the key
    schedule: the hash of the adapter's whole structure (every adapted module's name, shape and rank), so release
    and verification re-derive them without storing them, and nothing of one module can be varied alone.
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
        config.secret_key()  # refuse a wrong key before any layer is changed
        linear_base(target, "SEAL", current_key)
        kwargs = {
            "r": config.r,
            "scaling": config.scaling,
            "dropout": config.lora_dropout,
            "init_weights": config.init_weights,
        }
        install_linear_adapter(self, SealLayer, adapter_name, target, target_name, parent, current_key, **kwargs)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """peft's injection, then every layer's passport and initial A from the key and the adapter's structure
        (known only once every target layer holds the adapter)."""
        config = self.peft_config[adapter_name]
        fresh = config.commitment is None  # a new adapter, not one being loaded
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        layers = {
            name: layer
            for name, layer in model.named_modules()
            if isinstance(layer, SealLayer) and adapter_name in layer.seal_r
        }
        structure = tuple((name, m.out_features, m.in_features, m.seal_r[adapter_name]) for name, m in layers.items())
        schedule = key_schedule(structure)
        if config.schedule is None and not fresh:
            raise ValueError(
                f"SEAL adapter {adapter_name!r} has a key commitment but no key schedule: it was trained by a "
                "peft-ctrl version whose key rows depended on module names alone, which let a claimant vary them one "
                "module at a time. Train it again with this version."
            )
        if config.schedule is None:
            config.schedule = schedule
        elif config.schedule != schedule:
            raise ValueError(
                f"SEAL adapter {adapter_name!r} was trained on another structure (module names, shapes or ranks) than "
                f"this model gives it ({len(layers)} modules): load it onto the model and target modules it was "
                "trained with."
            )
        key = config.secret_key()
        for name, layer in layers.items():
            r = layer.seal_r[adapter_name]
            layer.set_key_material(
                adapter_name,
                passport(key, schedule, name, r),
                initial_a(key, schedule, name, r, layer.in_features) * config.init_a_scale,
            )
