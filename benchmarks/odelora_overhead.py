"""Cost of an ODELoRA step against AdamW on a LLaMA-shaped model with LoRA on all linear layers.

    python benchmarks/odelora_overhead.py

Model as in benchmarks/state_ctrl_memory.py (hidden 512, intermediate 1376, 4 layers, batch 4 x 256 tokens,
fp32), PEFT LoRA r=16 on q, k, v, o, gate, up, down (28 pairs). Reports the median time of optimizer.step()
alone and of a whole training step (forward, backward, step), each as a ratio to AdamW in the same run
(rounds alternate the optimizers). Writes docs/results/odelora_overhead.{md,png}.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from _common import ALL_LINEAR, Shape, build_base, make_batch, parser, pyplot, save_figure, write_results
from peft import LoraConfig, get_peft_model

from peft_ctrl.optim import create_odelora_optimizer


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--rounds", type=int, default=7)
    args = cli.parse_args()
    shape = Shape()
    batch = make_batch(shape)
    setups = {}
    for name in ("AdamW", "ODELoRA euler"):
        model = get_peft_model(build_base(shape), LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if name == "AdamW" else create_odelora_optimizer(model, lr=1e-2)
        setups[name] = (model, opt)
    step_times = {n: [] for n in setups}
    total_times = {n: [] for n in setups}
    for i in range(args.rounds + 2):
        for name, (model, opt) in setups.items():
            start = time.perf_counter()
            model(**batch).loss.backward()
            mid = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            end = time.perf_counter()
            if i >= 2:
                step_times[name].append(end - mid)
                total_times[name].append(end - start)
    med = {n: (statistics.median(step_times[n]), statistics.median(total_times[n])) for n in setups}
    ref_step, ref_total = med["AdamW"]
    lines = [
        "| optimizer | optimizer.step() ms | x AdamW | whole training step s | x AdamW |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (step, total) in med.items():
        lines.append(f"| {name} | {1e3 * step:.1f} | {step / ref_step:.2f} | {total:.3f} | {total / ref_total:.3f} |")
    table = "\n".join(lines)
    write_results(args.out, "odelora_overhead", table, plot=lambda path: plot(med, path))


def plot(med: dict[str, tuple[float, float]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(med)
    ax.barh(names, [med[n][1] - med[n][0] for n in names], label="forward + backward", color="tab:gray")
    ax.barh(
        names,
        [med[n][0] for n in names],
        left=[med[n][1] - med[n][0] for n in names],
        label="optimizer step",
        color="tab:green",
    )
    ax.set_xlabel("median seconds per training step")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    main()
