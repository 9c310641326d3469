"""PINN transfer (docs/odelora.md, "PINN transfer") with ODELoRA against AdamW, SGD and Riemannian-preconditioned LoRA.

    python benchmarks/odelora_pinn.py        # a few minutes on 2 CPU cores

A tanh MLP (2 -> 64 -> 64 -> 64 -> 1) is pre-trained as a PINN for the 2-D Poisson problem -Laplace(u) = f on
[0, 1]^2 with u = 0 on the boundary and exact solution u1 = sin(pi x) sin(pi y). LoRA adapters (r = 4, on the
three hidden linears) then fine-tune it to a shifted instance, u2 = sin(pi x) sin(pi y) + 0.5 sin(2 pi x)
sin(pi y), under a fixed budget of gradient evaluations. Reported: relative L2 error against u2 on a held-out
50 x 50 grid at the end of the budget (each method's lr picked on seed 0 from a grid, then 3 seeds).
Writes docs/results/odelora_pinn.{md,json,png}.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch
from _common import MLP, parser, pinn_loss, points, pretrain, pyplot, rel_l2, save_figure, training_step, write_results
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_riemannian_optimizer

from peft_ctrl.optim import ODELoRA, create_odelora_optimizer

BUDGET = 600


def finetune(base: MLP, method: str, lr: float, seed: int) -> tuple[float, list[float]]:
    import copy

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=4, target_modules=["h1", "h2", "h3"]))
    interior, boundary = points(100 + seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if method.startswith("odelora"):
        opt = create_odelora_optimizer(model, lr=lr, scheme=method.split("-")[1])
    elif method == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    elif method == "sgd":
        opt = torch.optim.SGD(params, lr=lr)
    else:
        opt = create_riemannian_optimizer(model, torch.optim.SGD, lr=lr, reg=1e-4)
    per_step = opt.evaluations_per_step if isinstance(opt, ODELoRA) else 1

    def closure() -> torch.Tensor:
        loss = pinn_loss(model, interior, boundary, shifted=True)
        loss.backward()
        return loss

    curve, evals = [rel_l2(model, True)], 0
    while evals + per_step <= BUDGET:
        opt.zero_grad()
        try:
            training_step(opt, closure)
        except FloatingPointError:
            return math.inf, curve
        evals += per_step
        curve.append(rel_l2(model, True))
        if not math.isfinite(curve[-1]):
            return math.inf, curve
    return curve[-1], curve


GRIDS = {
    "odelora-euler": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
    "odelora-rk4": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
    "scaledgd": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
    "adamw": [1e-4, 1e-3, 3e-3, 1e-2, 3e-2],
    "sgd": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
}


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--seeds", type=int, default=3)
    args = cli.parse_args()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster than two
    base = pretrain()
    start_error = rel_l2(base, True)
    print(f"pre-trained on u1: error vs u1 {rel_l2(base, False):.3e}; vs u2 (start of transfer) {start_error:.3e}")
    rows, curves = {}, {}
    for method, lrs in GRIDS.items():
        tuned = {lr: finetune(base, method, lr, seed=0)[0] for lr in lrs}
        lr = min(tuned, key=tuned.get)
        errors = []
        for seed in range(args.seeds):
            err, curve = finetune(base, method, lr, seed)
            errors.append(err)
            if seed == 0:
                curves[method] = curve
        rows[method] = {"lr": lr, "grid": tuned, "errors": errors}
        print(method, lr, errors)
    lines = [
        f"Relative L2 error against u2 after {BUDGET} gradient evaluations (pre-trained start: {start_error:.3f}).",
        "",
        "| method | lr (tuned on seed 0) | mean error | per seed |",
        "|---|---:|---:|---|",
    ]
    for method, row in rows.items():
        finite = [e for e in row["errors"] if math.isfinite(e)]
        mean = f"{statistics.fmean(finite):.4f}" if len(finite) == len(row["errors"]) else "diverged"
        lines.append(f"| {method} | {row['lr']:g} | {mean} | {', '.join(f'{e:.4f}' for e in row['errors'])} |")
    table = "\n".join(lines)
    data = {"start_error": start_error, "rows": rows}
    write_results(args.out, "odelora_pinn", table, data, lambda path: plot(curves, rows, path))


def plot(curves: dict[str, list[float]], rows: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, curve in curves.items():
        per = 4 if method == "odelora-rk4" else 1
        ax.semilogy([i * per for i in range(len(curve))], curve, label=f"{method} (lr {rows[method]['lr']:g})")
    ax.set_xlabel("gradient evaluations")
    ax.set_ylabel("relative L2 error vs u2")
    ax.set_title("PINN transfer: Poisson, LoRA r=4 on 3 hidden layers (seed 0)")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    main()
