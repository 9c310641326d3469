"""Time the fused low-rank op against the unfused torch expression (forward + backward).

    python benchmarks/lowrank_kernels.py            # on a CUDA machine: Triton kernels vs torch
    python benchmarks/lowrank_kernels.py --cpu      # the torch reference path on CPU

Prints a table and writes docs/results/lowrank_kernels_<device>.{md,png}: median milliseconds per
forward+backward, the fused/unfused ratio, and the bytes each keeps for backward.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from _common import parser, pyplot, save_figure, write_results

from peft_ctrl.metrics import SavedTensorMeter
from peft_ctrl.ops import lowrank

SHAPES = [  # (tokens, d_in, rank, d_out)
    (4096, 4096, 16, 4096),
    (4096, 4096, 64, 4096),
    (8192, 4096, 64, 4096),
    (4096, 11008, 64, 4096),
]
CPU_SHAPES = [(1024, 512, 64, 512), (2048, 1024, 64, 1024)]


def unfused(x, A, B, p, training=True):
    return torch.nn.functional.dropout(x, p, training) @ A.t() @ B.t()


def time_one(fn, x, A, B, p, device, reps):
    def step():
        out = fn(x, A, B, p)
        out.backward(torch.ones_like(out))

    for _ in range(3):
        step()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    with SavedTensorMeter(exclude=[x, A, B]) as meter:
        step()
    return statistics.median(times), meter.total_bytes


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--cpu", action="store_true", help="time the torch path on CPU instead of CUDA")
    cli.add_argument("--reps", type=int, default=20)
    cli.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    args = cli.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        cli.error("no CUDA device here: run on a GPU machine, or pass --cpu for the torch path")
    device = "cpu" if args.cpu else "cuda"
    dtype = torch.float32 if args.cpu else getattr(torch, args.dtype)
    lines = [
        f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, dtype {dtype}",
        "",
        "| tokens x d_in -> r -> d_out | dropout | fused ms | unfused ms | fused / unfused | fused MiB kept | "
        "unfused MiB kept |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    records = []
    for tokens, d_in, r, d_out in CPU_SHAPES if args.cpu else SHAPES:
        x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
        A = (torch.randn(r, d_in, device=device, dtype=dtype) * 0.02).requires_grad_()
        B = (torch.randn(d_out, r, device=device, dtype=dtype) * 0.02).requires_grad_()
        for p in (0.0, 0.1):
            tf, bf = time_one(lambda x, A, B, p: lowrank(x, A, B, dropout=p), x, A, B, p, device, args.reps)
            tu, bu = time_one(unfused, x, A, B, p, device, args.reps)
            records.append((f"{tokens}x{d_in}->{r}->{d_out}\np={p}", tf / tu, bf / 2**20, bu / 2**20))
            lines.append(
                f"| {tokens} x {d_in} -> {r} -> {d_out} | {p} | {1e3 * tf:.2f} | {1e3 * tu:.2f} | {tf / tu:.3f} | "
                f"{bf / 2**20:.1f} | {bu / 2**20:.1f} |"
            )
    table = "\n".join(lines)
    write_results(args.out, f"lowrank_kernels_{device}", table, plot=lambda path: plot(records, path, lines[0]))


def plot(records: list[tuple[str, float, float, float]], path: Path, title: str) -> None:
    plt = pyplot()
    labels = [r[0] for r in records]
    xs = range(len(records))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    ax1.bar(xs, [r[1] for r in records], color="tab:green")
    ax1.axhline(1.0, color="black", linestyle="--")
    ax1.set_ylabel("fused / unfused time (forward + backward)")
    ax2.bar([x - 0.2 for x in xs], [r[2] for r in records], width=0.4, label="fused", color="tab:green")
    ax2.bar([x + 0.2 for x in xs], [r[3] for r in records], width=0.4, label="unfused", color="tab:gray")
    ax2.set_ylabel("MiB kept for backward (besides x, A, B)")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(list(xs), labels, fontsize=7)
    fig.suptitle(title)
    save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    main()
