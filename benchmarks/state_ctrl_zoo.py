"""State-ctrl on every model family people fine-tune: the support table, the probe's cost, and memory on the new
block shapes.

    python benchmarks/state_ctrl_zoo.py            # about a minute; resumable (one JSON per family)

1. **Support table.** For each family of tests/zoo.py (a tiny random model from its transformers config, hidden
   64, 2 layers), the battery of tests/test_zoo.py (placement out of the box, step 0 = base, a training step
   changes only the adapter, linear in B, cached generate = uncached, save -> stock peft load, gradient
   checkpointing, Control+LoRA) and the bridges the probe found. Written to docs/results/state_ctrl_zoo.md and
   quoted in docs/state_ctrl.md and README.
2. **Probe cost.** ``get_peft_model`` time with and without the placement probe on the real SmolLM2-135M-Instruct
   (medians of 5), and the same on each tiny family (plot).
3. **Memory on the new shapes.** Bytes saved for backward (peft_ctrl.metrics, storage-deduplicated) of state-ctrl
   mlp / both against PEFT LoRA on all linear layers, for one MoE family (Mixtral) and one sandwich-norm family
   (Gemma2), at hidden 256, 4 layers, batch 4 x 128 tokens.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import parser, pyplot, write_results
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import CHECKS, FAMILIES, SIZES, placement_summary, run_battery, tiny, tiny_config  # noqa: E402

from peft_ctrl import StateCtrlConfig  # noqa: E402
from peft_ctrl.metrics import saved_activation_bytes  # noqa: E402

MiB = 2**20


def family_result(family: str) -> dict:
    start = time.perf_counter()
    battery = run_battery(family)
    probe = []
    for _ in range(3):
        base, _ = tiny(family)  # built outside the timed call: only get_peft_model (the probe included) is timed
        t = time.perf_counter()
        get_peft_model(base, StateCtrlConfig(r=4, blocks="both"))
        probe.append(time.perf_counter() - t)
    return {
        "family": family,
        "battery": battery,
        "bridges": placement_summary(family),
        "get_peft_model_s": statistics.median(probe),
        "seconds": time.perf_counter() - start,
    }


def smollm2_probe_cost() -> dict | None:
    """get_peft_model on SmolLM2 with the probe (found placement) and without (given bridges, unchecked)."""
    try:
        from peft_ctrl.models import load_smollm2

        model, _ = load_smollm2()
    except Exception as err:  # noqa: BLE001 - the package is optional here
        print(f"SmolLM2 not available ({err}); skipping its probe cost")
        return None
    from peft import PeftModel

    times = {"probe": [], "no probe": []}
    unchecked = StateCtrlConfig(r=64, bridges=[("post_attention_layernorm", "mlp")], check_placement=False)
    for _ in range(5):
        for name, config in (("probe", StateCtrlConfig(r=64)), ("no probe", unchecked)):
            t = time.perf_counter()
            peft_model = get_peft_model(model, config)
            times[name].append(time.perf_counter() - t)
            model = peft_model.unload() if isinstance(peft_model, PeftModel) else peft_model
    ids = torch.arange(6).unsqueeze(0) + 3
    forward = []
    for _ in range(5):
        t = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids)
        forward.append(time.perf_counter() - t)
    block = statistics.median(forward) / len(model.model.layers)
    return {
        "probe_s": statistics.median(times["probe"]),
        "no_probe_s": statistics.median(times["no probe"]),
        "one_block_forward_s": block,  # a whole forward of the probe's 6 tokens over the number of blocks
        "layers": len(model.model.layers),
    }


def memory_rows(family: str) -> list[dict]:
    """Saved bytes of LoRA all-linear, state-ctrl mlp and both on a 4-layer, hidden-256 ``family`` model."""
    rows = []
    config = tiny_config(
        family, hidden_size=256, intermediate_size=512, num_hidden_layers=4, head_dim=64, moe_intermediate_size=256
    )
    ids = torch.randint(5, SIZES["vocab_size"], (4, 128), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    methods = {
        "PEFT LoRA all-linear r=16": LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
        "state-ctrl mlp r=64": StateCtrlConfig(r=64, blocks="mlp"),
        "state-ctrl both r=32": StateCtrlConfig(r=32, blocks="both"),
    }
    for name, method in methods.items():
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_config(config), method)
        model.train()

        def step(model=model) -> None:
            model(**batch).loss.backward()

        saved = saved_activation_bytes(step, exclude=model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({"family": family, "method": name, "saved_bytes": saved, "trainable": trainable})
    return rows


def table(results: list[dict], smollm2: dict | None, memory: list[dict]) -> str:
    checks = list(CHECKS)
    lines = [
        "| family | " + " | ".join(checks) + " | bridges found (block: kind head -> tail (form)) |",
        "|---|" + "---|" * (len(checks) + 1),
    ]
    for r in results:
        cells = []
        for check in checks:
            value = r["battery"][check]
            cells.append("yes" if value.startswith("yes") else ("n/a" if value == "n/a" else "**no**"))
        lines.append(f"| {r['family']} | " + " | ".join(cells) + f" | {r['bridges']} |")
    passed = sum(all(not v.startswith("FAIL") for v in r["battery"].values()) for r in results)
    failures = [
        f"- {r['family']}, {check}: {value}"
        for r in results
        for check, value in r["battery"].items()
        if value.startswith("FAIL")
    ]
    out = ["\n".join(lines), f"{passed} of {len(results)} families pass every check."]
    if failures:
        out.append("Failures:\n\n" + "\n".join(failures))
    probe = [r["get_peft_model_s"] for r in results]
    out.append(
        f"get_peft_model with the probe (blocks='both') on the tiny families: median "
        f"{statistics.median(probe):.3f} s, "
        f"max {max(probe):.3f} s ({max(results, key=lambda r: r['get_peft_model_s'])['family']})."
    )
    if smollm2:
        out.append(
            f"On SmolLM2-135M-Instruct ({smollm2['layers']} layers): get_peft_model takes {smollm2['probe_s']:.3f} s "
            f"with the probe (placement found) and {smollm2['no_probe_s']:.3f} s without it (bridges given, "
            f"check_placement=False): the probe adds {smollm2['probe_s'] - smollm2['no_probe_s']:.3f} s; one "
            f"block's forward on the probe's 6 tokens takes {smollm2['one_block_forward_s']:.4f} s."
        )
    mem = [
        "Bytes saved for backward (hidden 256, 4 layers, batch 4 x 128, fp32):",
        "",
        "| family | method | trainable params | saved MiB | x LoRA all-linear |",
        "|---|---|---:|---:|---:|",
    ]
    for family in dict.fromkeys(r["family"] for r in memory):
        rows = [r for r in memory if r["family"] == family]
        ref = rows[0]["saved_bytes"]
        for r in rows:
            mem.append(
                f"| {family} | {r['method']} | {r['trainable']:,} | {r['saved_bytes'] / MiB:.1f} | "
                f"{r['saved_bytes'] / ref:.3f} |"
            )
    out.append("\n".join(mem))
    return "\n\n".join(out)


def plot(results: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(12, 4))
    names = [r["family"] for r in results]
    ax.bar(names, [r["get_peft_model_s"] * 1000 for r in results])
    ax.set_ylabel("get_peft_model, ms (probe included)")
    ax.set_title("state-ctrl placement probe on tiny models of 46 families (blocks='both')")
    ax.tick_params(axis="x", rotation=90)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parser(__doc__).parse_args()
    folder = args.out / "state_ctrl_zoo"
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for family in FAMILIES:
        path = folder / f"{family}.json"
        if not path.exists():
            path.write_text(json.dumps(family_result(family), indent=1))
            print(f"{family}: done", flush=True)
        results.append(json.loads(path.read_text()))
    extra = folder / "_smollm2_and_memory.json"
    if not extra.exists():
        memory = memory_rows("mixtral") + memory_rows("gemma2")
        extra.write_text(json.dumps({"smollm2": smollm2_probe_cost(), "memory": memory}, indent=1))
    data = json.loads(extra.read_text())
    write_results(
        args.out,
        "state_ctrl_zoo",
        table(results, data["smollm2"], data["memory"]),
        {"families": results, **data},
        lambda p: plot(results, p),
    )


if __name__ == "__main__":
    main()
