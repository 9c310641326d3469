"""Bring a merged suspect model back to its base model's coordinates before it is verified.

A merged model can be rewritten without changing what it computes, so that ``W_suspect - W_base`` is no longer
the low-rank delta a LoRA adapter added:

* **residual rotation** (LLaMA family: fold the RMSNorm gains into the next linear layers, then rotate the
  residual stream by an orthogonal Q): every weight reading the stream becomes ``W diag(g) Q``, every weight
  writing it ``Q^T W``, the token embedding ``E Q``;
* **permutations** of attention heads (rows of q/k/v, columns of o) and MLP neurons (rows of gate/up, columns
  of down), and sign flips of rows/columns that cancel in the next layer.

``align_merged`` undoes both, using only the suspect and the base weights (never the key, so every p-value of
the key-only test stays exact): Q from the token embedding (orthogonal Procrustes; LoRA leaves the embedding
alone), then per weight the reading (``S Q^T``), the writing (``Q S``) or no rotation, whichever is closest to
the base weight; a per-column scale for folded norm gains (least squares, refit around a low-rank delta so that
the fit does not eat the delta); and where a weight is still far from its base, the row and column permutations
and signs that match it best (Hungarian assignment on cosine similarity). A general invertible mixing inside an
attention head (v rows with o columns, or RoPE-commuting rotations of q and k pairs) is not undone: see
docs/seal.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from scipy.optimize import linear_sum_assignment

# A transformed weight whose relative distance to its base still exceeds this is not the base plus a delta.
ALIGNED = 0.5
# A transformed weight this close to its base (relative) differs from it by rounding only: not an adapted weight.
ROUNDING = 1e-6


@dataclass
class Alignment:
    """What ``align_merged`` did: the rotation's fit, and per weight the transform that matched it to the base."""

    rotation: bool = False
    rotation_residual: float = 0.0  # relative residual of the embedding fit: the rounding level of the rotation
    transforms: dict[str, str] = field(default_factory=dict)  # module -> e.g. "rows permuted, input rotated"
    unmatched: list[str] = field(default_factory=list)  # weights no transform brought near their base

    def summary(self) -> str:
        changed = {m: t for m, t in self.transforms.items() if t != "as is"}
        if not changed and not self.rotation and not self.unmatched:
            return ""
        kinds = sorted({t for t in changed.values()})
        text = f"The merged suspect was aligned to the base: {len(changed)} weights ({'; '.join(kinds)})"
        if self.rotation:
            text += f", residual stream rotation recovered from the embedding (fit {self.rotation_residual:.1e})"
        if self.unmatched:
            text += f"; {len(self.unmatched)} weights could not be matched to their base and were left out"
        return text + "."


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def find_rotation(
    weights: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> tuple[torch.Tensor | None, float]:
    """The orthogonal Q with ``E_suspect = E_base Q`` for the token embedding (the 2-D weight with the most rows),
    or None when the embedding is unchanged or is not a rotation of the base's. Returns Q and the fit's relative
    residual."""
    shared = [n for n, w in base.items() if w.dim() == 2 and n in weights and weights[n].shape == w.shape]
    if not shared:
        return None, 0.0
    name = max(shared, key=lambda n: (base[n].shape[0], n))
    E, E2 = base[name].double(), weights[name].double()
    before = _rel(E2, E)
    if before == 0:
        return None, 0.0
    U, _, Vh = torch.linalg.svd(E.T @ E2)
    Q = U @ Vh
    after = _rel(E @ Q, E2)
    # A rotation explains the change when it leaves far less than the change itself (else: trained embedding).
    return (Q, after) if after < 0.01 * before and after < 1e-3 else (None, 0.0)


def _column_scale(C: torch.Tensor, W: torch.Tensor, rank: int, rounds: int = 50) -> torch.Tensor:
    """Per-column s with ``C diag(s) = W + L``, L of rank ``rank`` (the delta): least squares, refit around L
    until s settles (alternating minimisation; a plain least-squares s would absorb part of the delta)."""
    rank = max(1, min(rank, min(W.shape) // 4))  # a delta of higher rank could absorb the scale itself
    target, previous = W, None
    for _ in range(rounds):
        s = (C * target).sum(0) / C.pow(2).sum(0).clamp_min(1e-30)
        if previous is not None and (s - previous).norm() <= 1e-12 * s.norm():
            break
        residual = C * s - W
        U, S, V = torch.svd_lowrank(residual, q=min(rank + 8, *residual.shape), niter=2)
        target, previous = W + (U[:, :rank] * S[:rank]) @ V[:, :rank].T, s
    return s


def _match(C: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The row order and signs of C that best match W's rows (Hungarian assignment on |cosine|)."""
    Cn = C / C.norm(dim=1, keepdim=True).clamp_min(1e-30)
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-30)
    sim = Wn @ Cn.T  # sim[i, j]: base row i against suspect row j
    rows, cols = linear_sum_assignment(-sim.abs().numpy())
    order = torch.as_tensor(cols[rows.argsort()])
    signs = torch.sign(sim[torch.arange(len(order)), order])
    return order, torch.where(signs == 0, torch.ones_like(signs), signs)


def _unpermute(C: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, str]:
    """C with its rows, its columns, or both re-ordered and re-signed to match W: whichever is closest."""

    def rows(X: torch.Tensor) -> tuple[torch.Tensor, bool]:
        # Column norms do not change when rows move: equalise them first, against folded norm gains.
        order, signs = _match(X * (W.norm(dim=0) / X.norm(dim=0).clamp_min(1e-30)), W)
        return X[order] * signs[:, None], _moved(order, signs)

    def columns(X: torch.Tensor) -> tuple[torch.Tensor, bool]:
        order, signs = _match(X.T, W.T)  # cosines of columns ignore per-column scales
        return X[:, order] * signs, _moved(order, signs)

    by_rows, rows_moved = rows(C)
    by_columns, columns_moved = columns(C)
    both, second_moved = columns(by_rows)
    options = [
        (by_rows, "rows permuted" if rows_moved else ""),
        (by_columns, "columns permuted" if columns_moved else ""),
        (
            both,
            ", ".join(t for t, moved in (("rows permuted", rows_moved), ("columns permuted", second_moved)) if moved),
        ),
    ]
    return min(options, key=lambda option: _rel(option[0], W))


def _moved(order: torch.Tensor, signs: torch.Tensor) -> bool:
    return bool((order != torch.arange(len(order))).any() or (signs < 0).any())


def _align_one(
    S: torch.Tensor, W: torch.Tensor, Q: torch.Tensor | None, rank: int
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """S in W's coordinates before any column scale, the column scale (or None) and what was done."""
    candidates = [(S, "")]
    if Q is not None:
        d = Q.shape[0]
        if S.shape[1] == d:
            candidates.append((S @ Q.T, "input rotated"))
        if S.shape[0] == d:
            candidates.append((Q @ S, "output rotated"))
        if S.shape == (d, d):
            candidates.append((Q @ S @ Q.T, "input and output rotated"))
    options = []
    for C, how in candidates:
        options.append((C, how))
        if _rel(C, W) > ALIGNED:
            permuted, moved = _unpermute(C, W)
            options.append((permuted, ", ".join(filter(None, (how, moved)))))
    results = []
    for C, how in options:
        results.append((_rel(C, W), C, None, how))
        quick = (C * W).sum(0) / C.pow(2).sum(0).clamp_min(1e-30)
        if _rel(C * quick, W) < _rel(C, W) / 2:  # only where the columns were really rescaled (folded norm gains)
            scale = _column_scale(C, W, rank)
            results.append((_rel(C * scale, W), C, scale, ", ".join(filter(None, (how, "columns rescaled")))))
    # A transform counts only where it brings the weight near its base; the weight as it is counts too where no
    # rotation was found (a plain merge, however large its delta).
    fits = [t for t in results[1:] if t[3] and t[0] <= ALIGNED]
    if Q is None or results[0][0] <= ALIGNED:
        fits.append(results[0])
    if not fits:
        return S, None, "unmatched"
    _, C, scale, how = min(fits, key=lambda t: t[0])
    return C, scale, how or "as is"


def _tail(C: torch.Tensor, scale: torch.Tensor, W: torch.Tensor, rank: int) -> float:
    """Energy of ``C diag(scale) - W`` beyond its top ``rank`` singular values: zero for the true scale."""
    values = torch.linalg.svdvals(C * scale - W)
    return float(values[rank:].pow(2).sum())


def _shared_scales(scaled: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], rank: int) -> None:
    """Weights that read one folded norm share its gains: for each rescaled weight, take the scale of whichever
    sibling (same parent module, same input size) leaves the most nearly rank-``rank`` delta. A sibling the
    adapter did not touch (k_proj beside q_proj, gate_proj beside up_proj) gives the exact gains."""
    groups: dict[tuple[str, int], list[str]] = {}
    for name, (C, _, _) in scaled.items():
        groups.setdefault((name.rsplit(".", 2)[0], C.shape[1]), []).append(name)
    for names in groups.values():
        candidates = [scaled[n][1] for n in names]
        for name in names:
            C, _, W = scaled[name]
            k = min(rank, min(W.shape) - 1)
            scaled[name] = (C, min(candidates, key=lambda s: _tail(C, s, W, k)), W)


def align_merged(
    weights: dict[str, torch.Tensor], base: dict[str, torch.Tensor], rank: int = 16
) -> tuple[dict[str, torch.Tensor], Alignment]:
    """Each 2-D suspect weight that has a base weight of its shape, in the base's coordinates (fp64), and what
    was done. ``rank`` is the largest delta rank the norm-gain fit leaves alone (the owner's LoRA rank or more).
    Weights equal to their base up to rounding are left out, and so are weights no transform brings within
    ``ALIGNED`` of their base (``Alignment.unmatched``)."""
    Q, fit = find_rotation(weights, base)
    alignment = Alignment(rotation=Q is not None, rotation_residual=fit)
    found, scaled = {}, {}
    for name, w in weights.items():
        if w.dim() != 2 or name not in base or base[name].shape != w.shape:
            continue
        S, W = w.double(), base[name].double()
        if torch.equal(S, W):
            continue
        C, scale, how = _align_one(S, W, Q, rank)
        if how == "unmatched":
            alignment.unmatched.append(name)
        elif scale is None:
            found[name] = (C, how)
        else:
            scaled[name] = (C, scale, W)
            found[name] = (C, how)
    _shared_scales(scaled, rank)
    aligned = {}
    for name, (C, how) in found.items():
        if name in scaled:
            C = C * scaled[name][1]
        if how != "as is" and _rel(C, base[name].double()) < max(ROUNDING, 100 * fit):
            continue  # equal to its base up to rounding: not adapted
        alignment.transforms[name] = how
        aligned[name] = C
    return aligned, alignment
