"""Planted-rank recovery: SubLoRA against peft's AdaLoRA and fixed-rank LoRA at the same final budget.

    python benchmarks/sublora_planted.py                 # about 25 minutes on 2 CPU cores
    python benchmarks/sublora_planted.py --seeds 0 --problems mlp

A frozen random base and a teacher that differs from it by updates of known, unequal ranks per matrix
(some 0, some up to the initial adapter rank). Students train adapters on the base to match the teacher
(MSE on teacher outputs for fresh Gaussian inputs / random tokens) under a total budget equal to the
planted total; every method uses AdamW with the same lr and the same AdaLoRA-style schedule (t_init,
t_final, delta_t). Reported, over 5 seeds: final loss averaged over the last 10% of steps, how many
matrices get exactly their planted rank, and for SubLoRA the share of run time spent allocating.

Problems: "mlp" (6 adapted 48 x 48 matrices as parallel tanh branches: each matrix owns its part of the
loss), "deep-mlp" (the same 6 matrices in sequence: later layers can partly make up for a wrong rank
earlier) and "llama" (a 2-layer LLaMA-shaped model, hidden 64, all 7 linears per layer: 14 matrices; the
loss is on the last hidden state). Methods: "sublora-block" (the default setting), "sublora-block-orth"
(the same with orth_reg_weight 0.01), "sublora-block-maskonly" (the default with exact_svd=False: components
are masked in the coordinates training left them in), "sublora" (exact Hessian), "sublora-fisher" and
"sublora-diag" (empirical Fisher), "adalora" (its orthogonality regulariser never runs here: see docs/sublora.md),
"lora" (fixed rank), "lora-oracle" (LoRA told the planted ranks: what a perfect allocation reaches in
the same steps; its rank column is the planted one by construction).
Writes docs/results/sublora_planted.{md,json,png}.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import Schedule, adalora_config, parser, pyplot, save_figure, sublora_config, write_results
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_ctrl.sublora.runtime import RankAllocator

STEPS, T_INIT, T_FINAL, DELTA_T, LR, INIT_R = 800, 300, 200, 25, 5e-3, 8
# "sublora-block" is SubLoRA's default setting; the exact Hessian and the Fisher variants are compared on the
# MLPs, where they are cheap (on llama the exact Hessian costs one backward per component).
LLAMA_METHODS = ["sublora-block", "sublora-block-orth", "sublora-block-maskonly", "adalora", "lora", "lora-oracle"]
MLP_METHODS = [*LLAMA_METHODS[:3], "sublora", "sublora-fisher", "sublora-diag", *LLAMA_METHODS[3:]]
METHODS = {"mlp": MLP_METHODS, "deep-mlp": MLP_METHODS, "llama": LLAMA_METHODS}
CURVATURE_SAMPLES = {"exact": 64, "block": 16, "fisher": 16, "diag": 16}  # block: the default setting


@dataclass
class Output:
    loss: torch.Tensor | None
    prediction: torch.Tensor


class MLP(nn.Module):
    """Six parallel tanh branches on the same input, outputs concatenated: each adapted matrix has its own
    part of the loss, so a rank too small in one branch cannot be made up for elsewhere."""

    def __init__(self, width: int = 48, branches: int = 6) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(branches))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        y = torch.cat([torch.tanh(layer(x)) for layer in self.layers], dim=-1)
        return Output(None if labels is None else nn.functional.mse_loss(y, labels), y)


class DeepMLP(MLP):
    """The same six matrices in sequence (tanh between): later layers can partly make up for earlier ones."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        x = self.layers[-1](x)
        return Output(None if labels is None else nn.functional.mse_loss(x, labels), x)


class Llama(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
        )
        self.model = transformers.LlamaModel(config)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        h = self.model(input_ids=input_ids).last_hidden_state
        return Output(None if labels is None else nn.functional.mse_loss(h, labels), h)


PROBLEMS = {
    # module -> planted rank; totals are multiples of the module count so AdaLoRA's target_r is an integer
    "mlp": (MLP, {f"layers.{i}": r for i, r in enumerate([0, 1, 2, 4, 5, 6])}),
    "deep-mlp": (DeepMLP, {f"layers.{i}": r for i, r in enumerate([0, 1, 2, 4, 5, 6])}),
    "llama": (
        Llama,
        {
            f"model.layers.{layer}.{part}": r
            for layer, ranks in enumerate([[0, 1, 2, 3, 4, 0, 6], [5, 3, 0, 1, 2, 8, 7]])
            for part, r in zip(
                [
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.o_proj",
                    "mlp.gate_proj",
                    "mlp.up_proj",
                    "mlp.down_proj",
                ],
                ranks,
                strict=True,
            )
        },
    ),
}


def make_problem(name: str, seed: int):
    cls, planted = PROBLEMS[name]
    torch.manual_seed(1000 + seed)
    base = cls()
    teacher = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    modules = dict(teacher.named_modules())
    for module, rank in planted.items():
        if rank == 0:
            continue
        W = modules[module].weight
        U, _ = torch.linalg.qr(torch.randn(W.shape[0], rank, generator=g))
        V, _ = torch.linalg.qr(torch.randn(W.shape[1], rank, generator=g))
        s = 0.6 + 0.6 * torch.rand(rank, generator=g)  # singular values 0.6 to 1.2
        with torch.no_grad():
            W += (U * s) @ V.T
    for p in [*base.parameters(), *teacher.parameters()]:
        p.requires_grad_(False)
    return base, teacher, planted


def data(name: str, teacher: nn.Module, seed: int):
    g = torch.Generator().manual_seed(10_000 + seed)
    while True:
        if name.endswith("mlp"):
            x = torch.randn(256, 48, generator=g)
        else:
            x = torch.randint(0, 128, (16, 16), generator=g)
        with torch.no_grad():
            y = teacher(x).prediction
        yield (x, y)


def run(method: str, name: str, seed: int) -> dict:
    base, teacher, planted = make_problem(name, seed)
    modules = list(planted)
    budget = sum(planted.values())
    schedule = Schedule(INIT_R, T_INIT, T_FINAL, DELTA_T, STEPS)
    if method.startswith("sublora"):
        hessian = method.split("-")[1] if "-" in method else "exact"
        config = sublora_config(
            modules,
            budget,
            schedule,
            hessian=hessian,
            curvature_samples=CURVATURE_SAMPLES[hessian],
            orth_reg_weight=0.01 if method.endswith("-orth") else 0.0,
            exact_svd=not method.endswith("-maskonly"),
        )
    elif method == "adalora":
        config = adalora_config(modules, budget, schedule, orth_reg_weight=0.1)
    elif method == "lora-oracle":  # told the planted ranks: what a perfect allocation reaches in these steps
        planted_ranks = {m: r for m, r in planted.items() if r > 0}
        config = LoraConfig(
            r=INIT_R,
            target_modules=list(planted_ranks),
            rank_pattern=planted_ranks,
            alpha_pattern=planted_ranks,
        )
    else:
        config = LoraConfig(r=budget // len(modules), lora_alpha=budget // len(modules), target_modules=modules)
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    stream = data(name, teacher, seed)
    allocator = None
    if method.startswith("sublora"):
        allocator = RankAllocator(model, loss_fn=lambda m, b: m(b[0], labels=b[1]).loss)
        curvature_stream = data(name, teacher, seed + 777)
    losses, alloc_seconds = [], 0.0
    start = time.perf_counter()
    for step in range(1, STEPS + 1):
        x, y = next(stream)
        loss = model(x, labels=y).loss
        loss.backward()
        if allocator is not None:
            t0 = time.perf_counter()
            allocator.add_orthogonality_gradient()
            alloc_seconds += time.perf_counter() - t0
        optimizer.step()
        if method == "adalora":
            model.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
        if allocator is not None and allocator.due(step):
            t0 = time.perf_counter()
            allocator.allocate(step, curvature_stream, optimizer)
            alloc_seconds += time.perf_counter() - t0
        losses.append(loss.item())
    total_seconds = time.perf_counter() - start
    if allocator is not None:
        ranks = allocator.ranks()
    elif method == "adalora":
        pattern = model.peft_config["default"].rank_pattern
        by_module = {key.split(".lora_E")[0]: int(sum(mask)) for key, mask in pattern.items()}
        ranks = {m: next(v for k, v in by_module.items() if k == m or k.endswith(f".{m}")) for m in modules}
    elif method == "lora-oracle":
        ranks = dict(planted)
    else:
        ranks = {m: budget // len(modules) for m in modules}
    tail = losses[-STEPS // 10 :]
    return {
        "method": method,
        "problem": name,
        "seed": seed,
        "final_loss": statistics.fmean(tail),
        "ranks": ranks,
        "planted": planted,
        "matched": sum(ranks[m] == planted[m] for m in modules),
        "all_matched": all(ranks[m] == planted[m] for m in modules),
        "seconds": total_seconds,
        "allocation_share": alloc_seconds / total_seconds if allocator is not None else None,
        "losses": losses[::10],
    }


def write_tables(results: list[dict]) -> str:
    lines = [
        f"Final loss = mean over the last {STEPS // 10} of {STEPS} steps; budget = the planted total; "
        f"initial rank {INIT_R}; AdamW lr {LR}; schedule t_init {T_INIT}, t_final {T_FINAL}, delta_t {DELTA_T}.",
        "",
        "| problem | method | final loss (mean over seeds) | x AdaLoRA | per seed | matrices with the planted rank | "
        "seeds with every rank exact | allocation share of run time |",
        "|---|---|---:|---:|---|---|---:|---:|",
    ]
    for problem in dict.fromkeys(r["problem"] for r in results):
        rows = [r for r in results if r["problem"] == problem]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        ada = statistics.fmean(r["final_loss"] for r in rows if r["method"] == "adalora")
        for method in methods:
            runs = [r for r in rows if r["method"] == method]
            mean = statistics.fmean(r["final_loss"] for r in runs)
            n = len(runs[0]["planted"])
            share = [r["allocation_share"] for r in runs if r["allocation_share"] is not None]
            per_seed = ", ".join(f"{r['final_loss']:.2g}" for r in runs)
            matched = ", ".join(f"{r['matched']}/{n}" for r in runs)
            exact = f"{sum(r['all_matched'] for r in runs)}/{len(runs)}"
            share_text = f"{100 * statistics.fmean(share):.1f}%" if share else "-"
            lines.append(
                f"| {problem} | {method} | {mean:.3g} | {mean / ada:.2g} | {per_seed} | {matched} | {exact} | "
                f"{share_text} |"
            )
    lines += ["", "Allocated ranks of seed 0 (planted first):", ""]
    for problem in dict.fromkeys(r["problem"] for r in results):
        rows = [r for r in results if r["problem"] == problem and r["seed"] == min(x["seed"] for x in results)]
        planted = rows[0]["planted"]
        lines.append(f"- {problem}, planted: {list(planted.values())}")
        for r in rows:
            lines.append(f"  - {r['method']}: {[r['ranks'][m] for m in planted]}")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    plt = pyplot()
    problems = list(dict.fromkeys(r["problem"] for r in results))
    fig, axes = plt.subplots(1, len(problems), figsize=(6 * len(problems), 4), squeeze=False)
    for ax, problem in zip(axes[0], problems, strict=True):
        for method in dict.fromkeys(r["method"] for r in results):
            runs = [r["losses"] for r in results if r["problem"] == problem and r["method"] == method]
            mean = [statistics.fmean(v) for v in zip(*runs, strict=True)]
            ax.semilogy([10 * i for i in range(len(mean))], mean, label=method)
        ax.axvspan(T_INIT, STEPS - T_FINAL, color="grey", alpha=0.1, label="allocation phase")
        ax.set_title(f"planted ranks: {problem} (mean over seeds)")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    cli.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    cli.add_argument("--methods", nargs="+", help="default: every method on the MLPs; on llama the default")
    args = cli.parse_args()
    torch.set_num_threads(2)
    results = []
    for problem in args.problems:
        for seed in args.seeds:
            for method in args.methods or METHODS[problem]:
                r = run(method, problem, seed)
                print(
                    f"{problem} seed {seed} {method}: loss {r['final_loss']:.3g}, matched {r['matched']}, "
                    f"{r['seconds']:.1f} s, ranks {list(r['ranks'].values())}",
                    flush=True,
                )
                results.append(r)
    write_results(args.out, "sublora_planted", write_tables(results), results, lambda path: plot(results, path))


if __name__ == "__main__":
    main()
