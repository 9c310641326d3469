"""Reading and writing the files SEAL works with: LoRA adapters (as factors) and the owner's proof file.

Every writer builds the whole result in a temporary sibling and renames it into place, and refuses to
replace an existing output, so an error never leaves a half-written adapter or proof behind.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..atomic import atomic_directory, atomic_file

PREFIX = "base_model.model."
PROOF_FORMAT = "peft-ctrl-seal-proof"


@dataclass
class LoraFactors:
    """A LoRA adapter as data: ``factors[module] = (B, A)`` with delta W = scaling * B @ A per module,
    the other saved tensors (``modules_to_save``) and the adapter config as a dict."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float
    config: dict = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: torch.nn.Module, adapter_name: str = "default") -> LoraFactors:
        """The LoRA factors of an in-memory peft LoRA model (e.g. after further training)."""
        factors, scalings = {}, set()
        for name, module in model.named_modules():
            lora_A = getattr(module, "lora_A", None)
            if isinstance(lora_A, torch.nn.ModuleDict) and adapter_name in lora_A:
                key = name.removeprefix(PREFIX)
                factors[key] = (module.lora_B[adapter_name].weight.detach(), lora_A[adapter_name].weight.detach())
                scalings.add(module.scaling[adapter_name])
        if not factors:
            raise ValueError(f"The model has no LoRA adapter named {adapter_name!r}.")
        if len(scalings) != 1:
            raise ValueError(f"The adapter's layers use different scalings {sorted(scalings)}; not a plain LoRA.")
        return cls(factors, scalings.pop())

    def delta(self, module: str) -> torch.Tensor:
        B, A = self.factors[module]
        return self.scaling * (B.double() @ A.double())


def _split(tensors: dict[str, torch.Tensor], a_name: str, b_name: str) -> tuple[dict, dict]:
    factors: dict[str, list] = {}
    extra = {}
    for name, tensor in tensors.items():
        for slot, suffix in ((1, f".{a_name}.weight"), (0, f".{b_name}.weight")):
            if name.endswith(suffix) and name.startswith(PREFIX):
                factors.setdefault(name[len(PREFIX) : -len(suffix)], [None, None])[slot] = tensor
                break
        else:
            extra[name] = tensor
    broken = [m for m, pair in factors.items() if pair[0] is None or pair[1] is None]
    if broken:
        raise ValueError(f"The adapter misses the A or B factor of {broken[:3]}; the file is incomplete.")
    for module, (B, A) in factors.items():
        _check_pair(module, B, A)
    return {m: (b, a) for m, (b, a) in factors.items()}, extra


def _check_pair(module: str, B: torch.Tensor, A: torch.Tensor) -> None:
    """A LoRA pair must be matrices B (out x r), A (r x in) of one rank, with finite entries."""
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"The factors of {module} do not form a LoRA pair: B {tuple(B.shape)}, A {tuple(A.shape)} (need "
            "B: out x r, A: r x in); the file is damaged or not a LoRA adapter."
        )
    if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
        raise ValueError(f"The factors of {module} contain NaN or infinite values; the file is damaged.")


def read_adapter(path: str | Path, expect: tuple[str, ...] = ("LORA",)) -> LoraFactors:
    """Read a saved peft adapter directory whose ``peft_type`` is one of ``expect`` ("LORA" and/or "SEAL")."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a saved peft adapter (it needs adapter_config.json and adapter_model.safetensors)."
        )
    config = json.loads(config_file.read_text())
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in expect:
        raise ValueError(
            f"{path} holds a {peft_type or 'unknown'} adapter; expected {' or '.join(expect)}. SEAL verifies LoRA "
            "adapters (released or attacked) and merged models (pass the base model's weights)."
        )
    if config.get("use_dora") or config.get("use_rslora"):
        raise ValueError(f"{path} is a DoRA or rsLoRA adapter; SEAL reads plain LoRA adapters only.")
    try:
        tensors = load_file(weights_file)
    except SafetensorError as err:
        raise ValueError(f"{weights_file} is not a readable safetensors file: {err}") from err
    names = ("seal_A", "seal_B") if peft_type == "SEAL" else ("lora_A", "lora_B")
    factors, extra = _split(tensors, *names)
    if not factors:
        raise ValueError(f"{path} contains no LoRA factors.")
    try:
        scaling = float(config["lora_alpha"]) / int(config["r"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise ValueError(f"{config_file} has no usable r and lora_alpha; the adapter config is damaged.") from None
    return LoraFactors(factors, scaling, config, extra)


@contextlib.contextmanager
def atomic_output(path: str | Path, is_dir: bool) -> Iterator[Path]:
    """A new file or directory at ``path``, written atomically (``peft_ctrl.atomic``); an existing file or
    non-empty directory is refused before anything is written, so a release never overwrites one."""
    path = Path(path)
    if path.exists() and (not is_dir or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists; choose a new path (nothing was written).")
    with atomic_directory(path) if is_dir else atomic_file(path) as tmp:
        yield tmp


def write_lora(
    path: str | Path, adapter: LoraFactors, config: dict | None = None, extra_files: dict[str, str] | None = None
) -> Path:
    """Write ``adapter`` as a plain peft LoRA adapter directory (atomically, never over an existing one), with
    ``extra_files`` (name -> text) beside it."""
    from peft import LoraConfig

    source = config if config is not None else adapter.config
    r = {B.shape[1] for B, _ in adapter.factors.values()}
    if len(r) != 1:
        raise ValueError(f"All LoRA factors of one adapter need the same rank, got {sorted(r)}.")
    rank = r.pop()
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=adapter.scaling * rank,
        lora_dropout=float(source.get("lora_dropout", 0.0)),
        target_modules=sorted(adapter.factors),
        modules_to_save=source.get("modules_to_save"),
        task_type=source.get("task_type"),
        base_model_name_or_path=source.get("base_model_name_or_path"),
        revision=source.get("revision"),
        bias="none",
    )
    tensors = dict(adapter.extra)
    for module, (B, A) in adapter.factors.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = A.contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = B.contiguous()
    with atomic_output(path, is_dir=True) as tmp:
        lora_config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(path)


@dataclass
class Proof:
    """The owner's private proof: the pre-release factors, the public commitment (never the key) and the fields
    of the published claim (``claim.Claim``; None in proofs written before claims existed)."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    commitment: str
    salt: str
    r: int
    claim: dict | None = None


def write_proof(path: str | Path, proof: Proof) -> Path:
    tensors = {}
    for module, (B, A) in proof.factors.items():
        tensors[f"{module}.B"] = B.contiguous()
        tensors[f"{module}.A"] = A.contiguous()
    metadata = {"format": PROOF_FORMAT, "commitment": proof.commitment, "salt": proof.salt, "r": str(proof.r)}
    if proof.claim is not None:
        metadata["claim"] = json.dumps(proof.claim, sort_keys=True)
    with atomic_output(path, is_dir=False) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def read_proof(path: str | Path | Proof) -> Proof:
    if isinstance(path, Proof):
        return path
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Proof file {path} not found; owner verification needs the proof written by `peft-ctrl seal release` "
            "(key-only verification needs no proof: use mode 'key')."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except SafetensorError as err:
        raise ValueError(f"{path} is not a SEAL proof file: {err}") from err
    if metadata.get("format") != PROOF_FORMAT:
        raise ValueError(f"{path} is not a SEAL proof file (no '{PROOF_FORMAT}' marker).")
    modules = {name.rsplit(".", 1)[0] for name in tensors}
    factors = {m: (tensors[f"{m}.B"], tensors[f"{m}.A"]) for m in sorted(modules)}
    try:
        claim = json.loads(metadata["claim"]) if "claim" in metadata else None
    except json.JSONDecodeError:
        raise ValueError(f"{path}: the claim stored in the proof is damaged.") from None
    return Proof(factors, metadata["commitment"], metadata["salt"], int(metadata["r"]), claim)
