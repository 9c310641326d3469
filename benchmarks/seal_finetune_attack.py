"""SEAL against continued fine-tuning on a small LLaMA: how much key evidence an attacker who keeps the task
removes, and how much ``SealConfig.init_a_scale`` keeps (finding 5 of the SEAL issue).

    python benchmarks/seal_finetune_attack.py          # about 5 minutes on 2 CPU cores; resumable

Model and task: a random-init LLaMA (hidden 64, 2 layers, 4 heads, vocabulary 64) learns a Markov chain whose every
token has one preferred successor (probability 0.9; the best possible next-token accuracy is about 0.90). The owner
trains SEAL on q_proj and v_proj (r = 8, alpha 16: 4 modules, 32 key rows) for 300 AdamW steps at lr 1e-2 (batch
16 x 32 tokens), with the key-derived initial A scaled by ``init_a_scale`` (1 = LoRA's variance, the default), and
releases it; plain LoRA trained the same way gives the task metric to compare with. The attacker loads the release
(plain LoRA) and trains 300 more steps on fresh data from the same task: lr 1e-2 and 5e-2 as they are, and lr 2e-2
and 5e-2 with 30 warmup steps and gradient clipping at 1.0; each also after first rebalancing the release
(``attacks.refactorize``: balanced factors of the same product, which undoes a large A). Reported: next-token
accuracy on 256 held-out sequences and the owner verdict's log10 p (threshold 2^-64: log10 p < -19.3).

One result file per (scale, seed) under runs/seal_finetune_attack/, so an interrupted run resumes. Writes
docs/results/seal_finetune_attack.{md,json,png}.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
from pathlib import Path

import torch
import transformers
from _common import parser, pyplot, save_figure, write_results
from peft import LoraConfig, PeftModel, get_peft_model

from peft_ctrl import SealConfig
from peft_ctrl.seal.io import LoraFactors, read_adapter, write_lora
from peft_ctrl.seal.release import release
from peft_ctrl.seal.verify import OWNER_THRESHOLD, Suspect, verify_owner
from peft_ctrl_app.forensics import attacks

KEY = "finetune-attack-owner-key-0123456789"
VOCAB, HIDDEN, STEPS, LR, BATCH, LENGTH = 64, 64, 300, 1e-2, 16, 32
SCALES = (1.0, 4.0, 8.0, 16.0)
SEEDS = (0, 1)
ATTACKS = tuple(
    (lr, warmup, clip, rebalance)
    for rebalance in (False, True)
    for lr, warmup, clip in ((1e-2, 0, None), (5e-2, 0, None), (2e-2, 30, 1.0), (5e-2, 30, 1.0))
)
RUNS = Path("runs/seal_finetune_attack")


def base_model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return transformers.LlamaForCausalLM(config)


SUCCESSOR = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))


def sequences(n: int, generator: torch.Generator) -> torch.Tensor:
    """n Markov-chain sequences: the preferred successor with probability 0.9, else a uniform token."""
    x = torch.empty(n, LENGTH, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (n,), generator=generator)
    for t in range(1, LENGTH):
        jump = torch.rand(n, generator=generator) < 0.1
        x[:, t] = torch.where(jump, torch.randint(0, VOCAB, (n,), generator=generator), SUCCESSOR[x[:, t - 1]])
    return x


TEST = sequences(256, torch.Generator().manual_seed(99))


def accuracy(model: torch.nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        predicted = model(input_ids=TEST).logits[:, :-1].argmax(-1)
    return float((predicted == TEST[:, 1:]).float().mean())


def train(model: torch.nn.Module, lr: float, seed: int, warmup: int = 0, clip: float | None = None) -> None:
    """STEPS AdamW steps on fresh batches of the task (the owner's training and the attacker's alike)."""
    generator = torch.Generator().manual_seed(seed)
    batches = ({"input_ids": x, "labels": x} for x in iter(lambda: sequences(BATCH, generator), None))
    attacks.continued_finetune(model, batches, STEPS, lr=lr, warmup_steps=warmup, max_grad_norm=clip)


def experiment(scale: float, seed: int) -> dict:
    torch.manual_seed(seed)
    lora = get_peft_model(base_model(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    train(lora, LR, seed)
    config = SealConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_a_scale=scale, key=KEY)
    model = get_peft_model(base_model(), config)
    train(model, LR, seed)
    result = {"scale": scale, "seed": seed, "lora_accuracy": accuracy(lora), "seal_accuracy": accuracy(model)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model.save_pretrained(root / "sealed")
        digest = release(root / "sealed", root / "release", root / "proof", key=KEY).digest()
        write_lora(root / "rebalanced", attacks.refactorize(read_adapter(root / "release")))

        def owner(adapter: LoraFactors) -> float:
            return verify_owner(Suspect.from_adapter(adapter), root / "proof", digest, key=KEY).log10_p

        result["release_log10_p"] = owner(read_adapter(root / "release"))
        result["attacks"] = []
        for lr, warmup, clip, rebalance in ATTACKS:
            start = root / ("rebalanced" if rebalance else "release")
            attacked = PeftModel.from_pretrained(base_model(), start, is_trainable=True)
            train(attacked, lr, 1000 + seed, warmup, clip)
            row = {"lr": lr, "warmup": warmup, "clip": clip, "rebalanced": rebalance, "accuracy": accuracy(attacked)}
            row["log10_p"] = owner(LoraFactors.from_model(attacked))
            result["attacks"].append(row)
            print(
                f"scale {scale:g} seed {seed}: {attack_name(row)}: accuracy {row['accuracy']:.3f}, "
                f"log10 p {row['log10_p']:.1f}"
            )
    return result


def attack_name(row: dict) -> str:
    text = f"lr {row['lr']:g}" + (f", warmup {row['warmup']}, clip {row['clip']:g}" if row["warmup"] else "")
    return text + (", rebalanced first" if row["rebalanced"] else "")


def write_tables(results: list[dict]) -> str:
    threshold = math.log10(OWNER_THRESHOLD)
    lines = [
        f"Small LLaMA (hidden {HIDDEN}, 2 layers), SEAL on q,v r=8 (32 key rows), {STEPS} owner steps at lr {LR:g}; "
        f"the attacker trains {STEPS} more steps on the same task. Mean over seeds {', '.join(map(str, SEEDS))}; "
        f"owner verdict at log10 p < {threshold:.1f}.",
        "",
        "| init_a_scale | LoRA accuracy | SEAL accuracy | release log10 p | worst attacked log10 p | "
        "attacks verified | attacked accuracy (min-max) |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for scale in SCALES:
        rows = [r for r in results if r["scale"] == scale]
        if not rows:
            continue
        attacked = [a for r in rows for a in r["attacks"]]
        worst = max(a["log10_p"] for a in attacked)
        verified = sum(a["log10_p"] < threshold for a in attacked)
        accs = [a["accuracy"] for a in attacked]
        lines.append(
            f"| {scale:g} | {statistics.mean(r['lora_accuracy'] for r in rows):.3f} | "
            f"{statistics.mean(r['seal_accuracy'] for r in rows):.3f} | "
            f"{statistics.mean(r['release_log10_p'] for r in rows):.1f} | {worst:.1f} | "
            f"{verified} of {len(attacked)} | "
            f"{min(accs):.3f}-{max(accs):.3f} |"
        )
    lines += ["", "Per attack (mean log10 p over seeds; accuracy in brackets):", ""]
    present = [s for s in SCALES if any(r["scale"] == s for r in results)]
    lines += ["| attack | " + " | ".join(f"scale {s:g}" for s in present) + " |", "|---|" + "---:|" * len(present)]
    for i, spec in enumerate(ATTACKS):
        cells = []
        for scale in present:
            rows = [r["attacks"][i] for r in results if r["scale"] == scale]
            cells.append(
                f"{statistics.mean(a['log10_p'] for a in rows):.1f} "
                f"({statistics.mean(a['accuracy'] for a in rows):.3f})"
            )
        name = attack_name(dict(zip(("lr", "warmup", "clip", "rebalanced"), spec, strict=True)))
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for scale in SCALES:
        rows = [r for r in results if r["scale"] == scale]
        attacked = [a for r in rows for a in r["attacks"]]
        ax.scatter(
            [a["accuracy"] for a in attacked], [-a["log10_p"] for a in attacked], label=f"init_a_scale {scale:g}"
        )
    ax.axhline(-math.log10(OWNER_THRESHOLD), color="k", ls="--", lw=0.8, label="2^-64")
    ax.set_yscale("log")
    ax.set_xlabel("next-token accuracy after the attack")
    ax.set_ylabel("-log10 p (owner verdict)")
    ax.set_title("Continued fine-tuning on a small LLaMA")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    args = parser(__doc__).parse_args()
    torch.set_num_threads(2)
    RUNS.mkdir(parents=True, exist_ok=True)
    results = []
    for scale in SCALES:
        for seed in SEEDS:
            file = RUNS / f"scale{scale:g}_seed{seed}.json"
            if not file.exists():
                file.write_text(json.dumps(experiment(scale, seed), indent=1))
            results.append(json.loads(file.read_text()))
    write_results(args.out, "seal_finetune_attack", write_tables(results), results, lambda p: plot(results, p))


if __name__ == "__main__":
    main()
