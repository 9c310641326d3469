"""Per-rank memory under DeepSpeed ZeRO-3 against a single process, with a LLaMA2-7B projection.

Measured on the LLaMA-shaped benchmark model (hidden 512, MLP 1376, 4 layers, 8 heads, vocab 1024) with
PEFT LoRA on all linears (r=16) and state-ctrl (mlp bridges, r=64):
- parameter bytes each rank holds between steps: a ZeRO-3 rank keeps its shard of every parameter
  (``ds_tensor``) plus the parameters small enough to stay whole (``stage3_param_persistence_threshold``);
- bytes saved for backward in one training step on each rank (peft_ctrl.metrics), at the same
  per-device batch as the single process (ZeRO shards parameters, not activations).
The single process and the two ZeRO-3 ranks (torchrun, gloo, the shipped zero3.json) run in the same call,
and the ZeRO-3 ranks once more with DeepSpeed's default ``memory_efficient_linear: true``, which the
shipped config turns off: its linear saves every input, also where the weight is frozen.

    python benchmarks/zero_memory.py

Writes docs/results/zero_memory.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from _common import (
    ALL_LINEAR,
    LLAMA2_7B,
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

from peft_ctrl.distributed.launch import free_port
from peft_ctrl.metrics import SavedTensorMeter

SHAPE = Shape(batch=2, seq=128)
METHODS = {"PEFT LoRA all-linear r=16": lora(ALL_LINEAR), "state-ctrl mlp r=64": state_ctrl(64, "mlp")}
WORLD = 2
GPUS = (1, 2, 8)


def param_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of parameters this process holds, split into frozen and trainable."""
    out = {"frozen": 0, "trainable": 0}
    for p in model.parameters():
        held = p.data.numel() + (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0)
        out["trainable" if p.requires_grad else "frozen"] += held * p.element_size()
    return out


def activation_bytes(forward_backward, model: torch.nn.Module) -> int:
    with SavedTensorMeter(exclude=model) as meter:
        forward_backward()
    return meter.total_bytes


def single_process(method: str) -> dict:
    model = METHODS[method](build_base(SHAPE))
    model.train()
    batch = make_batch(SHAPE)
    saved = activation_bytes(lambda: model(**batch).loss.backward(), model)
    return {"params": param_bytes(model), "saved": saved}


def worker(method: str, out: Path, deepspeed_linear: bool) -> None:
    """One ZeRO-3 rank: a real Trainer step, then the measurements."""
    from transformers import Trainer

    from peft_ctrl.distributed import training_arguments, zero_config

    config = zero_config(3)
    config["zero_optimization"]["memory_efficient_linear"] = deepspeed_linear
    args = training_arguments(
        str(out / "run"),
        deepspeed=config,
        max_steps=1,
        per_device_train_batch_size=SHAPE.batch,
        report_to=[],
        save_strategy="no",
    )
    model = METHODS[method](build_base(SHAPE))
    batch = make_batch(SHAPE)
    data = [{k: v[i % SHAPE.batch] for k, v in batch.items()} for i in range(SHAPE.batch * WORLD)]
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    engine = trainer.model_wrapped

    def step() -> None:
        engine.backward(engine(**batch).loss)

    saved = activation_bytes(step, model)
    record = {"params": param_bytes(model), "saved": saved, "threshold": _persistence_threshold(args)}
    (out / f"rank{args.process_index}.json").write_text(json.dumps(record))


def _persistence_threshold(args) -> int:
    return int(args.hf_deepspeed_config.config["zero_optimization"]["stage3_param_persistence_threshold"])


def launch(method: str, out: Path, deepspeed_linear: bool = False) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".torch_extensions"))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD}",
        f"--master_port={free_port()}",
    ]
    command += [__file__, "--worker", method, "--runs", str(out)] + (
        ["--deepspeed-linear"] if deepspeed_linear else []
    )
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ZeRO-3 run of {method} failed:\n{result.stderr[-5000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def counts_7b(method: str) -> dict[str, int]:
    """Parameter counts of LLaMA2-7B with the method's adapter, built on the meta device (no memory)."""
    s = LLAMA2_7B
    with torch.device("meta"):
        model = METHODS[method](build_base(s))
    return {
        "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "persistent": sum(p.numel() for p in model.parameters() if p.numel() <= 10 * s.hidden),
    }


def projection(method: str) -> dict[int, dict[str, float]]:
    """GiB per GPU for LLaMA2-7B, bf16 weights and activations, 1 x 4096 tokens per GPU.

    Frozen weights 2 bytes each; trainable parameters 2 (bf16 copy) + 4 (fp32 master) + 4 (gradient)
    + 8 (Adam moments) bytes; ZeRO-3 divides both by the number of GPUs except the persistent parameters
    (<= 10 x hidden elements, the Trainer's "auto" threshold), which every GPU keeps whole. Activations are
    the bytes-saved-for-backward formula of state_ctrl_memory.py at bf16 (1-byte dropout masks); they do
    not shrink with ZeRO. Not included: temporary buffers (gathered layers, communication buckets).
    """
    c = counts_7b(method)
    key = {"PEFT LoRA all-linear r=16": "PEFT LoRA all-linear r=16", "state-ctrl mlp r=64": "state-ctrl mlp r=64"}
    activations = projected_bytes(key[method], LLAMA2_7B, elem=2, mask=1)
    out = {}
    for gpus in GPUS:
        shard = 1 / gpus
        weights = (c["frozen"] * 2) * shard + c["persistent"] * 2 * (1 - shard)
        states = c["trainable"] * 18 * shard
        out[gpus] = {
            "weights": weights / 2**30,
            "adapter_states": states / 2**30,
            "activations": activations / 2**30,
            "total": (weights + states + activations) / 2**30,
        }
    return out


def run(out: Path) -> dict:
    result = {"shape": SHAPE.__dict__, "world": WORLD, "methods": {}}
    for method in METHODS:
        single = single_process(method)
        folder = out / method.replace(" ", "_").replace(",", "")
        ranks = launch(method, folder / "shipped")
        default_linear = launch(method, folder / "deepspeed_linear", deepspeed_linear=True)
        result["methods"][method] = {
            "single": single,
            "zero3": ranks,
            "zero3_deepspeed_linear": default_linear,
            "llama2_7b": projection(method),
        }
        params = sum(single["params"].values())
        ratios = [sum(r["params"].values()) / params * WORLD for r in ranks]
        print(f"{method}: per-rank parameter bytes x world / single = {', '.join(f'{x:.3f}' for x in ratios)}")
    return result


def table(result: dict) -> str:
    lines = [
        "| method | process | parameters MiB | x single | x (1/world) | saved activations MiB | x single |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    world = result["world"]
    for method, r in result["methods"].items():
        single_params = sum(r["single"]["params"].values())
        single_saved = r["single"]["saved"]
        single_row = f"| {method} | single process | {single_params / MiB:,.2f} | 1.000 | - |"
        lines.append(f"{single_row} {single_saved / MiB:,.2f} | 1.000 |")
        rows = [(f"ZeRO-3 rank {i} of {world}", rec) for i, rec in enumerate(r["zero3"])]
        rows += [
            (f"ZeRO-3 rank {i} of {world}, DeepSpeed's memory_efficient_linear", rec)
            for i, rec in enumerate(r["zero3_deepspeed_linear"])
        ]
        for name, rec in rows:
            p = sum(rec["params"].values())
            lines.append(
                f"| {method} | {name} | {p / MiB:,.2f} | {p / single_params:.3f} | "
                f"{p / single_params * world:.3f} | {rec['saved'] / MiB:,.2f} | {rec['saved'] / single_saved:.3f} |"
            )
    return "\n".join(lines)


def projection_table(result: dict) -> str:
    lines = [
        "| method | GPUs | weights GiB | adapter states GiB | activations GiB | total GiB per GPU |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, r in result["methods"].items():
        for gpus, p in r["llama2_7b"].items():
            setup = "1 (no ZeRO)" if int(gpus) == 1 else f"{gpus} (ZeRO-3)"
            lines.append(
                f"| {method} | {setup} | {p['weights']:.2f} | {p['adapter_states']:.3f} | "
                f"{p['activations']:.2f} | {p['total']:.2f} |"
            )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    methods = list(result["methods"])
    width = 0.25
    for i, method in enumerate(methods):
        r = result["methods"][method]
        values = [sum(r["single"]["params"].values())] + [sum(x["params"].values()) for x in r["zero3"]]
        xs = [i + (j - 1) * width for j in range(len(values))]
        axes[0].bar(xs, [v / MiB for v in values], width, color=["C0", "C1", "C2"])
        for j, p in enumerate(r["llama2_7b"].values()):
            axes[1].bar(i + (j - 1) * width, p["total"], width, color=f"C{j}")
    axes[0].set_xticks(range(len(methods)), methods, fontsize=8)
    axes[0].set_ylabel("parameter MiB held")
    axes[0].set_title("measured: single process (C0), ZeRO-3 ranks 0/1")
    axes[1].set_xticks(range(len(methods)), methods, fontsize=8)
    axes[1].set_ylabel("GiB per GPU")
    axes[1].set_title("LLaMA2-7B projection: 1 / 2 / 8 GPUs")
    save_figure(fig, path)


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--runs", default="runs/zero_memory", help="folder for the processes' own outputs")
    cli.add_argument("--worker", help=argparse.SUPPRESS)
    cli.add_argument("--deepspeed-linear", action="store_true", help=argparse.SUPPRESS)
    options, _ = cli.parse_known_args()
    if options.worker:
        worker(options.worker, Path(options.runs), options.deepspeed_linear)
        return
    result = run(Path(options.runs))
    threshold = result["methods"][next(iter(METHODS))]["zero3"][0]["threshold"]
    text = (
        "# ZeRO-3 memory per rank\n\n"
        f"Measured with `python benchmarks/zero_memory.py`: {WORLD} processes (torchrun, gloo, the shipped "
        f"zero3.json; persistence threshold {threshold} elements) against one process, on the LLaMA-shaped "
        f"model (hidden {SHAPE.hidden}, MLP {SHAPE.intermediate}, {SHAPE.layers} layers, vocab {SHAPE.vocab}), "
        f"{SHAPE.batch} x {SHAPE.seq} tokens per process, fp32. Parameters: what each process holds between "
        "steps; saved activations: bytes saved for backward in one step.\n\n"
        f"{table(result)}\n\n"
        "Projected to LLaMA2-7B (bf16 weights and activations, 1 x 4096 tokens per GPU; adapter states are "
        "bf16 copy + fp32 master, gradient and Adam moments; formula in `projection()`):\n\n"
        f"{projection_table(result)}"
    )
    write_results(options.out, "zero_memory", text, result, lambda path: plot(result, path))


if __name__ == "__main__":
    main()
