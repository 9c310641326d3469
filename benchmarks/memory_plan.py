"""Will it fit on my GPU: every method on Llama-3.1-8B and Llama-2-7B in bf16, planned without a GPU.

    python benchmarks/memory_plan.py          # about 10 minutes on 2 cores; resumable (one JSON per model x method)

For each model and method: the planner's breakdown (peft_ctrl.planner: the real model's forward and backward on
the meta device with CUDA's FlashAttention-2 and bool dropout masks) at batch 1 x 512, 2048 and 4096 tokens; whether
the peak fits on 24, 48 and 80 GiB; and the longest sequence (multiples of 256, batch 1) whose peak fits on 24 GiB.
Also the time one plan of every method at 2048 tokens takes on Llama-3.1-8B (the issue's bar: under 60 s).
A second table plans Llama-3.1-8B under bf16 autocast (fp32 weights, what the Trainer's bf16=True runs; QLoRA and
QControl over their nf4 base as they are usually trained) at 2048 tokens, with the longest sequence on 24 GiB.
Writes docs/results/memory_plan.{md,json,png}; README quotes the tables.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from _common import parser, pyplot, save_figure, write_results

from peft_ctrl.planner import GIB, METHODS, longest_sequence, plan

MODELS = ("llama-3.1-8b", "llama-2-7b")
SEQS = (512, 2048, 4096)
CARDS = (24, 48, 80)


AUTOCAST_METHODS = ("lora-all", "lora-all-ckpt", "state-ctrl-mlp", "control-lora", "qlora", "qlora-ckpt", "qcontrol")


def experiment(folder: Path, model: str, method: str, dtype: str = "bf16", seqs: tuple[int, ...] = SEQS) -> dict:
    path = folder / f"{'' if dtype == 'bf16' else dtype + '__'}{model}__{method}.json"
    if path.is_file():
        return json.loads(path.read_text())
    plans = {seq: plan(model, method, seq=seq, dtype=dtype) for seq in seqs}
    record = {
        "model": model,
        "method": method,
        "dtype": dtype,
        "trainable_params": plans[seqs[0]].trainable_params,
        "plans": {str(seq): p.to_dict() for seq, p in plans.items()},
        "longest_seq_24gib": longest_sequence(model, method, 24 * GIB, dtype=dtype),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


def table(records: list[dict]) -> str:
    head = ["model", "method", "trainable"]
    for seq in SEQS:
        head += [f"saved GiB @{seq}", f"peak GiB @{seq}", f"fits @{seq} (24/48/80)"]
    head += ["longest seq on 24 GiB", "x LoRA all-linear"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in records:
        lora = next(x for x in records if x["model"] == r["model"] and x["method"] == "lora-all")
        cells = [r["model"], r["method"], f"{r['trainable_params'] / 1e6:,.1f}M"]
        for seq in SEQS:
            p = r["plans"][str(seq)]
            fits = "/".join("yes" if p["peak"] <= card * GIB else "no" for card in CARDS)
            cells += [f"{p['saved'] / GIB:.2f}", f"{p['peak'] / GIB:.2f}", fits]
        ratio = r["longest_seq_24gib"] / lora["longest_seq_24gib"] if lora["longest_seq_24gib"] else float("inf")
        cells += [f"{r['longest_seq_24gib']:,}", f"{ratio:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def autocast_table(records: list[dict]) -> str:
    lines = [
        "| method (Llama-3.1-8B, bf16 autocast, fp32 weights) | weights GiB | saved GiB @2048 | peak GiB @2048 | "
        "fits @2048 (24/48/80) | longest seq on 24 GiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        p = r["plans"]["2048"]
        fits = "/".join("yes" if p["peak"] <= card * GIB else "no" for card in CARDS)
        lines.append(
            f"| {r['method']} | {p['weights'] / GIB:.2f} | {p['saved'] / GIB:.2f} | {p['peak'] / GIB:.2f} | {fits} | "
            f"{r['longest_seq_24gib']:,} |"
        )
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(MODELS), figsize=(6 * len(MODELS), 4), sharey=True)
    for ax, model in zip(axes, MODELS, strict=True):
        for r in (x for x in records if x["model"] == model):
            ax.plot(SEQS, [r["plans"][str(s)]["peak"] / GIB for s in SEQS], marker="o", label=r["method"])
        for card in CARDS:
            ax.axhline(card, color="grey", lw=0.6, ls="--")
        ax.set_title(f"{model}, bf16, batch 1 (planned, CUDA kernels)")
        ax.set_xlabel("sequence length")
        ax.set_xscale("log", base=2)
    axes[0].set_ylabel("peak GiB (weights + grads + AdamW + saved)")
    axes[-1].legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    args = parser(__doc__).parse_args()
    folder = Path("runs/memory_plan")
    start = time.perf_counter()
    for method in METHODS:
        plan("llama-3.1-8b", method, seq=2048)
    all_methods_seconds = time.perf_counter() - start
    records = [experiment(folder, model, method) for model in MODELS for method in METHODS]
    autocast = [experiment(folder, "llama-3.1-8b", m, "autocast", (2048,)) for m in AUTOCAST_METHODS]
    text = (
        table(records)
        + f"\n\nOne plan of each of the {len(METHODS)} methods on Llama-3.1-8B at 2048 tokens: "
        + f"{all_methods_seconds:.1f} s on this machine.\n\n"
        + autocast_table(autocast)
    )
    data = {
        "records": records,
        "autocast_records": autocast,
        "all_methods_seconds_llama_3_1_8b_2048": all_methods_seconds,
    }
    write_results(args.out, "memory_plan", text, data, lambda p: plot(records, p))


if __name__ == "__main__":
    main()
