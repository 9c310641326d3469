"""What a verifier tests: a suspect's LoRA factors, or a merged model's dense deltas against its base."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..factors import product_svd, seeded_svd_lowrank
from .canonical import align_merged
from .io import LoraFactors, read_adapter


def _real(t: torch.Tensor) -> torch.Tensor:
    """fp32 or fp64 as given (half precision is widened): the thin factors are only ever QR-factorised."""
    return t.detach() if t.dtype in (torch.float32, torch.float64) else t.detach().float()


@dataclass
class Suspect:
    """What is verified: per module, either LoRA factors or a dense delta W (merged model minus base)."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    note: str = ""  # how a merged suspect was aligned to its base (see peft_ctrl.seal.canonical)
    _svd: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.factors = {m: (_real(B), _real(A)) for m, (B, A) in self.factors.items()}
        self.deltas = {m: _real(d) for m, d in self.deltas.items()}

    @classmethod
    def from_adapter(cls, adapter: LoraFactors | str | Path) -> Suspect:
        if not isinstance(adapter, LoraFactors):
            adapter = read_adapter(adapter, expect=("LORA",))
        return cls(factors={m: (B * adapter.scaling, A) for m, (B, A) in adapter.factors.items()})

    @classmethod
    def from_merged(cls, weights: dict[str, torch.Tensor], base: dict[str, torch.Tensor], rank: int = 64) -> Suspect:
        """Suspect from a merged model's state dict and its base model's (``module.weight`` names). The suspect
        is first brought back to the base's coordinates (``peft_ctrl.seal.canonical.align_merged``: residual
        rotations, folded norm gains, head and neuron permutations); ``rank`` bounds the delta rank that the
        norm-gain fit leaves alone (the owner's LoRA rank or more)."""
        matrices = [n for n, w in weights.items() if w.dim() == 2]
        shared = sum(n in base and base[n].shape == weights[n].shape for n in matrices)
        if 2 * shared < len(matrices):  # a merge into the base keeps every name and shape
            raise ValueError(
                f"Only {shared} of the merged model's {len(matrices)} 2-D weights have a weight of the same name and "
                f"shape in --base ({sum(w.dim() == 2 for w in base.values())} 2-D weights): --base is not the model "
                "the adapter was merged into (another architecture, size or naming)."
            )
        aligned, alignment = align_merged(weights, base, rank)
        deltas = {n[: -len(".weight")]: w - base[n].double() for n, w in aligned.items() if n.endswith(".weight")}
        if not deltas and alignment.unmatched:
            shown = ", ".join(alignment.unmatched[:5]) + (" ..." if len(alignment.unmatched) > 5 else "")
            raise ValueError(
                f"{len(alignment.unmatched)} weights of the merged model differ from the base, but no documented "
                f"transform (residual rotation, norm gains, head and neuron permutations) aligns them: {shown}."
            )
        if not deltas:
            raise ValueError(
                "The merged model does not differ from the base model in any 2-D weight that could be aligned with "
                "it (is --base the model the adapter was merged into?)."
            )
        return cls(deltas=deltas, note=alignment.summary())

    def modules(self) -> list[str]:
        return sorted({*self.factors, *self.deltas})

    def shape(self, module: str) -> tuple[int, int]:
        if module in self.factors:
            B, A = self.factors[module]
            return B.shape[0], A.shape[1]
        return tuple(self.deltas[module].shape)

    def row_space(self, module: str, k: int) -> torch.Tensor:
        """Orthonormal basis (n x k') of the top-k row space of delta W; k' <= k drops null directions."""
        if module in self.factors:
            # The right singular vectors of B A, from an r x r core (peft_ctrl.factors.product_svd).
            B, A = self.factors[module]
            _, S, Vh = product_svd(B.double(), A.double())
            keep = int((S[:k] > S[0] * 1e-7).sum()) if S[0] > 0 else 0
            return Vh[:keep].T
        S, Vh = self._delta_svd(module, k)
        keep = int((S[:k] > S[0] * 1e-9).sum()) if S.numel() and S[0] > 0 else 0
        return Vh[:keep].T.double()

    def spike(self, module: str, k: int) -> float | None:
        """For a dense delta: its largest singular value over its (k+1)-th (inf for an exact rank-k delta; None
        when its smaller side is not above k, so any delta is of rank k). A rank-k update above a noise floor
        (rounding, added noise) stands far out (hundreds); noise alone stays near its bulk (about 1 to 3)."""
        if min(self.deltas[module].shape) <= k:
            return None
        S, _ = self._delta_svd(module, k)
        return float(S[0] / S[k]) if S[k] > 0 else math.inf

    def _delta_svd(self, module: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top singular values and right vectors of a dense delta (at least k + 1 of them)."""
        if (module, k) not in self._svd:
            d = self.deltas[module]
            if min(d.shape) > 4 * k + 64:
                _, S, V = seeded_svd_lowrank(d, q=k + 16, niter=4)
                self._svd[module, k] = (S, V.T)
            else:
                _, S, Vh = torch.linalg.svd(d, full_matrices=False)
                self._svd[module, k] = (S, Vh)
        return self._svd[module, k]

    def core(self, module: str, B0: torch.Tensor, A0: torch.Tensor) -> torch.Tensor:
        """C_hat = B0^+ delta W A0^+ (never forms delta W for an adapter)."""
        # B0^+ = (B0^T B0)^+ B0^T and A0^+ = A0^T (A0 A0^T)^+: only r x r pseudo-inverses.
        B0, A0 = B0.double(), A0.double()
        left, right = torch.linalg.pinv(B0.T @ B0), torch.linalg.pinv(A0 @ A0.T)
        if module in self.factors:
            B, A = self.factors[module]
            return left @ (B0.T @ B.double()) @ (A.double() @ A0.T) @ right
        return left @ (B0.T @ self.deltas[module].double() @ A0.T) @ right
