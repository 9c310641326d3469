"""Release a trained SEAL adapter as a plain LoRA adapter, keeping the owner's proof apart."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..factors import balanced_split
from .claim import Claim, claim_record, structure_of, weights_sha256
from .io import LoraFactors, Proof, read_adapter, write_lora, write_proof
from .keys import check_commitment, key_schedule, passport, resolve_key


def split_passport(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C = C1 C2 with C1 = U S^1/2, C2 = S^1/2 V^T from the SVD of C (computed in float64)."""
    return balanced_split(*torch.linalg.svd(C.double()))


CLAIM_FILE = "seal_claim.json"


def release(
    adapter_dir: str | Path, out_dir: str | Path, proof_path: str | Path, key: str | bytes | None = None
) -> Claim:
    """Write ``B' = B C1``, ``A' = C2 A`` of every module as a plain LoRA adapter in ``out_dir`` (stock peft
    loads it without peft_ctrl; ``B' A' = B C A``, so outputs are unchanged) with the public claim record
    ``seal_claim.json`` beside it, and the owner's proof (pre-release B, A, the commitment and the claim) to
    ``proof_path``. Both outputs must not exist yet; nothing is written unless both can be.

    Returns the claim: publish ``claim.digest()`` (dated, where verifiers can find it) when releasing; owner
    verification refuses any claim that does not match a published digest (``peft_ctrl.seal.claim``)."""
    sealed = read_adapter(adapter_dir, expect=("SEAL",))
    config = sealed.config
    raw_key = resolve_key(key)
    check_commitment(raw_key, config["commitment"], config["salt"], f"{adapter_dir}/adapter_config.json")
    out_dir, proof_path = Path(out_dir), Path(proof_path)
    if proof_path.resolve().is_relative_to(out_dir.resolve()):
        raise ValueError("The proof file must not be inside the release directory: it is the owner's private data.")
    schedule = key_schedule(structure_of(sealed.factors))
    if config.get("schedule") != schedule:
        raise ValueError(
            f"{adapter_dir}: the adapter's structure (module names, shapes, ranks) does not hash to the key schedule "
            "in its adapter_config.json"
            + (" (it has none: trained by an older peft-ctrl; train it again)" if not config.get("schedule") else "")
            + ", so its passports cannot be re-derived; release the adapter exactly as training saved it."
        )
    released = {}
    for module, (B, A) in sealed.factors.items():
        C1, C2 = split_passport(passport(raw_key, schedule, module, A.shape[0]))
        released[module] = ((B.double() @ C1).to(B.dtype), (C2 @ A.double()).to(A.dtype))
    adapter = LoraFactors(released, sealed.scaling, config, sealed.extra)
    claim = Claim(
        config["commitment"], config["salt"], structure_of(released), weights_sha256(released, sealed.scaling)
    )
    if proof_path.exists():
        raise FileExistsError(f"{proof_path} already exists; choose a new path (nothing was written).")
    out = write_lora(out_dir, adapter, extra_files={CLAIM_FILE: claim_record(claim)})
    try:
        proof = Proof(sealed.factors, config["commitment"], config["salt"], int(config["r"]), claim.fields())
        write_proof(proof_path, proof)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return claim
