"""QLoRA, QDoRA and QControl on SmolLM2-135M-Instruct: weight bytes, bytes saved for backward and step time on
quantised bases (bitsandbytes nf4 with double quantisation, fp32 and bf16 compute; 8-bit), with the unquantised
fp32 base as reference; then the compiled/eager step-time ratio of state-ctrl and lean_lora with dropout on.

The authors' comparison (QControl against QLoRA and QDoRA) as rows:
- QLoRA: PEFT LoRA r=16, alpha 32, dropout 0.05 on all seven linears of every block;
- QDoRA: the same with ``use_dora=True``;
- QControl: state-ctrl MLP bridges r=64 (the authors' LLaMA recipe), dropout 0.05;
- QControl+LoRA: the authors' Control+LoRA recipe (MLP bridge r=64 plus LoRA r=32 on q, k, v).

Each base is loaded as ``load_smollm2(quantization_config=...)`` then ``prepare_model_for_kbit_training``
without gradient checkpointing (so the saved bytes are the activations the method keeps, DESIGN.md section 7).
Weight bytes count every parameter and buffer as stored, plus the quantisation state that bitsandbytes keeps
beside each quantised weight (absmax, its own quantisation under double quant, the 8-bit scales). Bytes saved
for backward are measured in one forward and backward (``peft_ctrl.metrics.saved_activation_bytes``). Step
time is the median of timed AdamW steps, the methods of one base interleaved round by round, and is quoted as
a ratio to QLoRA on the same base in the same run. A batch is 4 sequences of 256 tokens of real text (ARC-Easy
training questions and answers, packed).

Compile rows: the fp32 base, state-ctrl MLP r=64 and LoRA all-linear r=16 under ``lean_lora`` (dropout 0.05),
each decoder block compiled with ``torch.compile`` (inductor; the way torchtune compiles), against eager.

One JSON per base (``docs/results/quantized_bases/<base>.json``), written when the base is done, so an
interrupted run resumes where it stopped; ``--redo`` measures again.

    python benchmarks/quantized_bases.py             # about 11 minutes on 2 CPU cores

Writes docs/results/quantized_bases.{md,png} and the per-base JSON files.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import ALL_LINEAR, MiB, parser, pyplot, save_figure, write_results
from torch import nn

from peft_ctrl.atomic import atomic_file
from peft_ctrl.metrics import saved_activation_bytes

BATCH, SEQ = 4, 256
METHODS = ["QLoRA all-linear r=16", "QDoRA all-linear r=16", "QControl mlp r=64", "QControl+LoRA"]
BASES = ["nf4-fp32", "nf4-bf16", "int8", "fp32"]
BASE_NAMES = {
    "nf4-fp32": "4-bit nf4, double quant, fp32 compute",
    "nf4-bf16": "4-bit nf4, double quant, bf16 compute",
    "int8": "8-bit (LLM.int8)",
    "fp32": "fp32, not quantised (reference)",
}
COMPILE_METHODS = ["state-ctrl mlp r=64", "LoRA all-linear r=16 (lean_lora)"]


def adapter_config(method: str) -> Any:
    from peft import LoraConfig

    from peft_ctrl import StateCtrlConfig

    if method.startswith(("QLoRA", "QDoRA", "LoRA")):
        dora = method.startswith("QDoRA")
        return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=ALL_LINEAR, use_dora=dora)
    if method == "QControl+LoRA":
        return StateCtrlConfig.control_lora(dropout=0.05, task_type="CAUSAL_LM")
    return StateCtrlConfig(r=64, blocks="mlp", dropout=0.05, task_type="CAUSAL_LM")


def quantization(base: str) -> Any:
    from transformers import BitsAndBytesConfig

    if base.startswith("nf4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if base == "nf4-bf16" else torch.float32,
        )
    return BitsAndBytesConfig(load_in_8bit=True) if base == "int8" else None


def build(base: str, method: str) -> nn.Module:
    from peft import get_peft_model, prepare_model_for_kbit_training

    from peft_ctrl.models import load_smollm2

    quant = quantization(base)
    model = load_smollm2(quantization_config=quant)[0]
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.requires_grad_(False)
    model = get_peft_model(model, adapter_config(method))
    if method.endswith("(lean_lora)"):
        from peft_ctrl.ops import lean_lora

        lean_lora(model)
    return model.train()


def batch() -> dict[str, torch.Tensor]:
    """BATCH sequences of SEQ tokens: ARC-Easy training questions and answers, packed end to end."""
    from peft_ctrl.models import load_smollm2
    from peft_ctrl_app.commonsense import read_items, shipped_file

    tokenizer = load_smollm2()[1]
    ids: list[int] = []
    for item in read_items(shipped_file("ARC-Easy", "train")):
        ids += tokenizer(item.instruction + "\n" + item.output + "\n").input_ids
        if len(ids) >= BATCH * SEQ:
            break
    packed = torch.tensor(ids[: BATCH * SEQ]).view(BATCH, SEQ)
    return {"input_ids": packed, "labels": packed}


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model as stored: frozen and trainable parameters, buffers, bitsandbytes' quantisation state."""
    out = {"frozen": 0, "trainable": 0, "quant_state": 0, "buffers": 0}
    for p in model.parameters():
        out["trainable" if p.requires_grad else "frozen"] += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            packed = state.as_dict(packed=True)
            out["quant_state"] += sum(t.numel() * t.element_size() for t in packed.values() if torch.is_tensor(t))
        scales = getattr(p, "SCB", None)  # 8-bit row scales
        if torch.is_tensor(scales):
            out["quant_state"] += scales.numel() * scales.element_size()
    out["buffers"] = sum(b.numel() * b.element_size() for b in model.buffers())
    out["total"] = sum(out.values())
    return out


def timed_steps(models: dict[str, nn.Module], data: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per AdamW step of each model, the models interleaved round by round."""
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for name, m in models.items()
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(**data).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def measure_base(base: str, data: dict, rounds: int, warmup: int) -> dict[str, Any]:
    models, rows = {}, {}
    for method in METHODS:
        model = build(base, method)
        rows[method] = {
            "weights": weight_bytes(model),
            "saved_bytes": saved_activation_bytes(lambda m=model: m(**data).loss.backward(), exclude=model),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        try:  # a second step: some upstream combinations train one step only
            model(**data).loss.backward()
        except Exception as error:  # reported in the table, not timed
            rows[method]["error"] = f"{type(error).__name__}: {error}"
            print(f"  {base} {method}: its second step fails ({rows[method]['error']})", flush=True)
            continue
        model.zero_grad(set_to_none=True)
        models[method] = model
        print(f"  {base} {method}: built and measured", flush=True)
    for name, seconds in timed_steps(models, data, rounds, warmup).items():
        rows[name]["step_s"] = statistics.median(seconds)
        rows[name]["step_s_all"] = seconds
    return {"base": base, "rows": rows, "rounds": rounds, "warmup": warmup, "torch_threads": torch.get_num_threads()}


def measure_compile(data: dict, rounds: int, warmup: int) -> dict[str, Any]:
    rows = {}
    for method in COMPILE_METHODS:
        eager = build("fp32", method)
        compiled = build("fp32", method)
        for layer in compiled.base_model.model.model.layers:
            layer.compile()
        start = time.perf_counter()
        compiled(**data).loss.backward()  # the first step compiles
        compile_s = time.perf_counter() - start
        compiled.zero_grad(set_to_none=True)
        times = timed_steps({"eager": eager, "compiled": compiled}, data, rounds, warmup)
        rows[method] = {
            "eager_step_s": statistics.median(times["eager"]),
            "compiled_step_s": statistics.median(times["compiled"]),
            "first_compiled_step_s": compile_s,
            "times": times,
        }
        print(f"  compile {method}: done", flush=True)
    return {"base": "fp32", "rows": rows, "rounds": rounds, "warmup": warmup}


def table(results: dict[str, dict]) -> str:
    lines = [
        f"SmolLM2-135M-Instruct, batch {BATCH} x {SEQ} tokens, no gradient checkpointing; "
        f"{results[next(iter(results))]['torch_threads']} CPU threads. Ratios against QLoRA on the same base.",
        "",
        "| base | method | trainable params | weight MiB (of which quant. state) | saved for backward MiB "
        "| saved / QLoRA | step s | step / QLoRA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for base in BASES:
        if base not in results:
            continue
        rows = results[base]["rows"]
        ref = rows[METHODS[0]]
        for method in METHODS:
            r = rows[method]
            w = r["weights"]
            if "error" in r:
                lines.append(
                    f"| {BASE_NAMES[base]} | {method} | {r['trainable_params'] / 1e6:.2f} M "
                    f"| {w['total'] / MiB:.1f} ({w['quant_state'] / MiB:.1f}) | {r['saved_bytes'] / MiB:.0f} "
                    f"| {r['saved_bytes'] / ref['saved_bytes']:.2f}x | fails at step 2: `{r['error']}` | |"
                )
                continue
            lines.append(
                f"| {BASE_NAMES[base]} | {method} | {r['trainable_params'] / 1e6:.2f} M "
                f"| {w['total'] / MiB:.1f} ({w['quant_state'] / MiB:.1f}) | {r['saved_bytes'] / MiB:.0f} "
                f"| {r['saved_bytes'] / ref['saved_bytes']:.2f}x | {r['step_s']:.2f} "
                f"| {r['step_s'] / ref['step_s']:.2f}x |"
            )
    if "compile" in results:
        lines += [
            "",
            "torch.compile (each decoder block, inductor) against eager on the fp32 base, dropout 0.05:",
            "",
            "| method | eager step s | compiled step s | compiled / eager | first compiled step s |",
            "|---|---|---|---|---|",
        ]
        for method, r in results["compile"]["rows"].items():
            lines.append(
                f"| {method} | {r['eager_step_s']:.2f} | {r['compiled_step_s']:.2f} "
                f"| {r['compiled_step_s'] / r['eager_step_s']:.2f}x | {r['first_compiled_step_s']:.0f} |"
            )
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    plt = pyplot()
    bases = [b for b in BASES if b in results]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(METHODS)
    for k, method in enumerate(METHODS):
        xs = [i + (k - (len(METHODS) - 1) / 2) * width for i in range(len(bases))]
        rows = [results[b]["rows"][method] for b in bases]
        axes[0].bar(xs, [r["weights"]["total"] / MiB for r in rows], width, label=method)
        axes[1].bar(xs, [r["saved_bytes"] / MiB for r in rows], width, label=method)
        ref = [results[b]["rows"][METHODS[0]]["step_s"] for b in bases]
        ratios = [r.get("step_s", float("nan")) / t for r, t in zip(rows, ref, strict=True)]  # nan: it failed
        axes[2].bar(xs, ratios, width, label=method)
        for x, ratio in zip(xs, ratios, strict=True):
            if ratio != ratio:  # nan: the method failed on this base
                axes[2].text(x, 0.05, "fails", rotation=90, ha="center", va="bottom", fontsize=8)
    titles = ["weight MiB (with quantisation state)", "bytes saved for backward, MiB", "step time / QLoRA"]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xticks(range(len(bases)), bases)
        ax.set_title(title)
    axes[2].axhline(1.0, color="grey", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M, batch {BATCH} x {SEQ}, CPU")
    save_figure(fig, path)


def resumable(path: Path, redo: bool, measure: Callable[[], dict]) -> dict:
    if path.is_file() and not redo:
        return json.loads(path.read_text())
    result = measure()
    with atomic_file(path) as tmp:  # a finished experiment only: an interrupted one leaves no file
        tmp.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--rounds", type=int, default=3, help="timed steps per method")
    cli.add_argument("--warmup", type=int, default=1, help="untimed steps per method first")
    cli.add_argument("--bases", nargs="+", choices=[*BASES, "compile"], default=[*BASES, "compile"])
    cli.add_argument("--redo", action="store_true", help="measure again even where a result file exists")
    args = cli.parse_args()
    data = batch()
    folder = args.out / "quantized_bases"
    results = {}
    for base in args.bases:
        print(f"{base} ...", flush=True)
        if base == "compile":
            measure = functools.partial(measure_compile, data, args.rounds, args.warmup)
        else:
            measure = functools.partial(measure_base, base, data, args.rounds, args.warmup)
        results[base] = resumable(folder / f"{base}.json", args.redo, measure)
    for done in folder.glob("*.json"):  # bases measured by an earlier call
        results.setdefault(done.stem, json.loads(done.read_text()))
    if any(b in results for b in BASES):
        write_results(args.out, "quantized_bases", table(results), plot=lambda p: plot(results, p))


if __name__ == "__main__":
    main()
