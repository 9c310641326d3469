"""The Triton low-rank kernels compiled ahead of time for sm_80 (A100) and sm_90 (H100), without a GPU.

    python benchmarks/triton_aot.py        # several minutes on 2 cores; resumable (one JSON per variant)

Every variant the dispatcher can launch (peft_ctrl.ops.triton_aot.every_variant: 3 kernels x 2 architectures x
fp32/bf16/fp16 x rank classes 16-256) is lowered to PTX and a cubin by Triton and run through Triton's own ptxas with
``-v``: registers per thread, spill stores and loads (bytes), and the shared memory Triton allocates. Writes
docs/results/triton_aot.{md,json,png}; docs/ops.md quotes the table.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from _common import parser, pyplot, save_figure, write_results

from peft_ctrl.ops.triton_aot import RANK_CLASSES, compile_kernel, every_variant


def variant(folder: Path, kernel: str, arch: int, dtype: str, block_r: int) -> dict:
    path = folder / f"{kernel}__sm{arch}__{dtype}__r{block_r}.json"
    if path.is_file():
        return json.loads(path.read_text())
    record = asdict(compile_kernel(kernel, arch, dtype, block_r))
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return record


def table(records: list[dict]) -> str:
    lines = [
        "| kernel | arch | dtype | " + " | ".join(f"r<={r}" for r in RANK_CLASSES) + " |",
        "|---|---|---|" + "---:|" * len(RANK_CLASSES),
    ]
    keys = dict.fromkeys((r["kernel"], r["arch"], r["dtype"]) for r in records)
    for kernel, arch, dtype in keys:
        cells = []
        for block_r in RANK_CLASSES:
            r = next(
                x
                for x in records
                if (x["kernel"], x["arch"], x["dtype"], x["block_r"]) == (kernel, arch, dtype, block_r)
            )
            spill = (
                f", **spills {r['spill_stores']}/{r['spill_loads']} B**"
                if r["spill_stores"] or r["spill_loads"]
                else ""
            )
            cells.append(f"{r['registers']} reg, {r['shared_bytes'] // 1024} KiB{spill}")
        lines.append(
            f"| {kernel.strip('_').removesuffix('_kernel')} | sm_{arch} | {dtype} | " + " | ".join(cells) + " |"
        )
    clean = sum(not (r["spill_stores"] or r["spill_loads"]) for r in records)
    lines.append("")
    lines.append(
        f"{clean} of {len(records)} variants compile without spilling registers (reg = registers per thread, "
        "KiB = shared memory; spills = spill store / load bytes per thread)."
    )
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for kernel in dict.fromkeys(r["kernel"] for r in records):
        for dtype in ("fp32", "bf16"):
            rows = [r for r in records if r["kernel"] == kernel and r["dtype"] == dtype and r["arch"] == 80]
            ax.plot(
                [r["block_r"] for r in rows],
                [r["spill_stores"] for r in rows],
                marker="o",
                label=f"{kernel.strip('_')} {dtype}",
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank class (BLOCK_R)")
    ax.set_ylabel("spill store bytes per thread, sm_80")
    ax.legend(fontsize=6)
    save_figure(fig, path)


def main() -> None:
    args = parser(__doc__).parse_args()
    folder = Path("runs/triton_aot")
    records = [variant(folder, *v) for v in every_variant()]
    write_results(args.out, "triton_aot", table(records), records, lambda p: plot(records, p))


if __name__ == "__main__":
    main()
