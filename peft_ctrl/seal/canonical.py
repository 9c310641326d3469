"""Bring a merged suspect model back to its base model's coordinates before it is verified.

A merged model can be rewritten without changing what it computes, so that ``W_suspect - W_base`` is no longer
the low-rank delta a LoRA adapter added:

* **residual rotation** (LLaMA family: fold the RMSNorm gains into the next linear layers, then rotate the
  residual stream by an orthogonal Q): every weight reading the stream becomes ``W diag(g) Q``, every weight
  writing it ``Q^T W``, the token embedding ``E Q``;
* **permutations** of attention heads (rows of q/k/v, columns of o) and MLP neurons (rows of gate/up, columns
  of down), and sign flips of rows/columns that cancel in the next layer.

* **norm-gain rescaling**: any RMSNorm gain multiplied by a factor and its readers' columns divided by it
  (after a rotation too: gains re-introduced into the rotated model).

``align_merged`` undoes all of them, using only the suspect and the base weights (never the key, so every p-value
of the key-only test stays exact): first each model's own norm gains are folded into the weights that read them
(the base's are divided out again at the end), then Q from the token embedding (orthogonal Procrustes; LoRA leaves
the embedding alone), then per weight the reading (``S Q^T``), the writing (``Q S``) or no rotation, whichever is
closest to the base weight; a per-column scale for folded norm gains (least squares, refit around a low-rank delta
so that the fit does not eat the delta); and where a weight is still far from its base, the row and column
permutations and signs that match it best (Hungarian assignment on cosine similarity). A general invertible mixing
inside an attention head (v rows with o columns, or RoPE-commuting rotations of q and k pairs) is not undone: see
docs/seal.md."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from scipy.optimize import linear_sum_assignment

from ..factors import seeded_svd_lowrank

# Which weights read which RMSNorm in a LLaMA-family model: (norm, reader modules), per layer, under
# ``model.layers.N.``; the final ``model.norm`` is read by ``lm_head``.
LLAMA_NORM_READERS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)


def norm_readers(weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{reader weight: norm weight}`` for the LLaMA-family RMSNorms present in ``weights`` whose gain has the
    reader's input size."""
    found = {}
    for name, gain in weights.items():
        if gain.dim() != 1 or not name.startswith("model."):
            continue
        if name == "model.norm.weight":
            readers = ["lm_head.weight"]
        else:
            prefix, _, norm = name.removesuffix(".weight").rpartition(".")
            readers = [f"{prefix}.{r}.weight" for n, rs in LLAMA_NORM_READERS if n == norm for r in rs]
        for reader in readers:
            if reader in weights and weights[reader].dim() == 2 and weights[reader].shape[1] == gain.shape[0]:
                found[reader] = name
    return found


# A transformed weight whose relative distance to its base still exceeds this is not the base plus a delta.
ALIGNED = 0.5
# Rows or columns are matched by permutation only up to this many (the similarity matrix is this size squared):
# heads and MLP neurons, never a vocabulary.
MAX_PERMUTED = 16384
# A least-squares column scale this close (relative) is exact: the weight is its base with rescaled columns.
EXACT_SCALE = 1e-6
# A transformed weight this close to its base (relative) differs from it by rounding only: not an adapted weight
# (fp32 rounding, amplified where folded norm gains are tiny, reaches 3e-5 on SmolLM2; LoRA deltas are 1e-3+).
ROUNDING = 1e-4


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
    """The orthogonal Q with ``E_suspect = E_base Q`` for the token embedding, or None when the embedding is
    unchanged or is not a rotation of the base's. Returns Q and the fit's relative residual."""
    shared = [n for n, w in base.items() if w.dim() == 2 and n in weights and weights[n].shape == w.shape]
    if not shared:
        return None, 0.0
    # The token embedding: named so in every transformers model (embed_tokens, word_embeddings, wte), else the
    # weight with the most rows (a vocabulary).
    named = [n for n in shared if "embed" in n or n.endswith("wte.weight")]
    name = max(named or shared, key=lambda n: (base[n].shape[0], n))
    E, E2 = base[name].double(), weights[name].double()
    before = _rel(E2, E)
    if before == 0:
        return None, 0.0
    U, _, Vh = torch.linalg.svd(E.T @ E2)
    Q = U @ Vh
    after = _rel(E @ Q, E2)
    # A rotation explains the change when it leaves far less than the change itself (else: trained embedding).
    return (Q, after) if after < 0.01 * before and after < 1e-3 else (None, 0.0)


def _quick_scale(C: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The per-column least-squares scale of C onto W: exact when C is W with rescaled columns."""
    return (C * W).sum(0) / C.pow(2).sum(0).clamp_min(1e-30)


def _distance(C: torch.Tensor, W: torch.Tensor) -> float:
    """Relative distance of C to W, allowing a per-column scale."""
    return min(_rel(C, W), _rel(C * _quick_scale(C, W), W))


def _column_scale(C: torch.Tensor, W: torch.Tensor, rank: int, rounds: int = 50) -> torch.Tensor:
    """Per-column s with ``C diag(s) = W + L``, L of rank ``rank`` (the delta): least squares, refit around L
    until s settles (alternating minimisation; a plain least-squares s would absorb part of the delta)."""
    rank = max(1, min(rank, min(W.shape) // 4))  # a delta of higher rank could absorb the scale itself
    target, previous = W, None
    for _ in range(rounds):
        s = _quick_scale(C, target)
        if previous is not None and (s - previous).norm() <= 1e-12 * s.norm():
            break
        residual = C * s - W
        U, S, V = seeded_svd_lowrank(residual, q=min(rank + 8, *residual.shape))
        target, previous = W + (U[:, :rank] * S[:rank]) @ V[:, :rank].T, s
    return s


def _match(C: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The row order and signs of C that best match W's rows (Hungarian assignment on |cosine|)."""
    Cn = C / C.norm(dim=1, keepdim=True).clamp_min(1e-30)
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-30)
    sim = Wn @ Cn.T  # sim[i, j]: base row i against suspect row j
    order = sim.abs().argmax(1)
    if len(order.unique()) < len(order):  # the best matches collide: solve the assignment exactly
        rows, cols = linear_sum_assignment(-sim.abs().numpy())
        order = torch.as_tensor(cols[rows.argsort()])
    signs = torch.sign(sim[torch.arange(len(order)), order])
    return order, torch.where(signs == 0, torch.ones_like(signs), signs)


def _energy_pattern(X: torch.Tensor) -> torch.Tensor:
    """Each entry's share of its column's energy, centred per column: unchanged by column scales and signs."""
    E = X.pow(2) / X.pow(2).sum(0, keepdim=True).clamp_min(1e-300)
    return E - E.mean(0, keepdim=True)


def _unpermute(C: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, str]:
    """C with its rows, its columns, or both re-ordered and re-signed to match W: whichever is closest."""

    def rows(X: torch.Tensor) -> tuple[torch.Tensor, bool]:
        # Folded norm gains scale (and may flip) X's columns: match rows on each column's share of its energy,
        # which no column scale or sign changes, then recover the row signs as the rank-1 sign pattern of X / W.
        order, _ = _match(_energy_pattern(X), _energy_pattern(W))
        moved = X[order]
        agree = torch.sign(moved * W)
        u = seeded_svd_lowrank(agree, q=2)[0][:, 0]
        signs = torch.where(u < 0, -1.0, 1.0).to(X.dtype)
        if (moved * signs[:, None] * W).sum() < 0:  # the pattern fixes signs up to one overall flip
            signs = -signs
        return moved * signs[:, None], _moved(order, signs)

    def columns(X: torch.Tensor) -> tuple[torch.Tensor, bool]:
        order, signs = _match(X.T, W.T)  # cosines of columns ignore per-column scales
        if _is_identity(order):
            return X, False  # sign flips alone are column scales: left to the scale fit (shared with siblings)
        return X[:, order] * signs, True

    by_rows, rows_moved = rows(C)
    by_columns, columns_moved = columns(C)
    options = [
        (by_rows, "rows permuted" if rows_moved else ""),
        (by_columns, "columns permuted" if columns_moved else ""),
    ]
    if rows_moved:
        both, second_moved = columns(by_rows)
        options.append((both, "rows and columns permuted" if second_moved else "rows permuted"))
    return min(options, key=lambda option: _distance(option[0], W))


def _is_identity(order: torch.Tensor) -> bool:
    return bool((order == torch.arange(len(order))).all())


def _moved(order: torch.Tensor, signs: torch.Tensor) -> bool:
    return not _is_identity(order) or bool((signs < 0).any())


def _align_one(
    S: torch.Tensor, W: torch.Tensor, Q: torch.Tensor | None, rank: int
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """S in W's coordinates before any column scale, a least-squares column scale (or None: not rescaled; see
    ``_refine_scales``) and what was done."""
    candidates = [(S, "")]
    if Q is not None:
        d = Q.shape[0]
        if S.shape[1] == d:
            candidates.append((S @ Q.T, "input rotated"))
        if S.shape[0] == d:
            candidates.append((Q @ S, "output rotated"))
        if S.shape == (d, d):
            candidates.append((Q @ S @ Q.T, "input and output rotated"))

    options = list(candidates)
    if min(_distance(C, W) for C, _ in candidates) > ALIGNED and max(W.shape) <= MAX_PERMUTED:
        for C, how in candidates:
            permuted, moved = _unpermute(C, W)
            options.append((permuted, ", ".join(filter(None, (how, moved)))))
    results = []
    for C, how in options:
        results.append((_rel(C, W), C, None, how))
        quick = _quick_scale(C, W)
        if _rel(C * quick, W) < _rel(C, W) / 2:  # only where the columns were really rescaled (folded norm gains)
            results.append((_rel(C * quick, W), C, quick, ", ".join(filter(None, (how, "columns rescaled")))))
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


def _refine_scales(scaled: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], rank: int) -> None:
    """Replace each least-squares column scale (which absorbs part of a delta) by the folded norm gains.

    Weights that read one norm share its gains. A sibling weight the adapter did not touch (same parent module,
    same input size: k_proj beside q_proj, gate_proj beside up_proj) is rescaled exactly by least squares; among
    such exact scales, each weight takes the one that leaves it the most nearly rank-``rank`` delta. A weight with
    no untouched sibling gets the alternating low-rank fit of ``_column_scale``."""
    groups: dict[tuple[str, int], list[str]] = {}
    for name, (C, _, _) in scaled.items():
        groups.setdefault((name.rsplit(".", 2)[0], C.shape[1]), []).append(name)
    for names in groups.values():
        exact = [s for C, s, W in (scaled[n] for n in names) if _rel(C * s, W) < EXACT_SCALE]
        for name in names:
            C, s, W = scaled[name]
            if _rel(C * s, W) < EXACT_SCALE:
                continue
            k = min(rank, min(W.shape) - 1)
            best = min(exact, key=lambda e: _tail(C, e, W, k)) if exact else _column_scale(C, W, rank)
            scaled[name] = (C, best, W)


def _shared_gains(
    weights: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{reader weight: (suspect's gain, base's gain)}`` (fp64) for every norm both models have, where the
    base's gain has no zero (it is divided out again) and the suspect's differs from it."""
    readers = norm_readers(base)
    found = {}
    for reader, norm in readers.items():
        if norm not in weights or weights[norm].shape != base[norm].shape or reader not in weights:
            continue
        mine, theirs = weights[norm].double(), base[norm].double()
        if not torch.equal(mine, theirs) and bool((theirs != 0).all()):
            found[reader] = (mine, theirs)
    return found


def align_merged(
    weights: dict[str, torch.Tensor], base: dict[str, torch.Tensor], rank: int = 16
) -> tuple[dict[str, torch.Tensor], Alignment]:
    """Each 2-D suspect weight that has a base weight of its shape, in the base's coordinates (fp64), and what
    was done. ``rank`` is the largest delta rank the norm-gain fit leaves alone (the owner's LoRA rank or more).
    Weights equal to their base up to rounding are left out, and so are weights no transform brings within
    ``ALIGNED`` of their base (``Alignment.unmatched``)."""
    Q, fit = find_rotation(weights, base)
    alignment = Alignment(rotation=Q is not None, rotation_residual=fit)
    # Each model's own RMSNorm gains are folded into the weights that read them before anything is fitted, so
    # gains the suspect moved (re-introduced after a rotation, or rescaled against its readers' columns) cancel;
    # the base's gains are divided out again at the end.
    gains = _shared_gains(weights, base)
    found, scaled = {}, {}
    for name, w in weights.items():
        if w.dim() != 2 or name not in base or base[name].shape != w.shape:
            continue
        S, W = w.double(), base[name].double()
        if name in gains:
            S, W = S * gains[name][0], W * gains[name][1]
        if torch.equal(S, W):
            continue
        C, scale, how = _align_one(S, W, Q, rank)
        if how == "unmatched":
            alignment.unmatched.append(name)
            continue
        found[name] = (C, how)
        if scale is not None:
            scaled[name] = (C, scale, W)
    _refine_scales(scaled, rank)
    aligned = {}
    for name, (C, how) in found.items():
        if name in scaled:
            C = C * scaled[name][1]
        if name in gains:
            C = C / gains[name][1]
        moved = how != "as is" or name in gains  # rewritten or refolded: equal to its base up to rounding only
        if moved and _rel(C, base[name].double()) < max(ROUNDING, 100 * fit):
            continue  # equal to its base up to rounding: not adapted
        if name in gains:
            how = "own norm gains folded" if how == "as is" else f"own norm gains folded, {how}"
        alignment.transforms[name] = how
        aligned[name] = C
    return aligned, alignment
