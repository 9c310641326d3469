"""The owner's secret key: where it comes from, what is derived from it, and the public commitment.

Passports C and the initial A of every adapted module come from a keyed PRF: HMAC-SHA256(key, purpose, the
adapter's key schedule and the module name) seeds a torch generator that draws Gaussian entries. The key
schedule is the SHA-256 of the adapter's whole structure (every module's name, shape and rank), so the rows of
one module change whenever anything in the structure does: a claimant who varies one module's name or rank draws
fresh rows for every module, and each variation is one whole-claim try (docs/seal.md, "What a claimant chooses").
The key itself is never stored; a configuration carries only ``commitment = SHA-256(domain, salt, key)`` and the
random salt, which an owner may publish to date their claim.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import os
import secrets
from collections import Counter

import torch

from ..factors import haar_orthogonal

KEY_ENV = "PEFT_CTRL_SEAL_KEY"
MIN_KEY_BYTES = 16
SCHEDULE_FORMAT = "peft-ctrl-seal-schedule/1"

# An adapter's structure: (module name, out_features, in_features, r) per adapted module.
Structure = tuple[tuple[str, int, int, int], ...]


def generate_key() -> str:
    """A fresh random key (64 hex characters) for ``PEFT_CTRL_SEAL_KEY``."""
    return secrets.token_hex(32)


def resolve_key(key: str | bytes | None = None) -> bytes:
    """The key given as an argument, else from the environment variable ``PEFT_CTRL_SEAL_KEY``."""
    if key is None:
        key = os.environ.get(KEY_ENV)
    if not key:
        raise ValueError(
            f"SEAL needs the owner's secret key: pass key=... or set the environment variable {KEY_ENV} "
            "(make one with `peft-ctrl seal keygen`). The key is never written to disk."
        )
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if len(raw) < MIN_KEY_BYTES:
        raise ValueError(
            f"The SEAL key is {len(raw)} bytes; use at least {MIN_KEY_BYTES} (`peft-ctrl seal keygen` makes one "
            "of 64 hex characters)."
        )
    return raw


def new_salt() -> str:
    return secrets.token_hex(16)


def commitment(key: bytes, salt: str) -> str:
    """Public commitment to the key: reveals nothing about it, and binds the owner to it."""
    return hashlib.sha256(b"peft-ctrl-seal-commitment\x00" + bytes.fromhex(salt) + key).hexdigest()


def check_commitment(key: bytes, expected: str, salt: str, where: str) -> None:
    if not hmac.compare_digest(commitment(key, salt), expected):
        raise ValueError(
            f"The SEAL key does not match the commitment stored in {where}: this is not the key the adapter was "
            f"trained with. Set {KEY_ENV} (or pass key=) to the owner's key."
        )


def check_structure(structure: object) -> Structure:
    """``structure`` as a valid adapter structure, sorted by module name, or a ``ValueError``.

    A module's key rows are derived from its name alone (within one schedule), so a name listed twice would bring
    the same rows twice and the key-only test would count one piece of evidence as several independent ones; a
    claim that repeats a module is therefore refused, whatever else it says. Shapes and ranks must be positive
    integers."""
    try:
        rows = [(str(m), int(o), int(i), int(r)) for m, o, i, r in structure]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(
            "An adapter structure is a list of (module name, out_features, in_features, r) rows."
        ) from None
    repeated = sorted(m for m, count in Counter(m for m, *_ in rows).items() if count > 1)
    if repeated:
        raise ValueError(
            f"The structure lists {len(repeated)} module(s) more than once (e.g. {repeated[0]!r}). "
            "Each adapted module is one entry: a repeated entry would count the same key rows as new evidence, so "
            "the claim is refused (no verdict)."
        )
    for m, out, inp, r in rows:
        if min(out, inp, r) < 1:
            raise ValueError(
                f"The structure's entry for {m!r} has out_features {out}, in_features {inp} and r {r}: all three "
                "must be positive."
            )
    return tuple(sorted(rows))


def key_schedule(structure: Structure) -> str:
    """SHA-256 (hex) of an adapter's whole structure, in module order: what every key-derived tensor depends on
    besides the key and its own module name. Public (it reveals only the structure)."""
    rows = sorted([str(m), int(o), int(i), int(r)] for m, o, i, r in structure)
    canonical = json.dumps({"format": SCHEDULE_FORMAT, "structure": rows}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _generator(key: bytes, purpose: str, schedule: str, module_name: str) -> torch.Generator:
    digest = hmac.new(key, f"{purpose}\x00{schedule}\x00{module_name}".encode(), hashlib.sha256).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def passport(key: bytes, schedule: str, module_name: str, r: int) -> torch.Tensor:
    """The r x r passport of one module: C = Q D with Q a Haar-random orthogonal matrix and D a diagonal of
    independent fair signs. Orthogonal, so training through C is as well conditioned as plain LoRA; the
    column signs D are fair coins given Q, which gives the passport test its exact null distribution."""
    g = _generator(key, "passport", schedule, module_name)
    Q = haar_orthogonal(r, g)
    signs = torch.randint(0, 2, (r,), generator=g, dtype=torch.float64) * 2 - 1
    return (Q * signs).contiguous()


def initial_a(key: bytes, schedule: str, module_name: str, r: int, in_features: int) -> torch.Tensor:
    """The key-derived initial A (r x in_features): i.i.d. Gaussian rows with LoRA's default variance
    1 / (3 in_features). Its rows are isotropic and independent of each other, which gives the key-only test its
    exact null distribution (and lets it spend some rows on pairing modules and test on the others)."""
    g = _generator(key, "init_a", schedule, module_name)
    return torch.randn(r, in_features, generator=g) / (3 * in_features) ** 0.5


def deepcopy_in_memory(obj: object, memo: dict) -> object:
    """``copy.deepcopy`` of ``obj``'s attributes, key material included: the ``__deepcopy__`` of SEAL objects whose
    pickling leaves it out (an in-memory copy is not a file)."""
    new = type(obj).__new__(type(obj))
    memo[id(obj)] = new
    new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in obj.__dict__.items()})
    return new
