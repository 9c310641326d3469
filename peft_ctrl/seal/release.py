"""Release a trained SEAL adapter as a plain LoRA adapter, keeping the owner's proof apart."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..factors import balanced_split
from .io import LoraFactors, Proof, read_adapter, write_lora, write_proof
from .keys import check_commitment, passport, resolve_key


def split_passport(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C = C1 C2 with C1 = U S^1/2, C2 = S^1/2 V^T from the SVD of C (computed in float64)."""
    return balanced_split(*torch.linalg.svd(C.double()))


def release(
    adapter_dir: str | Path, out_dir: str | Path, proof_path: str | Path, key: str | bytes | None = None
) -> LoraFactors:
    """Write ``B' = B C1``, ``A' = C2 A`` of every module as a plain LoRA adapter in ``out_dir`` (stock peft
    loads it without peft_ctrl; ``B' A' = B C A``, so outputs are unchanged) and the owner's proof
    (pre-release B, A and the commitment) to ``proof_path``. Both outputs must not exist yet; nothing is
    written unless both can be. Returns the released adapter."""
    sealed = read_adapter(adapter_dir, expect=("SEAL",))
    config = sealed.config
    raw_key = resolve_key(key)
    check_commitment(raw_key, config["commitment"], config["salt"], f"{adapter_dir}/adapter_config.json")
    out_dir, proof_path = Path(out_dir), Path(proof_path)
    if proof_path.resolve().is_relative_to(out_dir.resolve()):
        raise ValueError("The proof file must not be inside the release directory: it is the owner's private data.")
    released = {}
    for module, (B, A) in sealed.factors.items():
        C1, C2 = split_passport(passport(raw_key, module, A.shape[0]))
        released[module] = ((B.double() @ C1).to(B.dtype), (C2 @ A.double()).to(A.dtype))
    adapter = LoraFactors(released, sealed.scaling, config, sealed.extra)
    if proof_path.exists():
        raise FileExistsError(f"{proof_path} already exists; choose a new path (nothing was written).")
    out = write_lora(out_dir, adapter)
    try:
        write_proof(proof_path, Proof(sealed.factors, config["commitment"], config["salt"], int(config["r"])))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return adapter
