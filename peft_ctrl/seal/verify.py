"""Verification: does a suspect adapter (or merged model) carry the watermark of a key?

Two tests, each with an exact null distribution:

* **key-only** (needs the key, nothing stored): for every module, S is the row space of the suspect's
  delta W (for an adapter the row space of B'A'; for a merged model the top-r right singular vectors of
  W - W_base). Each row a of the key's initial A is an isotropic Gaussian vector, independent of any
  adapter not trained from that key, so ``u = |P_S a|^2 / |a|^2 ~ Beta(k/2, (n-k)/2)`` exactly (k = dim S).
  Training keeps A's row space close to its initialisation, so a watermarked suspect gives u far above
  k/n. The rows' p-values are independent and combined with Fisher's method (chi-squared, 2N degrees of
  freedom). Invariant to B'M, M^-1 A', rank permutation, re-factorisation and merging.
* **passport** (the paper's owner test; needs the proof file): C_hat = B^+ (delta W) A^+ with the
  pre-release B, A. The passport is C = Q D with Q Haar-orthogonal and D independent fair column signs,
  so when C_hat is independent of the key, each column agreement sign(<C_hat_j, C_j>) = d_j
  sign(<C_hat_j, Q_j>) is a fair coin and the number of agreeing columns over all modules is
  Binomial(N, 1/2) exactly (a zero inner product counts as disagreement: conservative). The proof's B, A
  were trained through C, so a suspect trained on the same task can make C_hat lean towards C; the
  passport p-value is calibrated only when that is ruled out.

Owner verification checks the claim against the published digest, then decides on the key-only test with the
claim's ranks (exact for any suspect not derived from the key) and reports the passport test beside it. A forger
who re-factorises the release to match a key of their own passes the passport test by construction but not the
key-only test, because A's row space was set by the owner's key; and the passport statistic, whose smallest
p-value is 2^-(passport columns), gives way first under continued fine-tuning, so it does not veto the verdict.
"""

from __future__ import annotations

import hmac
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from ..factors import product_svd, seeded_svd_lowrank
from .canonical import align_merged
from .claim import Claim, published_digest
from .io import LoraFactors, Proof, read_adapter, read_proof
from .keys import check_commitment, initial_a, passport, resolve_key

# Key-only detection (screening suspects with the owner's key) and the owner verdict (a claim against others):
# at 2^-64 a forger trying keys needs about 2^64 tries to pass by chance (10^6 tries: 5e-14).
DEFAULT_THRESHOLD = 1e-6
OWNER_THRESHOLD = 2.0**-64
_LOG10 = math.log(10)
SUSPECT_RANK_NOTE = (
    " The number of key rows per module is the suspect's own rank: an adapter padded with near-null components "
    "dilutes this test; give r (the owner's rank) or verify in owner mode, which takes it from the published claim."
)


@dataclass
class VerificationResult:
    """``verified`` is true when ``p_value < threshold``; ``log10_p`` keeps p-values below float range."""

    mode: str
    statistic: float
    p_value: float
    log10_p: float
    verified: bool
    threshold: float
    modules: int
    skipped: list[str] = field(default_factory=list)
    components: dict[str, dict] = field(default_factory=dict)
    message: str = ""

    @property
    def security_bits(self) -> float:
        """-log2 p: a claim at b bits is passed by chance by one in 2^b independent tries (e.g. forger's keys)."""
        return -self.log10_p * math.log2(10)

    def to_dict(self) -> dict:
        return {**asdict(self), "security_bits": self.security_bits}

    def __str__(self) -> str:
        verdict = "VERIFIED" if self.verified else "not verified"
        return (
            f"{verdict}: {self.mode} test, p = {self.p_value:.3g} (log10 p = {self.log10_p:.1f}, "
            f"{self.security_bits:.0f} bits), statistic {self.statistic:.4f}, {self.modules} modules, threshold "
            f"{self.threshold:g}. {self.message}".strip()
        )


def _result(mode: str, statistic: float, log_p: float, threshold: float, modules: int, **kw) -> VerificationResult:
    log_p = min(0.0, log_p)
    p = math.exp(log_p)
    return VerificationResult(mode, statistic, p, log_p / _LOG10, p < threshold, threshold, modules, **kw)


@dataclass
class Suspect:
    """What is verified: per module, either LoRA factors or a dense delta W (merged model minus base)."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    note: str = ""  # how a merged suspect was aligned to its base (see peft_ctrl.seal.canonical)

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
        else:
            d = self.deltas[module]
            if min(d.shape) > 4 * k + 64:
                _, S, V = seeded_svd_lowrank(d, q=k + 16, niter=4)
                Vh = V.T
            else:
                _, S, Vh = torch.linalg.svd(d, full_matrices=False)
        keep = int((S[:k] > S[0] * 1e-9).sum()) if S.numel() and S[0] > 0 else 0
        return Vh[:keep].T.double()

    def core(self, module: str, B0: torch.Tensor, A0: torch.Tensor) -> torch.Tensor:
        """C_hat = B0^+ delta W A0^+ (never forms delta W for an adapter)."""
        # B0^+ = (B0^T B0)^+ B0^T and A0^+ = A0^T (A0 A0^T)^+: only r x r pseudo-inverses.
        B0, A0 = B0.double(), A0.double()
        left, right = torch.linalg.pinv(B0.T @ B0), torch.linalg.pinv(A0 @ A0.T)
        if module in self.factors:
            B, A = self.factors[module]
            return left @ (B0.T @ B.double()) @ (A.double() @ A0.T) @ right
        return left @ (B0.T @ self.deltas[module].double() @ A0.T) @ right


def _chi2_log_sf(x: float, dof: int) -> float:
    """log P(chi2_dof >= x); where scipy's tail underflows, the Chernoff bound
    log P <= -(x - dof)/2 + (dof/2) log(x / dof), which can only overstate p."""
    exact = float(stats.chi2.logsf(x, dof))
    if math.isfinite(exact):
        return exact
    return -(x - dof) / 2 + (dof / 2) * math.log(x / dof)


def _binom_log_sf(k: int, n: int) -> float:
    """log P(Binomial(n, 1/2) >= k); where scipy's tail underflows, the Chernoff bound
    log P <= -n KL(k/n || 1/2), which can only overstate p."""
    exact = float(stats.binom.logsf(k - 1, n, 0.5))
    if math.isfinite(exact):
        return exact
    q = k / n
    kl = q * math.log(2 * q) + ((1 - q) * math.log(2 * (1 - q)) if q < 1 else 0.0)
    return -n * kl


def _real(t: torch.Tensor) -> torch.Tensor:
    """fp32 or fp64 as given (half precision is widened): the thin factors are only ever QR-factorised."""
    return t.detach() if t.dtype in (torch.float32, torch.float64) else t.detach().float()


def verify_key(
    suspect: Suspect,
    key: str | bytes | None = None,
    r: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    ranks: dict[str, int] | None = None,
    claim: Claim | None = None,
) -> VerificationResult:
    """Key-only test: overlap of the suspect's row spaces with the key's initial A (see the module doc).

    The number of key rows per module is ``ranks[module]`` (from a published claim; modules it does not name are
    skipped), else ``r`` (the owner's LoRA rank), else the suspect's own rank. The suspect's top-k directions by
    singular value are compared with k = that number, so near-null components a suspect adds to inflate its rank
    are not looked at when the rank comes from the owner. ``claim`` (the owner's own public record,
    ``claim.read_claim``) gives the ranks and the module names: suspect modules under other names are matched to
    it by shape and order, as in owner mode; the key must be the claim's."""
    raw = resolve_key(key)
    renamed = 0
    if claim is not None:
        check_commitment(raw, claim.key_commitment, claim.salt, "the claim record")
        suspect, renamed = align_to_claim(suspect, claim)
        ranks = claim.ranks()
    if r is not None and ranks is None:
        too_small = [m for m in suspect.modules() if suspect.shape(m)[1] <= r]
        if too_small:
            raise ValueError(
                f"r = {r} is not below the input features of {len(too_small)} suspect module(s) (e.g. {too_small[0]}: "
                f"{suspect.shape(too_small[0])[1]}): r is the owner's LoRA rank, smaller than every adapted module's "
                "input features."
            )
    log_ps, overlaps, skipped = [], [], []
    for module in suspect.modules():
        m, n = suspect.shape(module)
        if ranks is not None and module not in ranks:
            skipped.append(module)
            continue
        rank = (
            (ranks or {}).get(module)
            or r
            or (suspect.factors[module][1].shape[0] if module in suspect.factors else None)
        )
        if rank is None:
            raise ValueError("Give r (the owner's LoRA rank) to verify a merged model.")
        basis = suspect.row_space(module, rank)
        k = basis.shape[1]
        if k == 0 or k >= n:
            skipped.append(module)
            continue
        a = initial_a(raw, module, rank, n).double()
        u = ((a @ basis).pow(2).sum(1) / a.pow(2).sum(1)).clamp(0, 1 - 1e-12).numpy()  # u = 1 exactly has p = 0
        # Floor each row's log p at -700 (p = 1e-304, where float tails underflow): this only raises p.
        log_ps.extend(np.maximum(stats.beta.logsf(u, k / 2, (n - k) / 2), -700.0).tolist())
        overlaps.extend(u.tolist())
    if not log_ps:
        return _result("key", 0.0, 0.0, threshold, 0, skipped=skipped, message="No module could be compared.")
    fisher = -2 * sum(log_ps)
    log_p = _chi2_log_sf(fisher, 2 * len(log_ps))
    return _result(
        "key",
        sum(overlaps) / len(overlaps),
        log_p,
        threshold,
        len(suspect.modules()) - len(skipped),
        skipped=skipped,
        message="statistic: mean overlap |P_S a|^2/|a|^2 of the key's initial rows with the suspect's row spaces."
        + (SUSPECT_RANK_NOTE if ranks is None and r is None else "")
        + (f" {renamed} suspect modules were matched to the claim by shape and order, not by name." if renamed else "")
        + (f" {suspect.note}" if suspect.note else ""),
    )


def verify_passport(
    suspect: Suspect, proof_path: str | Path | Proof, key: bytes, threshold: float = DEFAULT_THRESHOLD
) -> VerificationResult:
    """The paper's owner test alone (the sign-agreement statistic); forgeable, see ``verify_owner``."""
    proof = read_proof(proof_path)
    check_commitment(key, proof.commitment, proof.salt, "the proof file")
    agree = total = 0
    skipped = []
    present = set(suspect.modules())
    for module, (B0, A0) in proof.factors.items():
        if module not in present or suspect.shape(module) != (B0.shape[0], A0.shape[1]):
            skipped.append(module)
            continue
        C_hat = suspect.core(module, B0, A0)
        C = passport(key, module, A0.shape[0])
        agree += int(((C_hat * C).sum(0) > 0).sum())  # columns of C_hat pointing along C's columns
        total += C.shape[1]
    if total == 0:
        return _result(
            "passport", 0.0, 0.0, threshold, 0, skipped=skipped, message="No module of the suspect matches the proof."
        )
    log_p = _binom_log_sf(agree, total)
    message = "statistic: fraction of passport columns recovered (sign of <C_hat_j, C_j>)."
    if total * math.log(2) < -math.log(threshold):
        message += (
            f" Only {total} passport columns: the smallest possible p is 2^-{total} = {0.5**total:.2g}, above the "
            "threshold, so this test cannot verify; adapt more modules or use a larger r."
        )
    return _result(
        "passport",
        agree / total,
        log_p,
        threshold,
        len(proof.factors) - len(skipped),
        skipped=skipped,
        message=message,
    )


def _natural(name: str) -> tuple:
    """Sort key that orders layer indices numerically (layers.2 before layers.10)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def align_to_claim(suspect: Suspect, claim: Claim) -> tuple[Suspect, int]:
    """The suspect with its modules renamed to the claim's when their names differ (an adapter saved for the
    backbone, or renamed on purpose): modules of one shape are paired in model order, claim and suspect alike,
    when both have the same number of them. Returns the suspect and how many modules were renamed."""
    claimed = {m: (out, inp) for m, out, inp, _ in claim.structure}
    present = set(suspect.modules())
    if set(claimed) <= present:
        return suspect, 0
    mapping: dict[str, str] = {}
    for shape in set(claimed.values()):
        want = sorted((m for m, s in claimed.items() if s == shape and m not in present), key=_natural)
        have = sorted((m for m in present - set(claimed) if suspect.shape(m) == shape), key=_natural)
        if want and len(want) == len(have):
            mapping.update(zip(have, want, strict=True))
    if not mapping:
        return suspect, 0
    factors = {mapping.get(m, m): f for m, f in suspect.factors.items()}
    deltas = {mapping.get(m, m): d for m, d in suspect.deltas.items()}
    return Suspect(factors=factors, deltas=deltas, note=suspect.note), len(mapping)


def verify_owner(
    suspect: Suspect,
    proof_path: str | Path | Proof,
    published: str | Path,
    key: str | bytes | None = None,
    threshold: float = OWNER_THRESHOLD,
) -> VerificationResult:
    """Owner test of a claim: the key-only test with the claim's ranks decides; the passport test is reported.

    ``published`` is the claim digest the owner published at release (the 64-hex string, or the claim record
    file): the claim is refused (``ValueError``) unless the key matches the proof's commitment and the proof's
    claim hashes to that digest. The number of key rows per module comes from the claim, never from the
    suspect. The default threshold is 2^-64 (``OWNER_THRESHOLD``)."""
    raw = resolve_key(key)
    proof = read_proof(proof_path)
    check_commitment(raw, proof.commitment, proof.salt, "the proof file")
    if proof.claim is None:
        raise ValueError(
            "This proof file predates published claims, so it binds nothing a verifier can check; release the "
            "sealed adapter again with this version and publish the digest it prints."
        )
    claim = Claim.from_fields(proof.claim)
    if (claim.key_commitment, claim.salt) != (proof.commitment, proof.salt):
        raise ValueError(
            "The proof's claim names another key commitment than the proof itself; the proof was altered."
        )
    if not hmac.compare_digest(claim.digest(), published_digest(published)):
        raise ValueError(
            "The claim does not match the published commitment: this proof and key are not the ones the published "
            "digest was made from, so the claim is refused (no verdict)."
        )
    suspect, renamed = align_to_claim(suspect, claim)
    passport_result = verify_passport(suspect, proof, raw, threshold)
    key_result = verify_key(suspect, raw, threshold=threshold, claim=claim)
    return _result(
        "owner",
        key_result.statistic,
        key_result.log10_p * _LOG10,
        threshold,
        key_result.modules,
        skipped=key_result.skipped,
        components={"passport": passport_result.to_dict(), "key": key_result.to_dict()},
        message="decided by the key-only test with the published claim's ranks (statistic: mean overlap of the "
        f"key's initial rows with the suspect's row spaces); the paper's passport test recovers "
        f"{passport_result.statistic:.1%} of the passport columns (log10 p = {passport_result.log10_p:.1f}), "
        "reported beside it."
        + (f" {renamed} suspect modules were matched to the claim by shape and order, not by name." if renamed else "")
        + (f" {suspect.note}" if suspect.note else ""),
    )
