"""The main job on the Trainer path against the hand-written loop it replaced, side by side.

    # the hand-written loop (commit fe11b59~1) and the Trainer path (fe11b59), each from its own worktree:
    python /tmp/run_tree.py TREE finetune --no-bf16 --results-dir DIR      # DIR = runs/loop-fp32, runs/trainer-fp32
    python benchmarks/trainer_path.py --loop runs/loop-fp32 --trainer runs/trainer-fp32 [--group-by-length DIR]

Reads the per-experiment JSONs of the two runs (the README's main job: 4 rows, seed 0, 60 steps x 8, 150 test items
per task; here in fp32, ``--no-bf16``, on a CPU without native bf16) and the seed-0 rows of the committed cloze table
(docs/results/commonsense_cloze.json, bf16), and writes docs/results/trainer_path.{md,json,png}. ``--group-by-length``
names a run of the Trainer path with Trainer's own length-grouped sampler (fe11b59), stopped after three rows: the
rows it finished go to docs/results/trainer_path_group_by_length.{md,json}.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from _common import parser, pyplot, save_figure, write_results

ROWS = ("lora-all", "lora-qkv", "state-ctrl-mlp", "control-lora")


def load(folder: Path) -> dict[str, dict]:
    """The rows of a run that finished (every row, for --loop and --trainer)."""
    found = {m: folder / "test" / f"{m}__seed0.json" for m in ROWS}
    return {m: json.loads(path.read_text()) for m, path in found.items() if path.is_file()}


def group_by_length_table(loop: dict[str, dict], grouped: dict[str, dict]) -> str:
    lines = [
        "| method | loop: avg / NLL | Trainer group_by_length: avg / NLL "
        "| saved MiB (tokens) loop / group_by_length |",
        "|---|---:|---:|---:|",
    ]
    for m, g in ((m, summary(r)) for m, r in grouped.items()):
        a = summary(loop[m])
        lines.append(
            f"| {m} | {a['average']:.1f} / {a['option_nll']:.3f} | {g['average']:.1f} / {g['option_nll']:.3f} | "
            f"{a['saved_mib']:.0f} ({a['measured_tokens']}) / {g['saved_mib']:.0f} ({g['measured_tokens']}) |"
        )
    return "\n".join(lines)


def summary(r: dict) -> dict:
    return {
        "average": 100 * statistics.fmean(r["accuracy"].values()),
        "per_task": {k: 100 * v for k, v in r["accuracy"].items()},
        "option_nll": statistics.fmean(r["option_nll"].values()),
        "saved_mib": r["saved_activation_bytes"] / 2**20,
        "measured_tokens": r["measured_tokens"],
        "step_seconds": r["step_seconds"],
    }


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--loop", type=Path, required=True)
    p.add_argument("--trainer", type=Path, required=True)
    p.add_argument("--group-by-length", type=Path, help="a Trainer run with train_sampling_strategy='group_by_length'")
    args = p.parse_args()
    loop, trainer = load(args.loop), load(args.trainer)
    table = json.loads(Path("docs/results/commonsense_cloze.json").read_text())
    readme = {r["method"]: summary(r) for r in table if r.get("seed") == 0 and r["method"] in ROWS}
    rows = [m for m in ROWS if m in loop and m in trainer]  # a run stopped early reports the rows it finished
    if "lora-all" not in rows:
        raise SystemExit("both runs need the lora-all row (the reference of the ratios)")
    spread = {}
    for m in rows:
        seeds = [100 * statistics.fmean(r["accuracy"].values()) for r in table if r["method"] == m]
        nlls = [statistics.fmean(r["option_nll"].values()) for r in table if r["method"] == m]
        spread[m] = (statistics.stdev(seeds), statistics.stdev(nlls)) if len(seeds) > 1 else (float("nan"),) * 2
    data = {m: {"loop": summary(loop[m]), "trainer": summary(trainer[m]), "readme_bf16": readme.get(m)} for m in rows}
    ref_loop, ref_trainer = data["lora-all"]["loop"], data["lora-all"]["trainer"]
    lines = [
        "| method | README bf16 seed 0: avg / NLL | loop fp32: avg / NLL | Trainer fp32: avg / NLL | Trainer - loop "
        "| seed std in README (avg / NLL) | saved MiB loop / Trainer (tokens) | bytes x LoRA loop / Trainer "
        "| step s loop / Trainer | time x LoRA loop / Trainer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in rows:
        d, b = data[m], data[m]["readme_bf16"]
        lo, tr = d["loop"], d["trainer"]
        lines.append(
            f"| {m} | {b['average']:.1f} / {b['option_nll']:.3f} | {lo['average']:.1f} / {lo['option_nll']:.3f} | "
            f"{tr['average']:.1f} / {tr['option_nll']:.3f} | {tr['average'] - lo['average']:+.1f} / "
            f"{tr['option_nll'] - lo['option_nll']:+.3f} | {spread[m][0]:.1f} / {spread[m][1]:.3f} | "
            f"{lo['saved_mib']:.0f} / {tr['saved_mib']:.0f} ({lo['measured_tokens']} / {tr['measured_tokens']}) | "
            f"{lo['saved_mib'] / ref_loop['saved_mib']:.3f} / {tr['saved_mib'] / ref_trainer['saved_mib']:.3f} | "
            f"{lo['step_seconds']:.2f} / {tr['step_seconds']:.2f} | "
            f"{lo['step_seconds'] / ref_loop['step_seconds']:.3f} / "
            f"{tr['step_seconds'] / ref_trainer['step_seconds']:.3f} |"
        )

    def plot(path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 3.5))
        x = range(len(rows))
        for offset, key, label in ((-0.2, "loop", "hand-written loop (fp32)"), (0.2, "trainer", "Trainer (fp32)")):
            ax.bar([i + offset for i in x], [data[m][key]["option_nll"] for m in rows], width=0.4, label=label)
        ax.set_xticks(list(x), rows)
        ax.set_ylabel("option NLL (lower is better)")
        ax.legend()
        save_figure(fig, path)

    write_results(args.out, "trainer_path", "\n".join(lines), data, plot)
    if args.group_by_length:
        grouped = load(args.group_by_length)
        rows = {m: {"loop": summary(loop[m]), "group_by_length": summary(r)} for m, r in grouped.items()}
        write_results(args.out, "trainer_path_group_by_length", group_by_length_table(loop, grouped), rows)


if __name__ == "__main__":
    main()
