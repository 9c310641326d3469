"""Activation memory and step time of state-ctrl against PEFT LoRA / DoRA / full fine-tuning.

Memory is the bytes saved for backward in one training step (peft_ctrl.metrics; docs/state_ctrl.md),
exact and device independent. Each method is also quoted against its *floor*: what the frozen model
alone saves when gradients must flow back to the output of the method's first adapted block.
Step time (forward + backward + AdamW step) is the median over rounds in which every method runs in turn
(one untimed step, then the timed one), so the ratios come from the same run under the same machine load.

    python benchmarks/state_ctrl_memory.py                  # the benchmark model (hidden 512, 4 layers)
    python benchmarks/state_ctrl_memory.py --validate-only  # check the projection formula on small shapes

Writes docs/results/state_ctrl_memory.{md,json,png}.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import (
    ALL_LINEAR,
    LLAMA2_7B,
    LLAMA3_8B,
    SMOLLM2,
    MiB,
    Shape,
    build_base,
    lora,
    make_batch,
    parser,
    projected_bytes,
    pyplot,
    save_figure,
    state_ctrl,
    write_results,
)
from torch import nn

from peft_ctrl.metrics import saved_activation_bytes


@dataclass(frozen=True)
class Method:
    name: str
    first_block: str  # "attn" or "mlp": where gradients must start flowing (defines the floor)
    build: Callable[[nn.Module], nn.Module]


def full(base: nn.Module) -> nn.Module:
    return base.requires_grad_(True)


METHODS = [
    Method("full fine-tuning", "attn", full),
    Method("PEFT LoRA all-linear r=16", "attn", lora(ALL_LINEAR)),
    Method("PEFT LoRA q,v r=16", "attn", lora(["q_proj", "v_proj"])),
    Method("PEFT DoRA all-linear r=16", "attn", lora(ALL_LINEAR, dora=True)),
    Method("state-ctrl mlp r=64", "mlp", state_ctrl(64, "mlp")),
    Method("state-ctrl both r=32", "attn", state_ctrl(32, "both")),
    # state-ctrl's frozen MLPs keep gate and up only (peft_ctrl.ops.lean_mlp, on by default); without it, and the
    # same op given to PEFT LoRA on top of lean_lora.
    Method("state-ctrl mlp r=64 without lean_mlp", "mlp", state_ctrl(64, "mlp", lean_mlp=False)),
    # The fused low-rank op (peft_ctrl.ops) against the plain module expression, without and with dropout.
    Method("state-ctrl mlp r=64 unfused", "mlp", state_ctrl(64, "mlp", fused=False)),
    Method("state-ctrl mlp r=64 dropout 0.1", "mlp", state_ctrl(64, "mlp", dropout=0.1)),
    Method("state-ctrl mlp r=64 dropout 0.1 unfused", "mlp", state_ctrl(64, "mlp", dropout=0.1, fused=False)),
    # The same op applied to ordinary PEFT LoRA layers (peft_ctrl.ops.lean_lora).
    Method("PEFT LoRA all-linear r=16 + lean_lora", "attn", lora(ALL_LINEAR, lean=True)),
    Method("PEFT LoRA all-linear r=16 + lean_lora + lean_mlp", "attn", lora(ALL_LINEAR, lean=True, lean_mlps=True)),
    # Gradient checkpointing, what a memory-pressed user picks today: the meter reports the peak (everything kept
    # between layers plus the largest layer's recomputation, peft_ctrl.metrics).
    Method("PEFT LoRA all-linear r=16 + gradient checkpointing", "attn", lora(ALL_LINEAR, checkpointing=True)),
    Method("state-ctrl mlp r=64 + gradient checkpointing", "mlp", state_ctrl(64, "mlp", checkpointing=True)),
]


def real_smollm2() -> nn.Module:
    """The pretrained SmolLM2-135M-Instruct, frozen, in training mode (``peft_ctrl.models``)."""
    from peft_ctrl.models import load_smollm2

    model = load_smollm2()[0].requires_grad_(False)
    model.train()
    return model


def base_model(shape: Shape) -> nn.Module:
    """The real SmolLM2 for its shape, else a random-init LLaMA of ``shape``."""
    return real_smollm2() if shape == SMOLLM2 else build_base(shape)


def floor_model(shape: Shape, first_block: str) -> nn.Module:
    """The frozen model with the residual stream leaving layer 0's ``first_block`` made to require grad."""
    model = base_model(shape)
    layer = model.model.layers[0]
    module = layer.self_attn if first_block == "attn" else layer.mlp

    def require_grad(mod, args, out):
        if isinstance(out, tuple):
            return (out[0].detach().requires_grad_(True), *out[1:])
        return out.detach().requires_grad_(True)

    module.register_forward_hook(require_grad)
    return model


def step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        model(**batch).loss.backward()

    return step


def measure_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    result = saved_activation_bytes(step_fn(model, batch), exclude=model)
    model.zero_grad(set_to_none=True)
    return result


def run(shape: Shape, rounds: int, warmup: int) -> dict:
    batch = make_batch(shape)
    floors = {blk: measure_bytes(floor_model(shape, blk), batch) for blk in ("attn", "mlp")}
    models, optimizers, rows = {}, {}, {}
    for method in METHODS:
        model = method.build(base_model(shape))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        rows[method.name] = {
            "saved_bytes": measure_bytes(model, batch),
            "floor_bytes": floors[method.first_block],
            "first_block": method.first_block,
            "trainable_params": sum(p.numel() for p in params),
        }
        models[method.name] = model
        optimizers[method.name] = torch.optim.AdamW(params, lr=1e-4)

    for blk in ("attn", "mlp"):
        models[f"floor {blk}"] = floor_model(shape, blk)
    times: dict[str, list[float]] = {name: [] for name in models}

    def train_step(name: str, model: nn.Module) -> float:
        opt = optimizers.get(name)
        start = time.perf_counter()
        model(**batch).loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for i in range(warmup + rounds):
        for name, model in models.items():
            # An untimed step first: the previous model freed its activations, and on the real model's sizes the
            # first step after a switch pays the allocator's page faults (which model paid depended on the order).
            train_step(name, model)
            elapsed = train_step(name, model)
            if i >= warmup:
                times[name].append(elapsed)
    for name in rows:
        rows[name]["step_s"] = statistics.median(times[name])
        rows[name]["step_s_all"] = times[name]
    floor_times = {blk: statistics.median(times[f"floor {blk}"]) for blk in ("attn", "mlp")}
    return {
        "shape": shape.__dict__,
        "floors": floors,
        "floor_step_s": floor_times,
        "rows": rows,
        "rounds": rounds,
        "warmup": warmup,
        "torch_threads": torch.get_num_threads(),
    }


PROJECTED = [
    "floor attn",
    "floor mlp",
    "full fine-tuning",
    "PEFT LoRA all-linear r=16",
    "PEFT LoRA q,v r=16",
    "state-ctrl mlp r=64",
    "state-ctrl both r=32",
    "state-ctrl mlp r=64 without lean_mlp",
]
VALIDATION_SHAPES = [
    Shape(hidden=128, intermediate=352, layers=2, heads=4, vocab=512, batch=2, seq=64),
    Shape(hidden=192, intermediate=512, layers=2, heads=6, vocab=512, batch=1, seq=64, kv_heads=2),
    Shape(hidden=256, intermediate=688, layers=3, heads=4, vocab=256, batch=2, seq=128),
    Shape(hidden=384, intermediate=1024, layers=2, heads=6, vocab=1000, batch=1, seq=96),
]


def measured_bytes(method: str, shape: Shape) -> int:
    batch = make_batch(shape)
    if method.startswith("floor"):
        return measure_bytes(floor_model(shape, method.split()[1]), batch)
    build = next(m.build for m in METHODS if m.name == method)
    model = build(build_base(shape))
    model.train()
    return measure_bytes(model, batch)


def validate() -> list[dict]:
    """Predicted against measured bytes on small shapes (including the benchmark shape's layout)."""
    rows = []
    for shape in VALIDATION_SHAPES:
        for method in PROJECTED:
            measured, predicted = measured_bytes(method, shape), projected_bytes(method, shape)
            rows.append({"shape": shape.__dict__, "method": method, "measured": measured, "predicted": predicted})
    return rows


def results_table(result: dict) -> str:
    rows = result["rows"]
    ref_all = rows["PEFT LoRA all-linear r=16"]
    ref_qv = rows["PEFT LoRA q,v r=16"]
    lines = [
        "| method | trainable params | saved MiB | x own floor | x LoRA all-linear | x LoRA q,v | step s | "
        "time x LoRA all-linear |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['trainable_params']:,} | {row['saved_bytes'] / MiB:.1f} | "
            f"{row['saved_bytes'] / row['floor_bytes']:.3f} ({row['first_block']}) | "
            f"{row['saved_bytes'] / ref_all['saved_bytes']:.3f} | {row['saved_bytes'] / ref_qv['saved_bytes']:.3f} | "
            f"{row['step_s']:.3f} | {row['step_s'] / ref_all['step_s']:.3f} |"
        )
    floors = result["floors"]
    ft = result["floor_step_s"]
    fused_rows = [
        ("dropout 0", "state-ctrl mlp r=64", "state-ctrl mlp r=64 unfused"),
        ("dropout 0.1", "state-ctrl mlp r=64 dropout 0.1", "state-ctrl mlp r=64 dropout 0.1 unfused"),
    ]
    for blk in ("attn", "mlp"):
        lines.append(
            f"| floor: frozen model, grads from layer-0 {blk} output (fwd+bwd only) | 0 | {floors[blk] / MiB:.1f} | "
            f"1 | {floors[blk] / ref_all['saved_bytes']:.3f} | {floors[blk] / ref_qv['saved_bytes']:.3f} | "
            f"{ft[blk]:.3f} | {ft[blk] / ref_all['step_s']:.3f} |"
        )
    lines += [
        "",
        "Fused low-rank op (`peft_ctrl.ops.lowrank`, the default) against the plain module expression, state-ctrl "
        "mlp r=64:",
        "",
        "| dropout | fused MiB | unfused MiB | fused bytes over floor per bridge | fused / unfused step time |",
        "|---|---:|---:|---:|---:|",
    ]
    s = result["shape"]
    for label, fused, plain in fused_rows:
        per_bridge = (rows[fused]["saved_bytes"] - floors["mlp"]) / s["layers"]
        lines.append(
            f"| {label} | {rows[fused]['saved_bytes'] / MiB:.1f} | {rows[plain]['saved_bytes'] / MiB:.1f} | "
            f"{per_bridge / MiB:.2f} MiB | {rows[fused]['step_s'] / rows[plain]['step_s']:.3f} |"
        )
    z_bytes = s["batch"] * s["seq"] * 64 * 4
    h0_bytes = s["batch"] * s["seq"] * s["hidden"] * 4
    lines.append(
        f"\n(z = A h is {z_bytes / MiB:.2f} MiB per bridge; layer 0's h, which the frozen model does not keep, adds "
        f"{h0_bytes / MiB:.2f} MiB once, i.e. {h0_bytes / s['layers'] / MiB:.2f} MiB per bridge on average.)"
    )
    table = "\n".join(lines)
    if "validation" in result:
        table += "\n\n" + projection_tables(result)
    return table


def projection_tables(result: dict) -> str:
    lines = [
        "Projection formula (`projected_bytes`) against measurement:",
        "",
        "| shape (d, f, L, H[/KV], V, b x s) | method | measured bytes | predicted bytes | predicted / measured |",
        "|---|---|---:|---:|---:|",
    ]
    for row in result["validation"]:
        s = row["shape"]
        label = (
            f"{s['hidden']}, {s['intermediate']}, {s['layers']}, {s['heads']}"
            f"{'/' + str(s['kv_heads']) if s.get('kv_heads') else ''}, {s['vocab']}, {s['batch']}x{s['seq']}"
        )
        lines.append(
            f"| {label} | {row['method']} | {row['measured']:,} | {row['predicted']:,} | "
            f"{row['predicted'] / row['measured']:.6f} |"
        )
    titles = {
        "benchmark_cuda_masks": "The benchmark shape as a CUDA run would measure it (dropout masks 1 byte instead of "
        "the 4-byte float masks CPU dropout keeps):",
        "llama2_7b": "Projected to LLaMA2-7B shapes (d 4096, f 11008, 32 layers, 32 heads, vocab 32000, 1 x 4096 "
        "tokens, fp32 activations, 1-byte dropout masks as on CUDA):",
        "llama3_8b": "Projected to LLaMA3-8B shapes (d 4096, f 14336, 32 layers, 32 heads with 8 key/value heads, "
        "vocab 128256, 1 x 4096 tokens, fp32 activations, 1-byte dropout masks as on CUDA):",
    }
    for key, title in titles.items():
        lines += ["", title, "", "| method | MiB saved for backward | x own floor | x LoRA all-linear | x LoRA q,v |"]
        lines.append("|---|---:|---:|---:|---:|")
        if key not in result:  # results written before this projection existed
            continue
        proj = result[key]
        for method, value in proj.items():
            own = "floor mlp" if method.startswith("state-ctrl mlp") or method == "floor mlp" else "floor attn"
            lines.append(
                f"| {method} | {value / MiB:,.1f} | {value / proj[own]:.3f} | "
                f"{value / proj['PEFT LoRA all-linear r=16']:.3f} | {value / proj['PEFT LoRA q,v r=16']:.3f} |"
            )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    rows = result["rows"]
    names = list(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    saved = [rows[n]["saved_bytes"] / MiB for n in names]
    colors = ["tab:green" if n.startswith("state-ctrl") else "tab:gray" for n in names]
    ax1.barh(names, saved, color=colors)
    for blk, style in (("attn", "--"), ("mlp", ":")):
        ax1.axvline(result["floors"][blk] / MiB, color="black", linestyle=style, label=f"floor ({blk})")
    ax1.set_xlabel("bytes saved for backward per step (MiB)")
    ax1.legend(loc="lower right")
    ax1.invert_yaxis()
    ax2.barh(names, [rows[n]["step_s"] for n in names], color=colors)
    ax2.set_xlabel("median step time (s), same run")
    ax2.invert_yaxis()
    ax2.set_yticklabels([])
    s = result["shape"]
    fig.suptitle(
        f"LLaMA-shaped model: hidden {s['hidden']}, intermediate {s['intermediate']}, {s['layers']} layers, "
        f"batch {s['batch']} x {s['seq']} tokens, fp32"
    )
    save_figure(fig, path)


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--model", choices=["llama-shaped", "smollm2"], default="llama-shaped")
    cli.add_argument("--rounds", type=int, default=7, help="timed rounds (median is reported)")
    cli.add_argument("--warmup", type=int, default=2)
    cli.add_argument("--validate-only", action="store_true", help="only check the projection formula")
    args = cli.parse_args()
    if args.validate_only:
        for row in validate():
            print(row["method"], row["shape"], row["measured"], row["predicted"])
        return
    shape = SMOLLM2 if args.model == "smollm2" else Shape()
    result = run(shape, args.rounds, args.warmup)
    measured_here = [
        {
            "shape": shape.__dict__,
            "method": m,
            "measured": _measured_from(result, m),
            "predicted": projected_bytes(m, shape),
        }
        for m in PROJECTED
    ]
    result["validation"] = measured_here if args.model == "smollm2" else validate() + measured_here
    result["benchmark_cuda_masks"] = {m: projected_bytes(m, shape, mask=1) for m in PROJECTED}
    result["llama2_7b"] = {m: projected_bytes(m, LLAMA2_7B, mask=1) for m in PROJECTED}
    result["llama3_8b"] = {m: projected_bytes(m, LLAMA3_8B, mask=1) for m in PROJECTED}
    name = "state_ctrl_memory_smollm2" if args.model == "smollm2" else "state_ctrl_memory"
    write_results(args.out, name, results_table(result), result, lambda path: plot(result, path))


def _measured_from(result: dict, method: str) -> int:
    if method.startswith("floor"):
        return result["floors"][method.split()[1]]
    return result["rows"][method]["saved_bytes"]


if __name__ == "__main__":
    main()
