from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..distributed.zero import require_gathered


class SealLayer(nn.Module, BaseTunerLayer):
    """An ``nn.Linear`` with SEAL adapters: ``h = W x + s * B C A x`` per active adapter.

    ``seal_A``/``seal_B`` hold the trainable factors keyed by adapter name; ``seal_passport`` holds each
    adapter's frozen r x r passport C as a plain dict, so it is in no ``state_dict`` and never saved.
    """

    adapter_layer_names = ("seal_A", "seal_B")
    other_param_names = ("seal_r", "seal_scaling", "seal_dropout", "seal_passport")

    def __init__(self, base_layer: nn.Linear, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"SEAL adapts torch.nn.Linear modules only, got {type(base_layer).__name__}; choose Linear "
                "target_modules."
            )
        self.base_layer = base_layer
        self.seal_A = nn.ModuleDict()
        self.seal_B = nn.ModuleDict()
        self.seal_dropout = nn.ModuleDict()
        self.seal_r: dict[str, int] = {}
        self.seal_scaling: dict[str, float] = {}
        self.seal_passport: dict[str, torch.Tensor] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.update_layer(adapter_name, **kwargs)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        scaling: float,
        dropout: float,
        passport: torch.Tensor,
        initial_a: torch.Tensor,
        init_weights: bool = True,
        inference_mode: bool = False,
    ) -> None:
        if passport.shape != (r, r) or initial_a.shape != (r, self.in_features):
            raise ValueError(f"SEAL adapter {adapter_name!r}: passport or initial A has the wrong shape for r={r}.")
        weight = self.base_layer.weight
        self.seal_r[adapter_name] = r
        self.seal_scaling[adapter_name] = scaling
        self.seal_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.seal_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=weight.device)
        self.seal_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, device=weight.device)
        with torch.no_grad():
            self.seal_A[adapter_name].weight.copy_(initial_a)
            if init_weights:
                nn.init.zeros_(self.seal_B[adapter_name].weight)
            else:
                nn.init.normal_(self.seal_B[adapter_name].weight, std=0.02)
        self.seal_passport[adapter_name] = passport.to(torch.float32)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _passport(self, adapter: str, like: torch.Tensor) -> torch.Tensor:
        return self.seal_passport[adapter].to(device=like.device, dtype=like.dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """s * B C A, the change this adapter makes to the base weight."""
        A, B = self.seal_A[adapter].weight, self.seal_B[adapter].weight
        return self.seal_scaling[adapter] * (B @ self._passport(adapter, A) @ A)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.seal_A:
                continue
            weight = self.base_layer.weight
            require_gathered([weight, *self.parameters()], f"merge SEAL adapter {adapter!r}")
            merged = weight.data + self.get_delta_weight(adapter).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"Merging SEAL adapter {adapter!r} gives non-finite weights; the model is unchanged.")
            weight.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            weight = self.base_layer.weight
            weight.data -= self.get_delta_weight(adapter).to(weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter not in self.seal_A:
                continue
            A = self.seal_A[adapter]
            z = A(self.seal_dropout[adapter](x.to(A.weight.dtype)))
            z = F.linear(z, self._passport(adapter, z))
            result = result + self.seal_scaling[adapter] * self.seal_B[adapter](z).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "seal." + super().__repr__()
