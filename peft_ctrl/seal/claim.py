"""The public claim: what an owner publishes when releasing, and what a verifier checks a claim against.

A claim binds three things, so none of them can be chosen after the release:

* the key, through its salted commitment (``keys.commitment``; the key itself stays secret),
* the adapter's structure: every module's name, shape and rank (so the number of key rows a test uses comes from
  the claim, not from a file the suspect or the claimant writes later),
* the released weights, by their SHA-256.

``Claim.digest()`` is the SHA-256 of those fields; it is what the owner publishes (with a date, in a place the
verifier trusts: a model card, a signed release note, a timestamping service). The full record is public too
(``write_claim``). Owner verification recomputes the digest from the claimant's proof and refuses the claim unless
it equals the published one: a forger who writes his own proof for the released adapter needs a digest published
before the owner's, which the software cannot date and the verifier must check.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .keys import check_structure, key_schedule

CLAIM_FORMAT = "peft-ctrl-seal-claim/1"
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Claim:
    key_commitment: str
    salt: str
    structure: tuple[tuple[str, int, int, int], ...]  # (module, out_features, in_features, r), sorted by module
    weights_sha256: str

    def __post_init__(self) -> None:
        # One entry per module, in module order: a claim that repeats a module is refused (keys.check_structure),
        # and the order of listing is not the claimant's to choose (it is normalised before hashing).
        object.__setattr__(self, "structure", check_structure(self.structure))

    def fields(self) -> dict:
        return {
            "format": CLAIM_FORMAT,
            "key_commitment": self.key_commitment,
            "salt": self.salt,
            "structure": [list(row) for row in self.structure],
            "weights_sha256": self.weights_sha256,
        }

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the fields: the string the owner publishes."""
        canonical = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def ranks(self) -> dict[str, int]:
        return {module: r for module, _, _, r in self.structure}

    def schedule(self) -> str:
        """The key schedule of the claimed structure (``keys.key_schedule``): the key rows a test uses."""
        return key_schedule(self.structure)

    @classmethod
    def from_fields(cls, fields: dict) -> Claim:
        if fields.get("format") != CLAIM_FORMAT:
            raise ValueError(f"Not a SEAL claim record (format {fields.get('format')!r}, expected {CLAIM_FORMAT!r}).")
        try:
            structure = tuple((str(m), int(o), int(i), int(r)) for m, o, i, r in fields["structure"])
            commitment, salt, sha = str(fields["key_commitment"]), str(fields["salt"]), str(fields["weights_sha256"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("The SEAL claim record is damaged (missing or malformed fields).") from None
        return cls(commitment, salt, structure, sha)


def structure_of(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[tuple[str, int, int, int], ...]:
    return tuple((m, B.shape[0], A.shape[1], A.shape[0]) for m, (B, A) in sorted(factors.items()))


def weights_sha256(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> str:
    """SHA-256 over the scaling and every module's name, factor dtypes, shapes and bytes, in module order."""
    h = hashlib.sha256(f"{CLAIM_FORMAT}\x00scaling={scaling!r}".encode())
    for module, (B, A) in sorted(factors.items()):
        for name, t in (("B", B), ("A", A)):
            t = t.detach().cpu().contiguous()
            h.update(f"\x00{module}.{name}:{t.dtype}:{tuple(t.shape)}\x00".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def claim_record(claim: Claim) -> str:
    """The public record as JSON text: the fields and their digest (``release`` writes it as seal_claim.json)."""
    return json.dumps({**claim.fields(), "claim": claim.digest()}, indent=2) + "\n"


def published_digest(published: str | Path) -> str:
    """The published digest from a 64-hex string or a claim record file (whose fields must hash to it)."""
    text = str(published).strip().lower()
    if _HEX64.fullmatch(text):
        return text
    return read_claim(published).digest()


def read_claim(path: str | Path) -> Claim:
    """The claim in a public claim record file (seal_claim.json), checked against the digest it states."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            "The published claim must be the 64-hex digest printed by `peft-ctrl seal release` or the claim record "
            f"file it wrote; got {str(path)[:80]!r}, which is neither."
        )
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a SEAL claim record: {err}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a SEAL claim record (not a JSON object).")
    claim = Claim.from_fields(record)
    if not hmac.compare_digest(str(record.get("claim", "")), claim.digest()):
        raise ValueError(f"{path}: the record's fields do not hash to its 'claim' digest; the record was altered.")
    return claim
