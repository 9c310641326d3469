"""Matrix sensing with LoRA factors: the benchmark problem of ODELoRA (docs/odelora.md).

y_i = <X_i, W*> with Gaussian X_i and W* of rank r* and condition number kappa; a peft LoRA layer on a
frozen zero matrix learns W = s B A from the loss 1/2 ||X vec(W) / sqrt(M) - y||^2.

Public on purpose: it is the smallest problem on which a LoRA optimizer's convergence rate can be read off
(the exact solution is known and the conditioning is set by kappa), so users can check any optimizer on it
the way ``examples/odelora_sensing.py``, the tests and ``benchmarks/odelora_sensing.py`` check ODELoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class _Zero(nn.Module):
    def __init__(self, m: int, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n, m, bias=False)
        nn.init.zeros_(self.lin.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@dataclass
class SensingProblem:
    X: torch.Tensor | None  # (measurements, m * n), scaled by 1 / sqrt(measurements); None = W fully observed
    y: torch.Tensor
    W_star: torch.Tensor

    @classmethod
    def make(cls, m: int, n: int, rank: int, kappa: float, measurements: int, seed: int = 0) -> SensingProblem:
        g = torch.Generator().manual_seed(seed)
        U, _ = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))
        sigma = torch.logspace(0, -torch.log10(torch.tensor(float(kappa))).item(), rank, dtype=torch.float64)
        W_star = (U * sigma) @ V.T
        X = torch.randn(measurements, m * n, generator=g, dtype=torch.float64) / measurements**0.5
        return cls(X, X @ W_star.reshape(-1), W_star)

    @classmethod
    def fully_observed(cls, m: int, n: int, rank: int, kappa: float, seed: int = 0) -> SensingProblem:
        """The same W* observed entry by entry (X = identity): loss 1/2 ||W - W*||^2, cheap at any width."""
        W_star = cls.make(m, n, rank, kappa, measurements=1, seed=seed).W_star
        return cls(None, W_star.reshape(-1), W_star)

    def model(self, r: int, alpha: float | None = None, seed: int = 0) -> nn.Module:
        """A peft LoRA model whose delta weight s B A plays W (peft's default init: B = 0)."""
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        m, n = self.W_star.shape
        config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else r, target_modules=["lin"])
        return get_peft_model(_Zero(m, n).double(), config)

    @staticmethod
    def weight(model: nn.Module) -> torch.Tensor:
        layer = model.base_model.model.lin
        return layer.base_layer.weight + layer.get_delta_weight("default")

    def loss(self, model: nn.Module) -> torch.Tensor:
        w = self.weight(model).reshape(-1)
        residual = (w if self.X is None else self.X @ w) - self.y
        return 0.5 * residual.pow(2).sum()

    def error(self, model: nn.Module) -> float:
        with torch.no_grad():
            return float(
                torch.linalg.matrix_norm(self.weight(model) - self.W_star) / torch.linalg.matrix_norm(self.W_star)
            )
