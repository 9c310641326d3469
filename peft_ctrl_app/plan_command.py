"""``peft-ctrl plan``: the memory planner's command line (peft_ctrl.planner)."""

from __future__ import annotations

import argparse
import json

from .args import float_arg, int_arg

# Copies of the planner's names, so that building this parser loads neither torch nor peft; tests/test_planner.py
# checks them against the library's.
SHIPPED = ("gemma-2-9b", "llama-2-7b", "llama-3.1-8b", "mistral-7b", "qwen3-8b")
METHODS = (
    "lora-all",
    "lora-qv",
    "dora",
    "lora-all-ckpt",
    "state-ctrl-mlp",
    "state-ctrl-both",
    "control-lora",
    "full",
    "qlora",
    "qlora-ckpt",
    "qcontrol",
)
ALIASES = {"state-ctrl": "state-ctrl-mlp", "lora": "lora-all"}


def add_parser(sub: argparse._SubParsersAction, help_text: str) -> None:
    p = sub.add_parser(
        "plan",
        help=help_text,
        description="The memory of one training step, from the real model's forward and backward on the meta "
        "device (no weights, no GPU; docs/planner.md): weights, gradients, AdamW state, bytes saved for backward, "
        "and their sum, per rank. With --gpu-gib also the longest sequence that fits.",
    )
    p.add_argument("--model", required=True, help=f"a shipped config ({', '.join(SHIPPED)}) or a config.json path")
    p.add_argument(
        "--method",
        default="all",
        choices=(*METHODS, *ALIASES, "all"),
        help="the method (state-ctrl = state-ctrl-mlp, lora = lora-all); all: every method",
    )
    p.add_argument("--seq", type=int_arg(1), default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--batch", type=int_arg(1), default=1, help="sequences per step (default 1)")
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32", "autocast"),
        default="bf16",
        help="model dtype (default bf16; the quantised methods' compute dtype); autocast: fp32 weights under bf16 "
        "autocast",
    )
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of every layer")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=0, help="DeepSpeed ZeRO stage")
    p.add_argument("--world-size", type=int_arg(1), default=1, help="ranks the ZeRO stage shards across")
    p.add_argument("--target", choices=("cuda", "cpu"), default="cuda", help="whose kernels to model (default cuda)")
    p.add_argument("--gpu-gib", type=float_arg(0.0, low_open=True), help="also the longest sequence that fits")
    p.add_argument("--json", action="store_true", help="print the plans as JSON")


def run(args: argparse.Namespace) -> int:
    from peft_ctrl.planner import GIB, breakdown, longest_sequence, plan

    methods = METHODS if args.method == "all" else (ALIASES.get(args.method, args.method),)
    options = {
        "dtype": args.dtype,
        "batch": args.batch,
        "checkpointing": args.checkpointing,
        "zero_stage": args.zero_stage,
        "world_size": args.world_size,
        "target": args.target,
    }
    records = []
    for method in methods:
        planned = plan(args.model, method, seq=args.seq, **options)
        result = planned.to_dict()
        if args.gpu_gib:
            longest = longest_sequence(args.model, method, int(args.gpu_gib * GIB), **options)
            result[f"longest_seq_on_{args.gpu_gib:g}_gib"] = longest
        records.append(result)
        if not args.json:
            print(breakdown(planned))
            if args.gpu_gib:
                print(f"  longest sequence on {args.gpu_gib:g} GiB (multiples of 256, batch {args.batch}): {longest}")
    if args.json:
        print(json.dumps(records, indent=2))
    return 0
