"""Learning-rate grid and state-ctrl ablation on a task's validation split (never the test splits).

    python benchmarks/commonsense_grid.py [--groups grid ablation odelora] [--steps 60] [--seeds 0]
                                          [--report-name commonsense_grid] [--task commonsense]
    python benchmarks/commonsense_grid.py --task stdlib --groups grid --steps 22 --report-name stdlib_grid
    python benchmarks/commonsense_grid.py --task commonsense-cloze --groups cloze --report-name commonsense_cloze_grid

Each (row, lr) is one experiment of ``peft-ctrl bench commonsense`` with its own results folder
(``runs/TASK_grid/lrLR/validation/METHOD__seedN.json``), so an interrupted grid resumes. Prints the table
and writes docs/results/REPORT_NAME.{json,md,png}; the ODELoRA group has its own report (``--groups odelora
--report-name commonsense_grid_odelora``), so it does not replace the main grid's. The row with the lowest option
NLL of each method sets its lr in ``peft_ctrl_app.lm_bench.METHODS`` (docs/commonsense.md). 2e-4 is the stdlib chat
job's state-ctrl lr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peft_ctrl_app.lm_bench import METHODS, TASKS, BenchArgs, run_bench, summary_table, write_report

GROUPS = {
    # the two rows whose lr every other row shares (LoRA-family rows use LoRA's, bridges use state-ctrl's)
    "grid": [("lora-all", lr) for lr in (3e-4, 1e-3, 3e-3)] + [("state-ctrl-mlp", lr) for lr in (2e-4, 1e-3)],
    # candidate causes of state-ctrl's slower learning: one lr for bridges that read states of very different
    # scale (depth-scaled lr instead, at three lr), the rank, and the placement with depth-scaled lr
    "ablation": [("state-ctrl-mlp-depth-lr", lr) for lr in (3e-4, 1e-3, 3e-3)]
    + [("state-ctrl-mlp-r16", 1e-3), ("state-ctrl-both-depth-lr", 1e-3), ("control-lora-depth-lr", 1e-3)],
    # the cloze form (--task commonsense-cloze): LoRA all-linear's lr, and state-ctrl mlp's from the letter-form lr
    # upward (bridges learned slower than LoRA there at 1e-3)
    "cloze": [("lora-all", lr) for lr in (3e-4, 1e-3, 3e-3)]
    + [("state-ctrl-mlp", lr) for lr in (3e-4, 1e-3, 3e-3, 1e-2)],
    # the listed form (--task commonsense-listed): the two rows at their lr, against the cloze form's
    "listed": [("state-ctrl-mlp", 1e-3)],
    # candidate causes of state-ctrl's gap in the cloze form, each one change at the grid's lr: placement (both
    # blocks, Control+LoRA), the scale of the state the bridge reads (depth-scaled lr; reading the normed state),
    # the rank, and dropout on the bridge input
    "cloze-ablation": [
        ("state-ctrl-both", 1e-3),
        ("control-lora", 1e-3),
        ("state-ctrl-mlp-depth-lr", 3e-3),
        ("state-ctrl-mlp-normed", 1e-3),
        ("state-ctrl-mlp-r128", 1e-3),
        ("state-ctrl-mlp-dropout", 1e-3),
    ],
    # ODELoRA integrates the gradient flow of W: its lr is a step of that flow, on another scale than Adam's (0.1
    # and 0.3 diverge here: training loss 17 and 5 against AdamW LoRA's 0.2)
    "odelora": [("odelora", lr) for lr in (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)],
}
REFERENCE = ("lora-all", 1e-3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", nargs="+", choices=GROUPS, default=["grid", "ablation"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--task", default="commonsense", choices=tuple(TASKS))
    parser.add_argument("--results-dir", help="default runs/TASK_grid")
    parser.add_argument("--report-dir", default="docs/results")
    parser.add_argument("--report-name", default="commonsense_grid", help="file stem of the report")
    options = parser.parse_args()
    rows = [REFERENCE] + [row for group in options.groups for row in GROUPS[group] if row != REFERENCE]
    results = []
    for method, lr in rows:
        args = BenchArgs(
            task=options.task,
            methods=(method,),
            seeds=tuple(options.seeds),
            steps=options.steps,
            split="validation",
            eval_items=100,
            lr={method: lr},
            results_dir=str(Path(options.results_dir or f"runs/{options.task}_grid") / f"lr{lr:g}"),
        )
        for record in run_bench(args):
            record["method"] = f"{method}@{lr:g}"
            record["label"] = f"{METHODS[method].label} (lr {lr:g})"
            results.append(record)
    reference = f"{REFERENCE[0]}@{REFERENCE[1]:g}"
    print(summary_table(results, reference))
    command = "python benchmarks/commonsense_grid.py " + " ".join(sys.argv[1:])
    written = write_report(results, options.report_dir, options.report_name, command.strip(), reference)
    print("wrote", ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
