"""The ``peft-ctrl`` command line: parses arguments, calls library functions, prints tables."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any, NoReturn

from . import plan_command
from .forensics import cli as seal_cli

# Each command's one-line help. A command's parser is built (and its modules imported) only when that command is
# on the command line, so `peft-ctrl seal verify --help` loads neither torch nor peft.
COMMANDS = {
    "finetune": "fine-tune state-ctrl, PEFT LoRA and DoRA side by side on a built-in pretrained model (offline)",
    "bench": "method-comparison benchmarks on SmolLM2 (resumable)",
    "seal": "SEAL watermarks: keygen, release, verify, attack",
    "zero-config": "print the path of a shipped DeepSpeed ZeRO config (or an accelerate launch config)",
    "plan": "the memory of a training step of every method at 7B-9B shapes, computed without a GPU",
}


class Parser(argparse.ArgumentParser):
    """argparse with whole option names only (no prefix matching) and one-line usage errors (exit code 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            # Name the unknown options but never echo their values: one may be a secret (a mistyped key option,
            # given as `--key SECRET`, `--key=SECRET` or `-kSECRET`).
            options = [_option_name(word) for word in message.split()[2:] if word.startswith("-")]
            message = f"unrecognized arguments: {' '.join(options) or '(values not shown)'}"
        elif message.startswith("ambiguous option:"):
            message = f"ambiguous option: {_option_name(message.split()[2])}"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _option_name(word: str) -> str:
    """The option name of a command-line word, without a value attached to it (``--key=X`` or ``-kX``)."""
    if word.startswith("--"):
        return word.split("=", 1)[0]
    return word[:2]


def _zero_config_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "zero-config",
        help=COMMANDS["zero-config"],
        description="Print the path of a shipped config, for launchers: "
        "`accelerate launch --config_file $(peft-ctrl zero-config --accelerate) train.py`, "
        "`--deepspeed $(peft-ctrl zero-config --stage 3)` or, for FSDP2 on GPUs, "
        "`accelerate launch --config_file $(peft-ctrl zero-config --fsdp) train.py`.",
    )
    p.add_argument("--stage", type=int, default=2, help="ZeRO stage: 2 or 3")
    p.add_argument("--offload", action="store_true", help="stage 3 with parameters and optimizer on the CPU")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--accelerate", action="store_true", help="the accelerate launch YAML for DeepSpeed instead")
    which.add_argument("--fsdp", action="store_true", help="the accelerate launch YAML for FSDP2 (GPUs) instead")


def _zero_config(args: argparse.Namespace) -> int:
    from peft_ctrl.distributed.fsdp import accelerate_fsdp_config_path
    from peft_ctrl.distributed.zero import accelerate_config_path, config_path

    try:
        if args.fsdp:
            print(accelerate_fsdp_config_path())
        else:
            print(accelerate_config_path() if args.accelerate else config_path(args.stage, args.offload))
    except ValueError as err:
        print(f"peft-ctrl zero-config: error: {err}", file=sys.stderr)
        return 2
    return 0


def _build(sub: argparse._SubParsersAction, command: str) -> None:
    if command == "finetune":
        from .job_commands import finetune_parser

        finetune_parser(sub, COMMANDS[command])
    elif command == "bench":
        from .job_commands import bench_parser

        bench_parser(sub, COMMANDS[command])
    elif command == "seal":
        seal_cli.add_parser(sub, COMMANDS[command])
    elif command == "plan":
        plan_command.add_parser(sub, COMMANDS[command])
    else:
        _zero_config_parser(sub)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = Parser(prog="peft-ctrl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    given = next((word for word in argv if not word.startswith("-")), None)
    for command, help_text in COMMANDS.items():
        if command == given:
            _build(sub, command)
        else:  # listed in --help; its options are built only when it is the command given
            sub.add_parser(command, help=help_text)
    args = parser.parse_args(argv)
    if args.command == "zero-config":
        return _zero_config(args)
    if args.command == "plan":
        try:
            return plan_command.run(args)
        except ValueError as err:
            print(f"peft-ctrl plan: error: {err}", file=sys.stderr)
            return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # peft calls a transformers method that transformers 5 renamed; the warning is noise for users here.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if args.command == "seal":
        try:
            return seal_cli.run(args)
        except (ValueError, OSError, RuntimeError) as err:  # exit 2 = error, never 1 (= "not verified")
            print(f"peft-ctrl seal {args.seal_command}: error: {err}", file=sys.stderr)
            return 2
    from .job_commands import run_bench_command, run_finetune_command

    run = run_bench_command if args.command == "bench" else run_finetune_command
    return run(args, argv, parser)


if __name__ == "__main__":
    sys.exit(main())
