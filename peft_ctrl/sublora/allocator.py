"""Rank allocation as submodular maximisation of a second-order model of the loss (docs/sublora.md).

Components (one singular triplet of one layer each) are kept (x_i = 1) or removed (x_i = 0). Around the
current singular values lambda the loss of the kept set is modelled as

    L(lambda * x) ~ L + g^T (x - 1) + 1/2 (x - 1)^T H (x - 1),   g = lambda * grad L,
                                                                H = diag(lambda) Hess L diag(lambda),

and the utility of a kept set S is F(S) = -(model at x = 1_S). For i != j the second difference of F is
-H_ij, so F is submodular exactly when every off-diagonal H_ij >= 0. ``project_submodular`` is the
Frobenius-nearest such matrix (symmetrise, clamp off-diagonals at 0 from below, keep the diagonal).

``greedy_select`` adds the component with the largest marginal gain until the budget is met, keeping
u = H (x - 1) up to date, so each gain is O(1) and each pick O(d). What it guarantees: with a projected
(submodular) H, if F is also monotone on the candidates (every gain at the full set is >= 0, checked by
``is_monotone``), the greedy set is within (1 - 1/e) of the best set of the same size, measured from the
empty set (Nemhauser, Wolsey, Fisher 1978); with a diagonal H the objective is modular and greedy is
optimal. Submodular maximisation under a cardinality constraint is NP-hard in general, so greedy can miss
the optimum on instances that are submodular but not modular; the tests check both statements.
"""

from __future__ import annotations

import itertools

import torch


def curvature_model(lam: torch.Tensor, grad: torch.Tensor, hess: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, H) of the quadratic model in the keep-mask x from dL/dlambda and d2L/dlambda2."""
    return lam * grad, lam[:, None] * hess * lam[None, :]


def project_submodular(H: torch.Tensor) -> torch.Tensor:
    """The nearest (Frobenius) symmetric matrix whose off-diagonal entries are >= 0."""
    sym = (H + H.T) / 2
    out = sym.clamp(min=0)
    out.diagonal().copy_(sym.diagonal())
    return out


def is_submodular(H: torch.Tensor, tol: float = 0.0) -> bool:
    off = H - torch.diag(H.diagonal())
    return bool((off >= -tol).all())


def utility(g: torch.Tensor, H: torch.Tensor, keep: torch.Tensor) -> float:
    """F(S) = -(g^T y + 1/2 y^T H y) with y = 1_S - 1 (the model's loss change, negated)."""
    y = keep.to(g.dtype) - 1
    return float(-(g @ y + 0.5 * y @ H @ y))


def _check(g: torch.Tensor, H: torch.Tensor, budget: int, alive: torch.Tensor | None) -> torch.Tensor:
    d = g.numel()
    if H.shape != (d, d):
        raise ValueError(f"H must be {d} x {d} for {d} components, got {tuple(H.shape)}.")
    if not (torch.isfinite(g).all() and torch.isfinite(H).all()):
        raise ValueError("The curvature model holds NaN or inf (gradient or Hessian); nothing was masked.")
    alive = torch.ones(d, dtype=torch.bool) if alive is None else alive.to(torch.bool)
    if not 0 <= budget <= int(alive.sum()):
        raise ValueError(f"budget must be between 0 and the {int(alive.sum())} selectable components, got {budget}.")
    return alive


def greedy_select(g: torch.Tensor, H: torch.Tensor, budget: int, alive: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask with exactly ``budget`` components chosen greedily among ``alive`` (all by default).

    Components that are not alive stay removed. Ties go to the lower index, so the result is deterministic.
    """
    alive = _check(g, H, budget, alive)
    g, H = g.double(), H.double()
    y = -torch.ones_like(g)  # everything removed; picks set y_i = 0
    u = H @ y
    half_diag = 0.5 * H.diagonal()
    candidates = alive.clone()
    for _ in range(budget):
        gains = -(g + u + half_diag)
        gains[~candidates] = -torch.inf
        i = int(torch.argmax(gains))
        candidates[i] = False
        y[i] = 0.0
        u += H[:, i]
    return y == 0


def brute_force_select(
    g: torch.Tensor, H: torch.Tensor, budget: int, alive: torch.Tensor | None = None
) -> torch.Tensor:
    """The best keep-mask of size ``budget`` by enumeration (for tests; d up to about 16)."""
    alive = _check(g, H, budget, alive)
    best, best_mask = -float("inf"), None
    for subset in itertools.combinations(torch.nonzero(alive).flatten().tolist(), budget):
        keep = torch.zeros_like(alive)
        keep[list(subset)] = True
        value = utility(g.double(), H.double(), keep)
        if value > best:
            best, best_mask = value, keep
    return best_mask


def is_monotone(g: torch.Tensor, H: torch.Tensor, alive: torch.Tensor | None = None) -> bool:
    """For a submodular F, monotone iff every marginal gain at the full set V of alive components is >= 0:
    F(V) - F(V - i) = -(g_i + (H y_V)_i - 1/2 H_ii), y_V = 0 on V and -1 elsewhere."""
    alive = torch.ones(g.numel(), dtype=torch.bool) if alive is None else alive.to(torch.bool)
    y_full = -(~alive).to(g.dtype)
    gains = -(g + H @ y_full - 0.5 * H.diagonal())
    return bool((gains[alive] >= 0).all())
