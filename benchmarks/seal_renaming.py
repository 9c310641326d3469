"""What renaming a released SEAL adapter costs its owner: the small LLaMA of the SEAL issue, over several owner keys.

    python benchmarks/seal_renaming.py --label after      # about 1 minute on 2 cores; resumable

For each owner key: a tiny LLaMA (hidden 32, 2 layers, 4 heads, 2 key/value heads) with SEAL on q_proj and v_proj
(r = 8: 4 modules, 32 key rows) trained 30 AdamW steps on random tokens (lr 3e-2), released as plain LoRA; then
owner verification (the published digest) of the release as it is and of three renamings of it: the names of the
LlamaModel backbone ("model." dropped), GGUF-style names ("blk.N.attn_q"), and every layer's modules saved under
the other layer's names (each claimed name on another module); and the release merged into its base and saved
in bf16, or with 1% noise on every weight, in key mode with the owner's record and without it (--r 8). Reported:
log10 p of the verdict, and of the pairing by name and by structure behind it (or the refusal). Each (label, key)
result is one JSON file in runs/seal_renaming/LABEL; the table shows every label found there, so a run of the
previous code under another label (e.g. "before") sits beside it. Writes docs/results/seal_renaming.{md,json,png}.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from _common import parser, pyplot, save_figure, write_results
from peft import get_peft_model

from peft_ctrl import SealConfig
from peft_ctrl.seal.claim import read_claim
from peft_ctrl.seal.io import LoraFactors, read_adapter
from peft_ctrl.seal.release import CLAIM_FILE, release
from peft_ctrl.seal.verify import Suspect, verify_key, verify_owner
from peft_ctrl_app.forensics import attacks

RUNS = Path("runs/seal_renaming")
KEYS = 6
STEPS, LR, RANK = 30, 3e-2, 8


def shifted(module: str) -> str:
    """model.layers.i.X saved as model.layers.(i+1)%2.X."""
    parts = module.split(".")
    parts[2] = str((int(parts[2]) + 1) % 2)
    return ".".join(parts)


def gguf(module: str) -> str:
    """model.layers.i.self_attn.q_proj saved as blk.i.attn_q."""
    parts = module.split(".")
    return f"blk.{parts[2]}.attn_{parts[-1][0]}"


RENAMINGS = {
    "release as published": lambda m: m,
    "backbone names (model. dropped)": lambda m: m.removeprefix("model."),
    "GGUF-style names (blk.N.attn_q)": gguf,
    "layers one place off": shifted,
}


def owner_key(i: int) -> str:
    return f"seal-renaming-owner-key-{i:02d}"


CONFIG = transformers.LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def trained_release(folder: Path, key: str, seed: int) -> tuple[LoraFactors, dict[str, torch.Tensor], Path, str]:
    """The released adapter, the weights of the base it was trained on, the proof and the published digest."""
    torch.manual_seed(seed)
    base_model = transformers.LlamaForCausalLM(CONFIG)
    base = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    model = get_peft_model(base_model, SealConfig(r=RANK, target_modules=["q_proj", "v_proj"], key=key))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        ids = torch.randint(2, 60, (4, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(folder / "sealed")
    claim = release(folder / "sealed", folder / "release", folder / "proof.safetensors", key=key)
    return read_adapter(folder / "release"), base, folder / "proof.safetensors", claim.digest()


def merged_suspects(plain: LoraFactors, base: dict[str, torch.Tensor], seed: int) -> dict[str, Suspect]:
    """The release merged into its base and saved again in bf16, or with noise of 1% of each 2-D weight's spread
    added to every entry: every weight then differs from the base."""
    merged = attacks.merge(plain, base)
    return {
        "merged, saved in bf16": Suspect.from_merged(attacks.round_to_bf16(merged), base, RANK),
        "merged, 1% noise on every weight": Suspect.from_merged(attacks.noisy_weights(merged, 0.01, seed), base, RANK),
    }


def summary(result: Any) -> dict:
    key_part = result.components["key"]["components"] if "key" in result.components else result.components
    return {
        "log10_p": result.log10_p,
        "verified": result.verified,
        "by_name": key_part["by_name"]["log10_p"],
        "by_structure": key_part["by_structure"]["log10_p"],
        "rows_by_structure": key_part["by_structure"]["rows"],
    }


def experiment(label: str, i: int) -> dict:
    path = RUNS / label / f"key_{i:02d}.json"
    if path.is_file():
        return json.loads(path.read_text())
    key = owner_key(i)
    with tempfile.TemporaryDirectory() as tmp:
        plain, base, proof, digest = trained_release(Path(tmp), key, seed=i)
        record = read_claim(Path(tmp) / "release" / CLAIM_FILE)
        result = {}
        for name, rename in RENAMINGS.items():
            factors = {rename(m): f for m, f in plain.factors.items()}
            suspect = Suspect.from_adapter(LoraFactors(factors, plain.scaling))
            result[name] = summary(verify_owner(suspect, proof, digest, key=key))
        for name, suspect in merged_suspects(plain, base, seed=i).items():
            result[f"{name}, key mode with the record"] = summary(verify_key(suspect, key=key, claim=record))
            try:
                result[f"{name}, key mode alone (--r {RANK})"] = summary(verify_key(suspect, key=key, r=RANK))
            except ValueError as err:
                result[f"{name}, key mode alone (--r {RANK})"] = {"refused": str(err)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def collect() -> dict[str, list[dict]]:
    return {
        folder.name: [json.loads(p.read_text()) for p in sorted(folder.glob("key_*.json"))]
        for folder in sorted(RUNS.iterdir(), key=lambda f: (f.name != "before", f.name))
        if folder.is_dir()
    }


def table(results: dict[str, list[dict]]) -> str:
    lines = [
        "| code | suspect | keys | mean log10 p (verdict) | min / max | gap to the release (decades) | "
        "by name | by structure (rows tested) | verified |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, records in results.items():
        release_mean = statistics.mean(r["release as published"]["log10_p"] for r in records)
        for name in records[0]:
            rows = [r[name] for r in records]
            if any("refused" in x for x in rows):
                refused = sum("refused" in x for x in rows)
                lines.append(f"| {label} | {name} | {len(rows)} | refused ({refused} of {len(rows)}) | | | | | |")
                continue
            p = [x["log10_p"] for x in rows]
            mean = statistics.mean(p)
            lines.append(
                f"| {label} | {name} | {len(rows)} | {mean:.1f} | {min(p):.1f} / {max(p):.1f} | "
                f"{mean - release_mean:+.1f} | {statistics.mean(x['by_name'] for x in rows):.1f} | "
                f"{statistics.mean(x['by_structure'] for x in rows):.1f} ({rows[0]['rows_by_structure']}) | "
                f"{sum(x['verified'] for x in rows)}/{len(rows)} |"
            )
    refusals = {x["refused"] for records in results.values() for r in records for x in r.values() if "refused" in x}
    return "\n".join(lines + [""] + [f"Refused: {text}" for text in sorted(refusals)])


def plot(results: dict[str, list[dict]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / max(1, len(results))
    for k, (label, records) in enumerate(results.items()):
        means = [statistics.mean(r[name]["log10_p"] for r in records) for name in RENAMINGS]  # owner verdicts
        ax.bar([i + k * width for i in range(len(RENAMINGS))], means, width, label=label)
    ax.set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(RENAMINGS))])
    ax.set_xticklabels(list(RENAMINGS), fontsize=7)
    ax.set_ylabel("mean log10 p (owner verdict)")
    ax.set_title(f"SEAL renamed releases, small LLaMA, {KEYS} owner keys")
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--label", default="after", help="the name this run's results are kept under")
    args = p.parse_args()
    for i in range(KEYS):
        experiment(args.label, i)
    results = collect()
    write_results(args.out, "seal_renaming", table(results), results, lambda path: plot(results, path))


if __name__ == "__main__":
    main()
