"""``peft-ctrl seal ...``: keygen, release, verify and attack. The key is read from PEFT_CTRL_SEAL_KEY or a
key file, never from the command line (where it would land in shell history and process lists)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..args import float_arg, int_arg

# Copies of library constants, so that building this parser loads neither torch nor peft (the library's import
# does); tests/test_seal.py checks each against the value it copies.
KEY_ENV = "PEFT_CTRL_SEAL_KEY"  # peft_ctrl.seal.keys.KEY_ENV
OWNER_THRESHOLD = 2.0**-64  # peft_ctrl.seal.verify.OWNER_THRESHOLD
DEFAULT_THRESHOLD = 1e-6  # peft_ctrl.seal.verify.DEFAULT_THRESHOLD
CLAIM_FILE = "seal_claim.json"  # peft_ctrl.seal.release.CLAIM_FILE
WEIGHT_ATTACKS = ("prune", "noise", "obfuscate", "permute", "refactorize", "pad-rank")  # attacks.WEIGHT_ATTACKS


def add_parser(sub: argparse._SubParsersAction, help_text: str) -> None:
    seal = sub.add_parser("seal", help=help_text)
    cmds = seal.add_subparsers(dest="seal_command", required=True)
    cmds.add_parser("keygen", help=f"print a fresh random key for {KEY_ENV}")

    def key_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--key-file", type=Path, help=f"file holding the key (default: the variable {KEY_ENV})")

    p = cmds.add_parser("release", help="write a trained SEAL adapter as a plain LoRA adapter plus a private proof")
    p.add_argument("adapter_dir", type=Path)
    p.add_argument("out_dir", type=Path, help="the release (plain LoRA); must not exist")
    p.add_argument("--proof", type=Path, help="private proof file (default: ADAPTER_DIR/seal_proof.safetensors)")
    key_option(p)

    p = cmds.add_parser(
        "verify",
        help="test a suspect LoRA adapter or merged model for the watermark",
        description="Exit status: 0 verified, 1 not verified, 2 error (bad input, unreadable files).",
    )
    p.add_argument("suspect", type=Path, help="LoRA adapter directory, or merged weights (.safetensors)")
    p.add_argument("--mode", choices=["owner", "key"], default="owner", help="owner: needs --proof; key: key only")
    p.add_argument("--proof", type=Path, help="the proof file written by release (owner mode)")
    p.add_argument(
        "--published",
        help="owner mode: the claim digest published at release (64 hex characters) or the claim record file "
        "(seal_claim.json); claims that do not match it are refused. key mode: the owner's claim record file, "
        "which fixes the structure (names, shapes, ranks) the key rows come from; use your own copy",
    )
    p.add_argument("--base", type=Path, help="base model weights (.safetensors) when the suspect is a merged model")
    p.add_argument("--r", type=int_arg(1), help="the owner's LoRA rank (key mode on a merged model)")
    p.add_argument(
        "--threshold",
        type=float_arg(0.0, 1.0, low_open=True, high_open=True),
        help=f"verified when p < threshold (default: owner {OWNER_THRESHOLD:.3g} = 2^-64, key {DEFAULT_THRESHOLD:g})",
    )
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    key_option(p)

    p = cmds.add_parser(
        "attack",
        help="write an attacked copy of a released LoRA adapter (continued fine-tuning: the Python function "
        "peft_ctrl_app.forensics.attacks.continued_finetune, which needs your model and data)",
    )
    p.add_argument("adapter_dir", type=Path)
    p.add_argument("out", type=Path, help="adapter directory; merge: a .safetensors file; forge: a proof file")
    p.add_argument("--kind", choices=[*WEIGHT_ATTACKS, "merge", "forge"], required=True)
    p.add_argument(
        "--strength",
        type=float_arg(0.0),
        default=0.5,
        help="prune: fraction; noise: std relative to RMS; pad-rank: components added",
    )
    p.add_argument("--seed", type=int_arg(0), default=0)
    p.add_argument("--base", type=Path, help="merge: the base model's weights (.safetensors or a directory)")
    p.add_argument("--forged-key-file", type=Path, help="forge: the forger's key (a file)")


def _key(args: argparse.Namespace) -> str | None:
    if getattr(args, "key_file", None) is None:
        return None  # resolve_key reads the environment
    if not args.key_file.is_file():
        raise FileNotFoundError(f"Key file {args.key_file} not found.")
    return args.key_file.read_text().strip()


def _safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found.")
    return load_file(file)


def run(args: argparse.Namespace) -> int:
    """Run one ``seal`` sub-command; returns the exit status (verify: 0 verified, 1 not verified)."""
    if args.seal_command == "keygen":
        from peft_ctrl.seal.keys import generate_key

        print(generate_key())
        return 0
    if args.seal_command == "release":
        return _release(args)
    if args.seal_command == "attack":
        return _attack(args)
    return _verify(args)


def _release(args: argparse.Namespace) -> int:
    from peft_ctrl.seal.release import release

    proof = args.proof or args.adapter_dir / "seal_proof.safetensors"
    claim = release(args.adapter_dir, args.out_dir, proof, key=_key(args))
    print(f"released {len(claim.structure)} LoRA modules to {args.out_dir}; private proof: {proof}")
    print(f"publish this claim digest now, dated, where verifiers will look (e.g. the model card): {claim.digest()}")
    print(f"(its public record: {args.out_dir / CLAIM_FILE})")
    return 0


def _attack(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from peft_ctrl.seal.io import atomic_output, read_adapter, write_lora, write_proof

    from . import attacks

    adapter = read_adapter(args.adapter_dir)
    if args.kind == "merge":
        if args.base is None:
            raise ValueError("--kind merge needs --base (the base model's weights).")
        with atomic_output(args.out, is_dir=False) as tmp:
            save_file(attacks.merge(adapter, _safetensors(args.base)), str(tmp))
        print(f"wrote the merged model to {args.out}")
        return 0
    if args.kind == "forge":
        if args.forged_key_file is None or not args.forged_key_file.is_file():
            raise ValueError("--kind forge needs --forged-key-file (the forger's key in a file).")
        forged = attacks.forge_proof(adapter, args.forged_key_file.read_text().strip())
        write_proof(args.out, forged)
        print(
            f"wrote a forged proof for the forger's key to {args.out}; the forger's claim digest (what they "
            f"would publish): {attacks.claim_of(forged).digest()}"
        )
        return 0
    if args.kind == "prune":
        attacked = attacks.prune(adapter, args.strength)
    elif args.kind == "noise":
        attacked = attacks.noise(adapter, args.strength, seed=args.seed)
    elif args.kind == "refactorize":
        attacked = attacks.refactorize(adapter)
    elif args.kind == "pad-rank":
        if args.strength < 1 or args.strength != int(args.strength):
            raise ValueError("--kind pad-rank takes --strength N: how many near-null components to add (N >= 1).")
        attacked = attacks.pad_rank(adapter, int(args.strength), seed=args.seed)
    else:
        attacked = getattr(attacks, args.kind)(adapter, seed=args.seed)
    write_lora(args.out, attacked)
    print(f"wrote the {args.kind} attack of {args.adapter_dir} to {args.out}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from peft_ctrl.seal.claim import read_claim
    from peft_ctrl.seal.verify import Suspect, verify_key, verify_owner

    if (args.suspect / "adapter_config.json").is_file():
        suspect = Suspect.from_adapter(args.suspect)
    elif args.base is None:
        raise ValueError(f"{args.suspect} is not a LoRA adapter directory; for a merged model also pass --base.")
    else:
        suspect = Suspect.from_merged(_safetensors(args.suspect), _safetensors(args.base), rank=args.r or 64)
    if args.mode == "owner":
        if args.proof is None or args.published is None:
            raise ValueError(
                "Owner verification needs --proof (the file written by release) and --published (the claim digest "
                "published at release); or use --mode key."
            )
        threshold = OWNER_THRESHOLD if args.threshold is None else args.threshold
        result = verify_owner(suspect, args.proof, args.published, key=_key(args), threshold=threshold)
    else:
        threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
        claim = None
        if args.published is not None:
            if Path(args.published).is_dir() or not Path(args.published).exists():
                raise ValueError(
                    "--mode key takes --published as the owner's claim record file (seal_claim.json in the release), "
                    "which holds the ranks; a digest alone does not."
                )
            claim = read_claim(args.published)
        result = verify_key(suspect, key=_key(args), r=args.r, threshold=threshold, claim=claim)
    print(json.dumps(result.to_dict(), indent=2) if args.json else str(result))
    return 0 if result.verified else 1
