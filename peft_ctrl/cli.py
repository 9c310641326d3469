"""The ``peft-ctrl`` command line: parses arguments, calls library functions, prints tables."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any, NoReturn

from ._checks import float_arg, int_arg
from .finetune import DEFAULT_METHODS, METHODS, MODELS, FinetuneArgs, run_finetune, summary_table
from .seal import cli as seal_cli
from .state_ctrl.config import BLOCKS

POSITIVE = float_arg(0.0, low_open=True)


class Parser(argparse.ArgumentParser):
    """argparse with whole option names only (no prefix matching) and one-line usage errors (exit code 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            # Name the unknown options but never echo their values: one may be a secret (a mistyped key option).
            options = [word for word in message.split()[2:] if word.startswith("-")]
            message = f"unrecognized arguments: {' '.join(options) or '(values not shown)'}"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _finetune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune state-ctrl and PEFT LoRA side by side on a built-in model and task (offline)",
        description="Fine-tune a built-in model on the stdlib-topics task with state-ctrl and PEFT LoRA and print "
        "trainable parameters, accuracy, saved-activation bytes and step time side by side.",
    )
    p.add_argument(
        "--method",
        choices=[*METHODS, "both"],
        default="both",
        help="which method to run; both: state-ctrl and lora; seal needs PEFT_CTRL_SEAL_KEY",
    )
    default = FinetuneArgs()  # every default below comes from the dataclass
    p.add_argument(
        "--model",
        choices=MODELS,
        default=default.model,
        help="minilm: pretrained all-MiniLM-L6-v2; tiny-llama: random-init LLaMA from a config",
    )
    p.add_argument("--steps", type=int_arg(1), default=default.steps, help="optimizer steps per run")
    p.add_argument(
        "--seeds", type=int_arg(0), nargs="+", default=list(default.seeds), help="one run per seed and method"
    )
    p.add_argument("--batch-size", type=int_arg(1), default=default.batch_size)
    p.add_argument(
        "--max-length", type=int_arg(9), default=default.max_length, help="tokens per sentence (padded/truncated)"
    )
    p.add_argument("--rank-state-ctrl", type=int_arg(1), default=default.rank_state_ctrl)
    p.add_argument("--blocks", choices=BLOCKS, default=default.blocks, help="state-ctrl blocks to bridge")
    p.add_argument("--rank-lora", type=int_arg(1), default=default.rank_lora)
    p.add_argument("--lr-state-ctrl", type=POSITIVE, default=default.lr["state-ctrl"])
    p.add_argument("--lr-lora", type=POSITIVE, default=default.lr["lora"], help="lr of lora and seal")
    p.add_argument("--output-dir", default=default.output_dir, help="adapters and results.json go here")
    p.add_argument("--no-save", action="store_true", help="do not write adapters")


def _zero_config_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "zero-config",
        help="print the path of a shipped DeepSpeed ZeRO config (or the accelerate launch config)",
        description="Print the path of a shipped config, for launchers: "
        "`accelerate launch --config_file $(peft-ctrl zero-config --accelerate) train.py` or "
        "`--deepspeed $(peft-ctrl zero-config --stage 3)`.",
    )
    p.add_argument("--stage", type=int, default=2, help="ZeRO stage: 2 or 3")
    p.add_argument("--offload", action="store_true", help="stage 3 with parameters and optimizer on the CPU")
    p.add_argument("--accelerate", action="store_true", help="the accelerate launch YAML instead")


def _zero_config(args: argparse.Namespace) -> int:
    from .distributed.zero import accelerate_config_path, config_path

    try:
        print(accelerate_config_path() if args.accelerate else config_path(args.stage, args.offload))
    except ValueError as err:
        print(f"peft-ctrl zero-config: error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="peft-ctrl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _finetune_parser(sub)
    seal_cli.add_parser(sub)
    _zero_config_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "zero-config":
        return _zero_config(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # peft calls a transformers method that transformers 5 renamed; the warning is noise for users here.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if args.command == "seal":
        try:
            return seal_cli.run(args)
        except (ValueError, OSError, RuntimeError) as err:  # exit 2 = error, never 1 (= "not verified")
            print(f"peft-ctrl seal {args.seal_command}: error: {err}", file=sys.stderr)
            return 2
    if args.command == "finetune":
        try:
            config = FinetuneArgs(
                model=args.model,
                methods=DEFAULT_METHODS if args.method == "both" else (args.method,),
                steps=args.steps,
                seeds=tuple(args.seeds),
                batch_size=args.batch_size,
                max_length=args.max_length,
                rank_state_ctrl=args.rank_state_ctrl,
                blocks=args.blocks,
                rank_lora=args.rank_lora,
                lr={"state-ctrl": args.lr_state_ctrl, "lora": args.lr_lora, "seal": args.lr_lora},
                output_dir=args.output_dir,
                save_adapters=not args.no_save,
            )
        except ValueError as err:
            parser.error(str(err))
        results = run_finetune(config)
        print(summary_table(results))
        print(f"adapters and results.json: {config.output_dir}/{config.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
