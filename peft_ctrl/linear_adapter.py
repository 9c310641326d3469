"""What every adapter on an ``nn.Linear`` shares (SEAL, SubLoRA): the Linear check, merge and unmerge over
``get_delta_weight``, and the forward loop over the active adapters' ``delta``. Modelled on peft's
``LycorisLayer``; a method keeps only its parameters (``update_layer``), ``get_delta_weight`` and ``delta``.

The tuner side (``install_linear_adapter``) builds or updates the layer for one target module.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .dtypes import autocast_state
from .ops import dropout_probability, lowrank
from .sharding import require_gathered


def linear_base(target: nn.Module, method: str, key: str) -> nn.Linear:
    """The ``nn.Linear`` under ``target`` (the target itself, or the base of an adapter layer already there)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, nn.Linear):
        raise ValueError(
            f"{method} adapts torch.nn.Linear modules only; {key!r} is a {type(base).__name__}. Narrow "
            "target_modules to Linear layers."
        )
    return base


class LinearAdapterLayer(nn.Module, BaseTunerLayer):
    """An ``nn.Linear`` plus per-adapter low-rank deltas: ``h = W x + sum over active adapters of delta(x)``.

    Subclasses set ``method_name`` and ``adapter_layer_names`` (the first entry's keys are the adapters the
    layer holds), create their containers after ``super().__init__(base_layer)``, and implement
    ``update_layer``, ``get_delta_weight(adapter)`` (the change to W) and ``delta(adapter, x)`` (its product
    with x, computed without forming it).
    """

    method_name: str

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"{self.method_name} adapts torch.nn.Linear modules only, got {type(base_layer).__name__}."
            )
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def holds(self, adapter: str) -> bool:
        return adapter in getattr(self, self.adapter_layer_names[0])

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise NotImplementedError

    def delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def low_rank(
        self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, dropout: nn.Module
    ) -> torch.Tensor:
        """``scale * dropout(x) A^T B^T`` through ``ops.lowrank``, with x cast to the adapter's dtype outside
        autocast (the way every ``delta`` feeds its factors)."""
        if not autocast_state(x.device.type)[0]:
            x = x.to(A.dtype)
        return lowrank(x, A, B, scale, dropout_probability(dropout), training=self.training)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if not self.holds(adapter):
                continue
            weight = self.base_layer.weight
            if not weight.is_floating_point():
                raise ValueError(
                    f"Cannot merge {self.method_name} adapter {adapter!r} into a quantised base layer "
                    f"({type(self.base_layer).__name__}, {weight.dtype} storage): the merged weight would have to be "
                    "quantised again, which changes it. Load the base model unquantised (bf16 or fp32), load the "
                    "adapter onto it, and merge there; the model is unchanged."
                )
            require_gathered([weight, *self.parameters()], f"merge {self.method_name} adapter {adapter!r}")
            merged = weight.data + self.get_delta_weight(adapter).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"Merging {self.method_name} adapter {adapter!r} gives non-finite weights; the model is unchanged."
                )
            weight.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            weight = self.base_layer.weight
            weight.data -= self.get_delta_weight(adapter).to(weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for adapter in self.active_adapters:
            if self.holds(adapter):
                result = result + self.delta(adapter, x).to(result.dtype)
        return result


def install_linear_adapter(
    tuner: Any,
    layer_cls: type[LinearAdapterLayer],
    adapter_name: str,
    target: nn.Module,
    target_name: str,
    parent: nn.Module,
    key: str,
    **kwargs: Any,
) -> None:
    """Add adapter ``adapter_name`` to ``target`` (module path ``key``): update the layer already there, or wrap
    the Linear in a new ``layer_cls`` (frozen unless the adapter is active) and put it in ``parent`` under
    ``target_name``. Anything but a Linear is a ``ValueError`` naming the module."""
    linear_base(target, layer_cls.method_name, key)
    if isinstance(target, layer_cls):
        target.update_layer(adapter_name, **kwargs)
        return
    new_module = layer_cls(target, adapter_name, **kwargs)
    if adapter_name not in tuner.active_adapters:
        new_module.requires_grad_(False)
    tuner._replace_module(parent, target_name, new_module, target)
