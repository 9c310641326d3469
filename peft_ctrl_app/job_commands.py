"""``peft-ctrl finetune`` and ``peft-ctrl bench``: their parsers and what they run.

Imported by ``peft_ctrl_app.cli`` only when one of these commands is on the command line (this module loads the
jobs, hence torch and peft).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from peft_ctrl.state_ctrl.config import BLOCKS

from .args import float_arg, int_arg
from .finetune import DEFAULT_LR, DEFAULT_METHODS, METHODS, MODELS, FinetuneArgs, run_finetune, summary_table
from .lm_bench import ABLATION, CLOZE_HEADLINE, HEADLINE, MAIN_JOB, OTHERS, STDLIB_JOB, TASKS, BenchArgs
from .lm_bench import METHODS as BENCH_METHODS

POSITIVE = float_arg(0.0, low_open=True)
ALL_MODELS = ("smollm2", *MODELS)
PRESETS = {
    "headline": HEADLINE,
    "cloze": CLOZE_HEADLINE,
    "main-job": MAIN_JOB,
    "others": OTHERS,
    "ablation": ABLATION,
    "stdlib": STDLIB_JOB,
}
# The README's main job: the cloze form, where SmolLM2-135M's accuracy moves with training (in the label form every
# row stays at chance on ARC and OBQA; docs/commonsense.md#the-cloze-form).
MAIN_TASK = "commonsense-cloze"
DEFAULT_PRESET = {
    "commonsense": "headline",
    "commonsense-cloze": "cloze",
    "commonsense-listed": "main-job",
    "stdlib": "stdlib",
}
QUICK = {"methods": ("lora-all", "state-ctrl-mlp"), "seeds": (0,), "steps": 20, "eval_items": 30}


def finetune_parser(sub: argparse._SubParsersAction, help_text: str) -> None:
    p = sub.add_parser(
        "finetune",
        help=help_text,
        description="The main job. --model smollm2 (default), --task commonsense-cloze (default): fine-tune "
        "SmolLM2-135M-Instruct on the commonsense suite (BoolQ, ARC-Easy, ARC-Challenge, OpenBookQA) in the cloze "
        "form (the question alone, answered with the option's words) with PEFT LoRA all-linear and q,k,v, state-ctrl "
        "mlp and Control+LoRA, one seed, and report per-task accuracy, saved bytes and step time (about 11 minutes on "
        "2 cores; --quick: 2 rows, 20 steps, 30 items per task; docs/commonsense.md). --task commonsense: the same "
        "questions in the LLM-Adapters label form. --task stdlib: the stdlib-topics chat task, 6 methods x 3 seeds "
        "(docs/finetune.md), by the same runner as `peft-ctrl bench`. --model minilm: classify the stdlib sentences "
        "with all-MiniLM-L6-v2. Flags left out take the job's defaults.",
    )
    p.add_argument("--model", choices=ALL_MODELS, default="smollm2", help="the base model and its job")
    p.add_argument(
        "--task",
        choices=tuple(TASKS),
        help="smollm2: 'commonsense-cloze' (default: BoolQ, ARC-e, ARC-c, OBQA answered in words; the seed-0 subset "
        "of `peft-ctrl bench commonsense-cloze` in docs/commonsense.md), 'commonsense' (the same questions in the "
        "LLM-Adapters label form) or 'stdlib' (the stdlib-topics chat task of docs/finetune.md)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help="methods to run; smollm2: the rows of `peft-ctrl bench` (default: the task's main rows); minilm and "
        f"tiny-llama: {', '.join(METHODS)} (default: {', '.join(DEFAULT_METHODS)}; seal needs PEFT_CTRL_SEAL_KEY)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: one seed, few steps (smollm2: LoRA all-linear and state-ctrl mlp, 20 steps, 30 items per "
        "subtask)",
    )
    p.add_argument("--steps", type=int_arg(1), help="optimizer steps per run")
    p.add_argument("--seeds", type=int_arg(0), nargs="+", help="one run per seed and method")
    p.add_argument("--batch-size", type=int_arg(1))
    p.add_argument("--max-length", type=int_arg(4), help="tokens kept of each sentence")
    p.add_argument("--rank-state-ctrl", type=int_arg(1), help="state-ctrl rank")
    p.add_argument("--rank-lora", type=int_arg(1), help="rank of LoRA and DoRA")
    p.add_argument("--lr-state-ctrl", type=POSITIVE, help="peak learning rate of state-ctrl")
    p.add_argument("--lr-lora", type=POSITIVE, help="peak learning rate of LoRA, DoRA and SEAL")
    p.add_argument("--blocks", choices=BLOCKS, help="minilm, tiny-llama: the state-ctrl blocks to bridge")
    p.add_argument(
        "--output-dir",
        help="minilm, tiny-llama: adapters go to OUTPUT_DIR/MODEL/METHOD/seedN (default runs/finetune); smollm2: "
        "experiments and report go to OUTPUT_DIR/TASK",
    )
    p.add_argument(
        "--results-dir",
        help="smollm2: experiment JSONs, adapters and finetune_TASK.json/.md/.png (default runs/TASK, "
        "runs/finetune/TASK-quick with --quick)",
    )
    p.add_argument("--no-save", action="store_true", help="do not write adapters")
    p.add_argument(
        "--no-bf16",
        action="store_true",
        help="smollm2: train and score in fp32 instead of bf16 autocast (for CPUs without native bf16: AVX2-only)",
    )


# flag -> the field it sets, in the MiniLM / tiny-LLaMA job's settings
_SHARED_FLAGS = {
    "methods": "methods",
    "steps": "steps",
    "seeds": "seeds",
    "batch_size": "batch_size",
    "max_length": "max_length",
    "rank_state_ctrl": "rank_state_ctrl",
    "rank_lora": "rank_lora",
    "output_dir": "output_dir",
}
_CLASSIFIERS = ("minilm", "tiny-llama")
# flags of one kind of job only (the SmolLM2 rows carry their own ranks and learning rates)
_ONLY = {
    "blocks": _CLASSIFIERS,
    "max_length": _CLASSIFIERS,
    "rank_state_ctrl": _CLASSIFIERS,
    "rank_lora": _CLASSIFIERS,
    "lr_state_ctrl": _CLASSIFIERS,
    "lr_lora": _CLASSIFIERS,
    "results_dir": ("smollm2",),
}


def _lm_settings(args: argparse.Namespace) -> BenchArgs:
    """``peft-ctrl finetune`` on SmolLM2: the task's main job (``BenchArgs.main_job``) with the flags given."""
    task = args.task or MAIN_TASK
    given: dict[str, Any] = dict(QUICK) if args.quick else {}
    for flag in ("methods", "seeds", "steps", "batch_size"):
        value = getattr(args, flag)
        if value is not None:
            given[flag] = tuple(value) if isinstance(value, list) else value
    # The commonsense main job's experiments are the full comparison's seed-0 ones: `peft-ctrl bench TASK` resumes
    # from them. The quick run has other settings, so it keeps its own folder.
    default = f"runs/finetune/{task}-quick" if args.quick else f"runs/{task}"
    given["results_dir"] = args.results_dir or (f"{args.output_dir}/{task}" if args.output_dir else default)
    if not args.no_save:
        given["save_adapters"] = f"{given['results_dir']}/adapters"
    if args.no_bf16:
        given["bf16"] = False
    return BenchArgs.main_job(task, **given)


def _finetune_settings(args: argparse.Namespace) -> FinetuneArgs | BenchArgs:
    """The job's settings from the flags given; the rest keep the job's defaults. Raises ValueError."""
    if args.task is not None and args.model != "smollm2":
        raise ValueError("--task applies to --model smollm2 only")
    for flag, models in _ONLY.items():
        if getattr(args, flag) is not None and args.model not in models:
            hint = " (SmolLM2 rows: `peft-ctrl bench TASK --lr METHOD=LR`)" if flag.startswith("lr_") else ""
            raise ValueError(f"--{flag.replace('_', '-')} applies to --model {' / '.join(models)} only{hint}")
    if args.no_bf16 and args.model != "smollm2":
        raise ValueError("--no-bf16 applies to --model smollm2 only (the other jobs train in fp32)")
    if args.model == "smollm2":
        return _lm_settings(args)
    given = {field: getattr(args, flag) for flag, field in _SHARED_FLAGS.items() if getattr(args, flag) is not None}
    for key in ("methods", "seeds"):
        if key in given:
            given[key] = tuple(given[key])
    if args.no_save:
        given["save_adapters"] = False
    lr = dict(DEFAULT_LR)
    if args.lr_state_ctrl is not None:
        lr["state-ctrl"] = args.lr_state_ctrl
    if args.lr_lora is not None:
        lr["lora"] = lr["seal"] = args.lr_lora
    given["lr"] = lr
    if args.blocks is not None:
        given["blocks"] = args.blocks
    if args.quick:
        given = {"steps": 50, "seeds": (0,), **given}
    return FinetuneArgs(model=args.model, **given)


def _finetune(settings: FinetuneArgs | BenchArgs, command: str) -> int:
    if isinstance(settings, BenchArgs):
        name = f"finetune_{settings.task.replace('-', '_')}"
        return _run_bench(settings, command, settings.results_dir, name)
    results = run_finetune(settings)
    print(summary_table(results))
    print(f"adapters and results.json: {settings.output_dir}/{settings.model}")
    return 0


def _run_bench(settings: BenchArgs, command: str, report_dir: str, name: str) -> int:
    from .lm_bench import run_bench, write_report
    from .lm_bench import summary_table as bench_table

    results = run_bench(settings)
    print(bench_table(results))
    written = write_report(results, report_dir, name, command)
    print(f"report: {', '.join(map(str, written))}")
    if settings.save_adapters:
        print(f"adapters: {settings.save_adapters}/METHOD/seedN")
    return 0


def bench_parser(sub: argparse._SubParsersAction, help_text: str) -> None:
    bench = sub.add_parser("bench", help=help_text)
    tasks = bench.add_subparsers(dest="bench_task", required=True)
    commonsense = tasks.add_parser(
        "commonsense",
        help="BoolQ, ARC-Easy, ARC-Challenge, OpenBookQA: every method trained on the train mixture, scored per task",
        description="Train SmolLM2-135M-Instruct with each method on the mixture of the four train splits and score "
        "each test split by the most likely answer option (docs/commonsense.md). One JSON per finished experiment in "
        "RESULTS_DIR/SPLIT/: an interrupted run resumes where it stopped.",
    )
    cloze = tasks.add_parser(
        "commonsense-cloze",
        help="the same questions in the cloze form: the question alone, answered with the option's words",
        description="Train SmolLM2-135M-Instruct with each method on the four train splits in the cloze form (the "
        "question alone, the response the correct option's own words) and score each test split by the option "
        "whose words the model finds most likely, through the end-of-turn token (docs/commonsense.md#the-cloze-form). "
        "One JSON per finished experiment in RESULTS_DIR/SPLIT/: an interrupted run resumes where it stopped.",
    )
    listed = tasks.add_parser(
        "commonsense-listed",
        help="the same questions with the options listed, answered with the option's words",
        description="As commonsense-cloze, but the question keeps its listed options (Answer1: ... Answer4: ...); "
        "the response is the correct option's words (docs/commonsense.md#the-cloze-form).",
    )
    stdlib = tasks.add_parser(
        "stdlib",
        help="the stdlib-topics chat task (six topics of Python docstring sentences), by the same runner",
        description="Train SmolLM2-135M-Instruct with each method on the stdlib topics asked as a chat question and "
        "score the test sentences by the most likely topic, each answer through its end-of-turn token "
        "(docs/finetune.md). One JSON per finished experiment in RESULTS_DIR/SPLIT/: an interrupted run resumes.",
    )
    for p in (commonsense, cloze, listed, stdlib):
        _bench_flags(p)


def _bench_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        choices=PRESETS,
        help="the rows to run when --methods is not given (default: headline for commonsense, cloze for "
        "commonsense-cloze, stdlib for stdlib)",
    )
    p.add_argument("--methods", nargs="+", metavar="METHOD", help=f"rows to run: {', '.join(BENCH_METHODS)}")
    p.add_argument("--seeds", type=int_arg(0), nargs="+", help="one run per seed and method (default 0 1 2)")
    p.add_argument("--steps", type=int_arg(1), help="optimizer steps per run (default: commonsense 60, stdlib 22)")
    p.add_argument("--batch-size", type=int_arg(1), help="examples per step (default 8)")
    p.add_argument("--split", choices=("test", "validation"), help="score the test splits (default) or validation")
    p.add_argument("--eval-items", type=int_arg(0), help="items scored per task (default 150; 0 = the whole split)")
    p.add_argument("--validation-items", type=int_arg(1), help="items per task held out of train (default 100)")
    p.add_argument("--lr", nargs="+", metavar="METHOD=LR", help="peak learning rates replacing the rows' defaults")
    p.add_argument("--results-dir", help="experiment JSONs (default runs/TASK)")
    p.add_argument("--report-dir", help="where the table, JSON and plot go (default RESULTS_DIR)")
    p.add_argument("--report-name", help="file name of the report (default: the task's name)")
    p.add_argument("--save-adapters", metavar="DIR", help="keep every trained adapter in DIR/METHOD/seedN")
    p.add_argument("--no-bf16", action="store_true", help="train and score in fp32 instead of bf16 autocast")
    p.add_argument("--eval-only", action="store_true", help="score saved adapters (--adapters) on --test-file")
    p.add_argument("--adapters", help="--eval-only: folder holding saved adapters (any depth)")
    p.add_argument("--test-file", nargs="+", help="--eval-only: files in the LLM-Adapters format to score")


def _bench_settings(args: argparse.Namespace) -> BenchArgs:
    """Raises ValueError on bad flags."""
    preset = args.preset or DEFAULT_PRESET[args.bench_task]
    methods = tuple(args.methods) if args.methods else PRESETS[preset]
    given: dict[str, Any] = {"task": args.bench_task, "methods": methods, "steps": TASKS[args.bench_task].steps}
    for flag in ("steps", "batch_size", "split", "validation_items", "results_dir", "save_adapters"):
        if getattr(args, flag) is not None:
            given[flag] = getattr(args, flag)
    if args.seeds is not None:
        given["seeds"] = tuple(args.seeds)
    if args.eval_items is not None:
        given["eval_items"] = args.eval_items or None
    if args.lr:
        lr = {}
        for word in args.lr:
            method, sep, value = word.partition("=")
            try:
                lr[method] = float(value)
            except ValueError:
                sep = ""
            if not sep:
                raise ValueError(f"--lr takes METHOD=LR words, e.g. lora-all=1e-3; got {word!r}")
        given["lr"] = lr
    given["bf16"] = not args.no_bf16
    return BenchArgs(**given)


def _eval_only(args: argparse.Namespace) -> int:
    from .lm_bench import score_adapters

    if not args.adapters or not args.test_file:
        raise ValueError("--eval-only needs --adapters DIR and --test-file FILE [FILE ...]")
    for record in score_adapters(args.adapters, args.test_file, bf16=not args.no_bf16, task=args.bench_task):
        cells = ", ".join(f"{task} {100 * acc:.1f}" for task, acc in record["accuracy"].items())
        print(f"{record['adapter']}: {cells}")
    return 0


def run_bench_command(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser) -> int:
    """``peft-ctrl bench TASK ...``: bad flags are usage errors (exit 2, one line) before anything is loaded."""
    if args.eval_only and (args.methods or args.seeds or args.steps or args.lr or args.save_adapters):
        parser.error("bench: --eval-only scores saved adapters; training flags do not apply to it")
    if not args.eval_only:
        try:
            settings = _bench_settings(args)
        except ValueError as err:
            parser.error(f"bench: {err}")
    try:
        if args.eval_only:
            return _eval_only(args)
        report_dir = args.report_dir or settings.results_dir
        name = args.report_name or settings.task
        return _run_bench(settings, "peft-ctrl " + " ".join(argv), report_dir, name)
    except (ValueError, OSError) as err:
        print(f"peft-ctrl bench: error: {err}", file=sys.stderr)
        return 2


def run_finetune_command(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser) -> int:
    """``peft-ctrl finetune ...``: the main job."""
    try:
        settings = _finetune_settings(args)
    except ValueError as err:
        parser.error(f"finetune: {err}")
    try:
        return _finetune(settings, "peft-ctrl " + " ".join(argv))
    except ImportError as err:  # a model's package is missing: say which one to install
        print(f"peft-ctrl finetune: error: {err}", file=sys.stderr)
        return 2
