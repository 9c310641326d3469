"""Learning curve on the commonsense validation split: does SmolLM2-135M learn the tasks beyond chance with more steps?

    python benchmarks/commonsense_curve.py [--methods lora-all state-ctrl-mlp] [--steps 240] [--every 80]
    python benchmarks/commonsense_curve.py --task commonsense-cloze --steps 240 --every 60

Each row trains once (seed 0) and is scored on the validation split every ``--every`` steps (the record's
``curve``); one result file per row in ``runs/TASK_curve/`` (resumable). Prints the table and writes
docs/results/TASK_curve.{json,md,png} (TASK with ``_`` for ``-``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from peft_ctrl.atomic import atomic_file
from peft_ctrl_app.lm_bench import METHODS, TASKS, BenchArgs, run_bench


def table(results: list[dict]) -> str:
    tasks = list(results[0]["accuracy"])
    lines = [
        "| row | step | " + " | ".join(tasks) + " | average | option NLL |",
        "|---|---:|" + "---:|" * (len(tasks) + 2),
    ]
    for r in results:
        for point in r["curve"]:
            acc = point["accuracy"]
            cells = [f"{100 * acc[t]:.1f}" for t in tasks]
            average = 100 * statistics.fmean(acc.values())
            nll = statistics.fmean(point["option_nll"].values())
            lines.append(
                f"| {METHODS[r['method']].label} | {point['step']} | {' | '.join(cells)} | {average:.1f} | {nll:.3f} |"
            )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        steps = [p["step"] for p in r["curve"]]
        axes[0].plot(steps, [100 * statistics.fmean(p["accuracy"].values()) for p in r["curve"]], "o-")
        axes[1].plot(steps, [statistics.fmean(p["option_nll"].values()) for p in r["curve"]], "o-", label=r["label"])
    axes[0].set(xlabel="step", ylabel="average accuracy %", title="validation accuracy")
    axes[1].axhline((math.log(2) + 3 * math.log(4)) / 4, color="gray", ls=":", label="chance")
    axes[1].set(xlabel="step", ylabel="nats", title="option NLL")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["lora-all", "state-ctrl-mlp"], choices=METHODS)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--every", type=int, default=80)
    parser.add_argument("--task", default="commonsense", choices=tuple(TASKS))
    parser.add_argument("--results-dir", help="default runs/TASK_curve")
    parser.add_argument("--report-dir", default="docs/results")
    options = parser.parse_args()
    name = f"{options.task.replace('-', '_')}_curve"
    args = BenchArgs(
        task=options.task,
        methods=tuple(options.methods),
        seeds=(0,),
        steps=options.steps,
        split="validation",
        eval_items=100,
        eval_every=options.every,
        results_dir=options.results_dir or f"runs/{name}",
    )
    results = run_bench(args)
    text = table(results)
    print(text)
    folder = Path(options.report_dir)
    command = "python benchmarks/commonsense_curve.py " + " ".join(sys.argv[1:])
    note = (
        f"Command: `{command.strip()}`. Validation split, 100 items per task, seed 0, batch 8, "
        f"{results[0]['date']}, {results[0]['machine']}. Chance: BoolQ 50 (majority about 60), the others 25; "
        "option NLL at chance (log 2 + 3 log 4) / 4 = 1.21.\n\n"
    )
    with atomic_file(folder / f"{name}.md") as tmp:
        tmp.write_text(note + text + "\n")
    with atomic_file(folder / f"{name}.json") as tmp:
        tmp.write_text(json.dumps([{k: v for k, v in r.items() if k != "hits"} for r in results], indent=1) + "\n")
    plot(results, folder / f"{name}.png")
    print(f"wrote {folder / name}.md and .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
