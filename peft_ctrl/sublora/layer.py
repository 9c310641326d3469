from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._registry import move_adapter_to_base_device
from ..factors import product_svd
from ..linear_adapter import LinearAdapterLayer


class FrozenParameterDict(nn.ParameterDict):
    """A ParameterDict whose entries never require grad, however they are assigned: ``ParameterDict`` wraps a
    plain tensor in a trainable Parameter, and peft re-assigns adapter tensors that way when it upcasts a bf16
    or fp16 adapter to fp32 (``autocast_adapter_dtype``), which made the 0/1 mask trainable on bf16 bases."""

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self[key].requires_grad_(False)


class SubLoRALayer(LinearAdapterLayer):
    """An ``nn.Linear`` with SVD-form adapters: ``h = W x + s * P diag(lambda * mask) Q x``.

    ``mask`` (0/1, not trainable, saved with the adapter) removes components; ``truncate`` drops them.
    """

    adapter_layer_names = ("sublora_P", "sublora_lambda", "sublora_Q")
    other_param_names = ("sublora_mask", "sublora_scaling", "sublora_dropout")

    method_name = "SubLoRA"

    def __init__(self, base_layer: nn.Linear, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(base_layer)
        self.sublora_P = nn.ParameterDict()
        self.sublora_lambda = nn.ParameterDict()
        self.sublora_Q = nn.ParameterDict()
        self.sublora_mask = FrozenParameterDict()
        self.sublora_dropout = nn.ModuleDict()
        self.sublora_scaling: dict[str, float] = {}
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
        weight = self.base_layer.weight
        # AdaLoRA's initialisation: P, Q small random, lambda = 0, so the adapted model starts as the base.
        self.sublora_P[adapter_name] = nn.Parameter(torch.randn(self.out_features, r, device=weight.device) * 0.02)
        self.sublora_Q[adapter_name] = nn.Parameter(torch.randn(r, self.in_features, device=weight.device) * 0.02)
        lam = torch.zeros(r, device=weight.device) if init_weights else torch.randn(r, device=weight.device)
        self.sublora_lambda[adapter_name] = nn.Parameter(lam)
        self.sublora_mask[adapter_name] = nn.Parameter(torch.ones(r, device=weight.device), requires_grad=False)
        self.sublora_scaling[adapter_name] = scaling
        self.sublora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        move_adapter_to_base_device(self, adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)
        self.sublora_mask[adapter_name].requires_grad_(False)

    def components(self, adapter: str) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter, nn.Parameter]:
        """The adapter's (P, lambda, Q, mask) parameters."""
        stores = (self.sublora_P, self.sublora_lambda, self.sublora_Q, self.sublora_mask)
        return tuple(store[adapter] for store in stores)

    def rank(self, adapter: str) -> int:
        return int(self.sublora_mask[adapter].sum())

    def effective_lambda(self, adapter: str) -> torch.Tensor:
        # The mask follows lambda's dtype (0 and 1 are exact in any): trainers that cast only the trainable
        # parameters (TRL over a quantised base casts them to bf16) leave the frozen mask in float32.
        lam = self.sublora_lambda[adapter]
        return lam * self.sublora_mask[adapter].to(lam.dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        P, Q = self.sublora_P[adapter], self.sublora_Q[adapter]
        return self.sublora_scaling[adapter] * (P * self.effective_lambda(adapter)) @ Q

    @torch.no_grad()
    def to_svd_form(self, adapter: str) -> None:
        """Rewrite the kept components as the singular triplets of the delta W they make (largest first, then
        the removed ones): outputs are unchanged, P's columns and Q's rows become orthonormal, and masking the
        last kept components is then the best truncation of delta W in Frobenius norm.

        ``peft_ctrl.factors.product_svd``: two thin QRs and the SVD of a k x k matrix (k kept components), never
        an SVD of W.
        """
        P, lam, Q, mask = self.components(adapter)
        kept = mask > 0
        k = int(kept.sum())
        if k == 0:
            return
        U, S, Vh = product_svd(P[:, kept] * lam[kept], Q[kept])
        order = torch.cat([torch.nonzero(kept).flatten(), torch.nonzero(~kept).flatten()])
        new_P, new_Q, new_lam = P[:, order].clone(), Q[order].clone(), lam[order].clone()
        new_P[:, :k] = U.to(P.dtype)
        new_Q[:k] = Vh.to(Q.dtype)
        new_lam[:k] = S.to(lam.dtype)
        P.copy_(new_P)
        Q.copy_(new_Q)
        lam.copy_(new_lam)
        mask.copy_(torch.arange(mask.numel(), device=mask.device) < k)

    @torch.no_grad()
    def truncate(self, adapter: str) -> int:
        """Physically drop the masked components; returns the kept count (outputs are unchanged)."""
        keep = self.sublora_mask[adapter] > 0
        for store, index in ((self.sublora_P, (slice(None), keep)), (self.sublora_Q, (keep,))):
            store[adapter] = nn.Parameter(store[adapter][index].clone(), requires_grad=store[adapter].requires_grad)
        for store in (self.sublora_lambda, self.sublora_mask):
            store[adapter] = nn.Parameter(store[adapter][keep].clone(), requires_grad=store[adapter].requires_grad)
        return int(keep.sum())

    def delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """s * P diag(lambda * mask) Q dropout(x), through the fused low-rank op."""
        P, Q = self.sublora_P[adapter], self.sublora_Q[adapter]
        B = P * self.effective_lambda(adapter)
        return self.low_rank(x, Q, B, self.sublora_scaling[adapter], self.sublora_dropout[adapter])

    def __repr__(self) -> str:
        return "sublora." + super().__repr__()
