from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._registry import move_adapter_to_base_device
from ..linear_adapter import LinearAdapterLayer
from .keys import deepcopy_in_memory

PICKLE_ERROR = (
    "A SEAL model holds passports derived from the owner's key, so it is not pickled (torch.save(model), "
    "pickle.dumps): save the adapter with model.save_pretrained(...) (no key, no passport in it), or release it "
    "as plain LoRA with peft_ctrl.seal.release.release(...) first."
)


class SealLayer(LinearAdapterLayer):
    """An ``nn.Linear`` with SEAL adapters: ``h = W x + s * B C A x`` per active adapter.

    ``seal_A``/``seal_B`` hold the trainable factors keyed by adapter name; ``seal_passport`` holds each
    adapter's frozen r x r passport C as a plain dict, so it is in no ``state_dict`` and never saved.
    """

    adapter_layer_names = ("seal_A", "seal_B")
    other_param_names = ("seal_r", "seal_scaling", "seal_dropout", "seal_passport")

    method_name = "SEAL"

    def __init__(self, base_layer: nn.Linear, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(base_layer)
        self.seal_A = nn.ModuleDict()
        self.seal_B = nn.ModuleDict()
        self.seal_dropout = nn.ModuleDict()
        self.seal_r: dict[str, int] = {}
        self.seal_scaling: dict[str, float] = {}
        self.seal_passport: dict[str, torch.Tensor] = {}
        self.update_layer(adapter_name, **kwargs)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        scaling: float,
        dropout: float,
        init_weights: bool = True,
        inference_mode: bool = False,
    ) -> None:
        """Add adapter ``adapter_name``; its passport and initial A come next, from ``set_key_material`` (they
        depend on the structure of the whole adapter, which is known once every layer has one)."""
        weight = self.base_layer.weight
        self.seal_r[adapter_name] = r
        self.seal_scaling[adapter_name] = scaling
        self.seal_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.seal_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=weight.device)
        self.seal_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, device=weight.device)
        with torch.no_grad():
            if init_weights:
                nn.init.zeros_(self.seal_B[adapter_name].weight)
            else:
                nn.init.normal_(self.seal_B[adapter_name].weight, std=0.02)
        move_adapter_to_base_device(self, adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_key_material(self, adapter_name: str, passport: torch.Tensor, initial_a: torch.Tensor) -> None:
        """The adapter's frozen passport C and its key-derived initial A."""
        r = self.seal_r[adapter_name]
        if passport.shape != (r, r) or initial_a.shape != (r, self.in_features):
            raise ValueError(f"SEAL adapter {adapter_name!r}: passport or initial A has the wrong shape for r={r}.")
        weight = self.seal_A[adapter_name].weight
        if not weight.is_meta:  # low_cpu_mem_usage: the weights come from a checkpoint
            with torch.no_grad():
                weight.copy_(initial_a)
        self.seal_passport[adapter_name] = passport.to(torch.float32)

    def _passport(self, adapter: str, like: torch.Tensor) -> torch.Tensor:
        return self.seal_passport[adapter].to(device=like.device, dtype=like.dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """s * B C A, the change this adapter makes to the base weight."""
        A, B = self.seal_A[adapter].weight, self.seal_B[adapter].weight
        return self.seal_scaling[adapter] * (B @ self._passport(adapter, A) @ A)

    def delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """s * B C A dropout(x), through the fused low-rank op with C A as its first factor."""
        A, B = self.seal_A[adapter].weight, self.seal_B[adapter].weight
        CA = self._passport(adapter, A) @ A
        return self.low_rank(x, CA, B, self.seal_scaling[adapter], self.seal_dropout[adapter])

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(PICKLE_ERROR)

    def __deepcopy__(self, memo: dict) -> SealLayer:
        """An in-memory copy (passports included); only pickling is refused."""
        return deepcopy_in_memory(self, memo)

    def __repr__(self) -> str:
        return "seal." + super().__repr__()
