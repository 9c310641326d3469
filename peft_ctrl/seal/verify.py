"""Verification: does a suspect adapter (or merged model) carry the watermark of a key?

Two tests, each with an exact null distribution:

* **key-only** (needs the key, nothing stored): for every module, S is the row space of the suspect's
  delta W (for an adapter the row space of B'A'; for a merged model the top-r right singular vectors of
  W - W_base). Each row a of the key's initial A is an isotropic Gaussian vector, independent of any
  adapter not trained from that key, so ``u = |P_S a|^2 / |a|^2 ~ Beta(k/2, (n-k)/2)`` exactly (k = dim S).
  Training keeps A's row space close to its initialisation, so a watermarked suspect gives u far above
  k/n. The rows' p-values are independent and combined with Fisher's method (chi-squared, 2N degrees of
  freedom). Invariant to B'M, M^-1 A', rank permutation, re-factorisation and merging.

  The key rows come from a claimed structure (every module's name, shape and rank; ``keys.key_schedule``), so a
  claimant who varies any part of it draws fresh rows for all modules: one exact test per whole claim. Nothing
  the claimant names decides which suspect module a claimed module is compared with: the test pairs them by name
  and, independently, by structure (among the modules of one shape, the one-to-one pairing that the key rows
  support best, its p multiplied by the number of such pairings: a union bound), every row tested in both, and
  reports twice the smaller p. A structure lists each module once (``keys.check_structure``): rows of distinct
  names are independent, so each tested row is one independent piece of evidence however many entries a claim has.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .claim import Claim, published_digest, structure_of
from .io import Proof, read_proof
from .keys import Structure, check_commitment, passport, resolve_key
from .pvalues import KeyRows, Pairing, binom_log_sf
from .suspect import Suspect

# Key-only detection (screening suspects with the owner's key) and the owner verdict (a claim against others):
# at 2^-64 a forger trying whole claims needs about 2^64 tries to pass by chance (10^6 tries: 5e-14).
DEFAULT_THRESHOLD = 1e-6
OWNER_THRESHOLD = 2.0**-64
_LOG10 = math.log(10)
SUSPECT_STRUCTURE_NOTE = (
    " The key rows came from the structure the suspect shows (its names, shapes and ranks): a suspect renamed, cut "
    "or padded finds nothing this way; give the owner's claim record, which fixes the structure."
)
RECORD_NOTE = (
    " The record's digest is {digest}: key mode cannot check it against a publication, so a record edited and "
    "rehashed (other ranks or names) is taken as it is; use your own copy of the record, or owner mode."
)
PROOF_WITHOUT_CLAIM = (
    "This proof file predates published claims and key schedules, so it binds nothing a verifier can check; train "
    "and release the adapter again with this version and publish the digest it prints."
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


# A merged suspect's module is taken as adapted when its delta's top singular value is at least SPIKE times its
# (r+1)-th, and as unchanged up to noise when at most NOISE_BULK times (noise alone: about 1 to 3); a module in
# between makes the structure ambiguous, and key mode then asks for the owner's record.
SPIKE, NOISE_BULK = 20.0, 6.0
MERGED_NEEDS_RECORD = (
    "The merged suspect's structure cannot be read from it: {what}. Key mode without the owner's claim record "
    "derives the key rows from the modules that carry a rank-{r} update, and one module wrong changes every row. "
    "Pass the owner's public record: --published seal_claim.json (Python: verify_key(..., claim=read_claim(path)))."
)


def _merged_modules(suspect: Suspect, r: int) -> list[str]:
    """The modules of a merged suspect whose delta is a rank-``r`` update standing out of a noise floor (every
    weight of a model saved in bf16, or with noise added, differs from the base); refuses when that is unclear.
    A module with a side of at most r holds any delta at rank r: it counts as adapted when no module shows a
    noise floor (an exact merge changes only the adapted weights), and as unclear otherwise."""
    spikes = {m: suspect.spike(m, r) for m in suspect.deltas}
    floor = any(s is not None and s <= NOISE_BULK for s in spikes.values())
    adapted = [m for m, s in spikes.items() if (s is None and not floor) or (s is not None and s >= SPIKE)]
    unclear = [m for m, s in spikes.items() if (s is None and floor) or (s is not None and NOISE_BULK < s < SPIKE)]
    if unclear:
        shown = ", ".join(
            f"{m} ({'side not above r' if spikes[m] is None else f'{spikes[m]:.1f}'})" for m in unclear[:3]
        )
        what = (
            f"{len(unclear)} module(s) are neither a clear rank-{r} update nor noise (top over (r+1)-th singular "
            f"value: {shown})"
        )
        raise ValueError(MERGED_NEEDS_RECORD.format(what=what, r=r))
    if not adapted:
        what = f"no module's delta stands out of its noise as a rank-{r} update"
        raise ValueError(MERGED_NEEDS_RECORD.format(what=what, r=r))
    return adapted


def _suspect_structure(suspect: Suspect, r: int | None) -> Structure:
    """The structure a suspect shows by itself: its module names and shapes, with rank ``r`` or its own; for a
    merged suspect, the modules whose delta is a clear rank-``r`` update (``_merged_modules``)."""
    if suspect.deltas and r is None:
        raise ValueError(
            "Give r (the owner's LoRA rank) or, better, the owner's claim record to verify a merged model."
        )
    merged = set(_merged_modules(suspect, r)) if suspect.deltas else set()
    structure = []
    for module in suspect.modules():
        if module in suspect.factors:
            structure.append((module, *suspect.shape(module), r or suspect.factors[module][1].shape[0]))
        elif module in merged:
            structure.append((module, *suspect.shape(module), r))
    return tuple(structure)


@dataclass
class _KeyVerdict:
    log_p: float  # natural log
    chosen: Pairing
    by_name: Pairing
    by_structure: Pairing
    modules: int
    skipped: list[str]

    def components(self) -> dict[str, dict]:
        """Each pairing's own (valid) p, the rows it tested, its pairs that cross names, and the log10 of how many
        pairings it was chosen from."""
        return {
            name: {
                "log10_p": pairing.log_p() / _LOG10,
                "rows": len(pairing.log_ps),
                "modules": len(pairing.pairs),
                "renamed": sum(claimed != module for claimed, module in pairing.pairs.items()),
                "log10_pairings": pairing.log_choices / _LOG10,
            }
            for name, pairing in (("by_name", self.by_name), ("by_structure", self.by_structure))
        }

    def note(self) -> str:
        which = "name" if self.chosen is self.by_name else "structure (shape, and the key rows' best pairing)"
        renamed = sum(claimed != module for claimed, module in self.chosen.pairs.items())
        return (
            f"Modules paired by {which}: log10 p {self.by_name.log_p() / _LOG10:.1f} paired by name, "
            f"{self.by_structure.log_p() / _LOG10:.1f} paired by structure (the best of "
            f"10^{self.by_structure.log_choices / _LOG10:.1f} pairings within shapes, its p multiplied by that "
            "number); every key row tested in both; the verdict takes twice the smaller (a union bound)."
            + (f" {renamed} suspect modules carry another name than the claim's." if renamed else "")
        )


def _key_test(suspect: Suspect, key: bytes, structure: Structure) -> _KeyVerdict:
    """The key-only test of ``structure``'s key rows against ``suspect``: pairing by name and pairing by structure,
    each exact; p is twice the smaller of the two (a union bound, valid whatever their dependence)."""
    rows = KeyRows(suspect, key, structure)
    name, shape = rows.by_name(), rows.by_structure()
    chosen = name if name.log_p() <= shape.log_p() else shape
    log_p = min(0.0, min(name.log_p(), shape.log_p()) + math.log(2)) if chosen.log_ps else 0.0
    claimed = [m for m, *_ in structure]
    return _KeyVerdict(log_p, chosen, name, shape, len(chosen.pairs), [m for m in claimed if m not in chosen.pairs])


def verify_key(
    suspect: Suspect,
    key: str | bytes | None = None,
    r: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    claim: Claim | None = None,
) -> VerificationResult:
    """Key-only test: overlap of the suspect's row spaces with the key's initial A (see the module doc).

    The key rows come from a structure (module names, shapes, ranks): ``claim``'s (the owner's own public record,
    ``claim.read_claim``; the key must be the claim's), else the suspect's own names and shapes with rank ``r``
    (the owner's LoRA rank) or the suspect's own ranks. Without the record, any change to the suspect's structure
    (renamed or dropped modules, padded ranks) changes every key row, and the test finds nothing: give the record.
    Claimed modules are paired with the suspect's by name and by structure (``KeyRows``)."""
    raw = resolve_key(key)
    if claim is not None:
        check_commitment(raw, claim.key_commitment, claim.salt, "the claim record")
        structure = claim.structure
    else:
        if r is not None:
            too_small = [m for m in suspect.modules() if suspect.shape(m)[1] <= r]
            if too_small:
                raise ValueError(
                    f"r = {r} is not below the input features of {len(too_small)} suspect module(s) (e.g. "
                    f"{too_small[0]}: {suspect.shape(too_small[0])[1]}): r is the owner's LoRA rank, smaller than "
                    "every adapted module's input features."
                )
        structure = _suspect_structure(suspect, r)
    digest = claim.digest() if claim is not None else ""
    return _key_result(suspect, raw, structure, threshold, from_claim=claim is not None, claim_digest=digest)[0]


def _key_result(
    suspect: Suspect, key: bytes, structure: Structure, threshold: float, from_claim: bool, claim_digest: str = ""
) -> tuple[VerificationResult, _KeyVerdict]:
    verdict = _key_test(suspect, key, structure)
    if not verdict.chosen.log_ps:
        result = _result(
            "key",
            0.0,
            0.0,
            threshold,
            0,
            skipped=verdict.skipped,
            components=verdict.components(),
            message="No module could be compared.",
        )
        return result, verdict
    overlaps = verdict.chosen.overlaps
    result = _result(
        "key",
        sum(overlaps) / len(overlaps),
        verdict.log_p,
        threshold,
        verdict.modules,
        skipped=verdict.skipped,
        components=verdict.components(),
        message="statistic: mean overlap |P_S a|^2/|a|^2 of the key's initial rows with the suspect's row spaces. "
        + verdict.note()
        + (RECORD_NOTE.format(digest=claim_digest) if claim_digest else "")
        + ("" if from_claim else SUSPECT_STRUCTURE_NOTE)
        + (f" {suspect.note}" if suspect.note else ""),
    )
    return result, verdict


def verify_passport(
    suspect: Suspect,
    proof_path: str | Path | Proof,
    key: bytes,
    threshold: float = DEFAULT_THRESHOLD,
    pairs: dict[str, str] | None = None,
) -> VerificationResult:
    """The paper's owner test alone (the sign-agreement statistic); forgeable, see ``verify_owner``. ``pairs``
    maps the proof's modules to the suspect's (default: the same names)."""
    proof = read_proof(proof_path)
    check_commitment(key, proof.commitment, proof.salt, "the proof file")
    if proof.claim is None:
        raise ValueError(PROOF_WITHOUT_CLAIM)
    schedule = Claim.from_fields(proof.claim).schedule()
    agree = total = 0
    skipped = []
    present = set(suspect.modules())
    for module, (B0, A0) in proof.factors.items():
        target = (pairs or {}).get(module, module)
        if target not in present or suspect.shape(target) != (B0.shape[0], A0.shape[1]):
            skipped.append(module)
            continue
        C_hat = suspect.core(target, B0, A0)
        C = passport(key, schedule, module, A0.shape[0])
        agree += int(((C_hat * C).sum(0) > 0).sum())  # columns of C_hat pointing along C's columns
        total += C.shape[1]
    if total == 0:
        return _result(
            "passport", 0.0, 0.0, threshold, 0, skipped=skipped, message="No module of the suspect matches the proof."
        )
    log_p = binom_log_sf(agree, total)
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
        raise ValueError(PROOF_WITHOUT_CLAIM)
    claim = Claim.from_fields(proof.claim)
    if (claim.key_commitment, claim.salt) != (proof.commitment, proof.salt):
        raise ValueError(
            "The proof's claim names another key commitment than the proof itself; the proof was altered."
        )
    if structure_of(proof.factors) != claim.structure:
        raise ValueError(
            "The proof's claim lists other modules, shapes or ranks than the proof's own factors: a claim must "
            "describe the adapter it was released from, so it is refused (no verdict)."
        )
    if not hmac.compare_digest(claim.digest(), published_digest(published)):
        raise ValueError(
            "The claim does not match the published commitment: this proof and key are not the ones the published "
            "digest was made from, so the claim is refused (no verdict)."
        )
    key_result, verdict = _key_result(suspect, raw, claim.structure, threshold, from_claim=True)
    passport_result = verify_passport(suspect, proof, raw, threshold, pairs=verdict.chosen.pairs)
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
        f"reported beside it. {verdict.note()}" + (f" {suspect.note}" if suspect.note else ""),
    )
