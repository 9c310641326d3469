"""The key-only test's exact p-values: key rows against a suspect's row spaces, and the pairing of claimed modules
with suspect modules (by name, and by structure)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats
from scipy.optimize import linear_sum_assignment

from .keys import Structure, check_structure, initial_a, key_schedule
from .suspect import Suspect

# How many of a module's key rows choose the pairing by structure (all rows are tested): enough to find a
# watermarked module among its shape class, few enough to keep a 7B-sized class (128 x 128) fast.
PAIRING_ROWS = 8


def chi2_log_sf(x: float, dof: int) -> float:
    """log P(chi2_dof >= x); where scipy's tail underflows, the Chernoff bound
    log P <= -(x - dof)/2 + (dof/2) log(x / dof), which can only overstate p."""
    exact = float(stats.chi2.logsf(x, dof))
    if math.isfinite(exact):
        return exact
    return -(x - dof) / 2 + (dof / 2) * math.log(x / dof)


def binom_log_sf(k: int, n: int) -> float:
    """log P(Binomial(n, 1/2) >= k); where scipy's tail underflows, the Chernoff bound
    log P <= -n KL(k/n || 1/2), which can only overstate p."""
    exact = float(stats.binom.logsf(k - 1, n, 0.5))
    if math.isfinite(exact):
        return exact
    q = k / n
    kl = q * math.log(2 * q) + ((1 - q) * math.log(2 * (1 - q)) if q < 1 else 0.0)
    return -n * kl


def _row_log_sf(rows: torch.Tensor, basis: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per key row a: the overlap u = |P_S a|^2 / |a|^2 with the span S of ``basis`` (n x k, orthonormal) and its
    natural-log tail P(Beta(k/2, (n-k)/2) >= u), floored at -700 (where float tails underflow: this only raises
    p). ``u = 1`` exactly would give p = 0, so u is clamped below 1."""
    n, k = basis.shape
    u = ((rows @ basis).pow(2).sum(1) / rows.pow(2).sum(1)).clamp(0, 1 - 1e-12).numpy()
    return np.maximum(stats.beta.logsf(u, k / 2, (n - k) / 2), -700.0), u


@dataclass
class Pairing:
    """One pairing of claimed modules with suspect modules and the evidence of the rows it tests.
    ``log_choices`` is the natural log of how many pairings the test chose this one from (0: it was fixed before
    any row was seen): the union bound multiplies the p of the chosen one by that many."""

    pairs: dict[str, str] = field(default_factory=dict)  # claimed module -> suspect module
    log_ps: list[float] = field(default_factory=list)
    overlaps: list[float] = field(default_factory=list)
    log_choices: float = 0.0

    def log_p(self) -> float:
        """Fisher's method over the tested rows (chi-squared with 2N degrees of freedom), times the number of
        pairings chosen from; natural log."""
        if not self.log_ps:
            return 0.0
        return min(0.0, chi2_log_sf(-2 * sum(self.log_ps), 2 * len(self.log_ps)) + self.log_choices)


class KeyRows:
    """The key rows of a claimed structure, and the suspect's row spaces (each computed once)."""

    def __init__(self, suspect: Suspect, key: bytes, structure: Structure) -> None:
        # One entry per module (keys.check_structure): the rows of distinct names are independent, which is what
        # lets Fisher's method combine them; a repeated name would bring the same rows twice.
        self.suspect, self.key, self.structure = suspect, key, check_structure(structure)
        self.schedule = key_schedule(structure)
        self.present = suspect.modules()
        self._rows: dict[str, torch.Tensor] = {}
        self._bases: dict[tuple[str, int], torch.Tensor] = {}
        self._tested: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    def rows(self, module: str, r: int, n: int) -> torch.Tensor:
        if module not in self._rows:
            self._rows[module] = initial_a(self.key, self.schedule, module, r, n).double()
        return self._rows[module]

    def basis(self, module: str, k: int) -> torch.Tensor:
        if (module, k) not in self._bases:
            self._bases[module, k] = self.suspect.row_space(module, k)
        return self._bases[module, k]

    def test(self, pairing: Pairing, claimed: str, module: str, rows: torch.Tensor, r: int) -> None:
        basis = self.basis(module, r)
        if 0 < basis.shape[1] < basis.shape[0]:
            if (claimed, module) not in self._tested:  # both pairings test most pairs of an intact release
                self._tested[claimed, module] = _row_log_sf(rows, basis)
            log_ps, u = self._tested[claimed, module]
            pairing.pairs[claimed] = module
            pairing.log_ps.extend(log_ps.tolist())
            pairing.overlaps.extend(u.tolist())

    def by_name(self) -> Pairing:
        """Claimed modules paired with the suspect modules of the same name and shape; every key row tested."""
        pairing = Pairing()
        for module, out, inp, r in self.structure:
            if module in self.present and self.suspect.shape(module) == (out, inp):
                self.test(pairing, module, module, self.rows(module, r, inp), r)
        return pairing

    def by_structure(self) -> Pairing:
        """Claimed modules paired with suspect modules of their shape, whatever the names: within each shape, the
        one-to-one pairing that the key rows support best (``_pairing_cost``), then every key row tested. Each
        fixed pairing's p is exact (its rows are independent of any suspect not derived from the key), so the
        chosen one's p times the number of pairings it was chosen from is a valid p (a union bound), however the
        choice was made. That number counts every claimed module, so entries a claimant adds can only raise it."""
        pairing = Pairing()
        for shape in sorted({(out, inp) for _, out, inp, _ in self.structure}):
            claimed = [(m, r) for m, out, inp, r in self.structure if (out, inp) == shape]
            present = [m for m in self.present if self.suspect.shape(m) == shape]
            if not present:
                continue
            pairing.log_choices += log_injections(len(claimed), len(present))
            cost = self._pairing_cost(claimed, present, shape[1])
            for i, j in zip(*linear_sum_assignment(cost), strict=True):
                module, r = claimed[i]
                self.test(pairing, module, present[j], self.rows(module, r, shape[1]), r)
        return pairing

    def _pairing_cost(self, claimed: list[tuple[str, int]], present: list[str], n: int) -> np.ndarray:
        """How strongly each claimed module's first PAIRING_ROWS key rows overlap each candidate's row space: minus
        their standardised summed overlap (the overlap of a row with a k-dimensional space is Beta(k/2, (n-k)/2)
        under the null, mean k/n). In fp32 and batched, and only on a few rows: it only chooses the pairing, which
        the union bound pays for whatever the choice, so it cannot make the test invalid."""
        cost = np.zeros((len(claimed), len(present)))
        for r in sorted({r for _, r in claimed}):
            index = [i for i, (_, rank) in enumerate(claimed) if rank == r]
            h = min(r, PAIRING_ROWS)
            rows = torch.cat([self.rows(claimed[i][0], r, n)[:h] for i in index]).float()
            bases = torch.zeros(n, len(present), r)
            ks = np.zeros(len(present))
            for j, module in enumerate(present):
                basis = self.basis(module, r)
                bases[:, j, : basis.shape[1]] = basis.float()
                ks[j] = basis.shape[1]
            projected = (rows @ bases.view(n, -1)).view(len(index), h, len(present), r).pow(2).sum(-1)
            u = (projected / rows.pow(2).sum(1).view(len(index), h, 1)).double().numpy()
            usable = (ks > 0) & (ks < n)
            mean = np.where(usable, ks, 1) / n
            sd = np.sqrt(2 * mean * (1 - mean) / (n + 2))  # the Beta's standard deviation
            z = ((u - mean) / sd).sum(1) / math.sqrt(h)
            cost[index] = np.where(usable, -z, 0.0)
        return cost


def log_injections(claimed: int, present: int) -> float:
    """The natural log of the number of one-to-one pairings of ``claimed`` with ``present`` modules of one shape
    that pair as many as possible: P(max, min) = max! / (max - min)!."""
    high, low = max(claimed, present), min(claimed, present)
    return math.lgamma(high + 1) - math.lgamma(high - low + 1)
