"""SEAL on real models and tasks: task metric against plain LoRA, attacks, false positives, claim search, timing.

    python benchmarks/seal_robustness.py              # about 40 minutes on 2 CPU cores; resumable
    python benchmarks/seal_robustness.py --only timing

Model and task: the shipped pretrained all-MiniLM-L6-v2 on the stdlib-topics task of `peft-ctrl finetune`
(LoRA and SEAL on query/value, r=8, alpha 16, dropout 0.1, 200 AdamW steps at LoRA's lr, classifier head
trained), 3 seeds. Keys are fixed benchmark strings so runs repeat exactly.

1. Task metric: LoRA vs SEAL accuracy on the test split (mean over seeds).
2. Attacks on the released (plain LoRA) adapter of seed 0: p-values of owner verification (the published
   digest; decided by the key-only test with the claim's structure, as key-only mode with the owner's public
   record), of key-only verification from the suspect alone (the structure it shows), of the paper's passport
   test, and the task metric after each attack. The test split is cut in two fixed halves: the attacker's data
   (continued fine-tuning and distillation: "other data" the owner never trained on) and the evaluation half.
   Continued fine-tuning is swept over the attacker's lr and steps, with and without warmup and clipping; modules
   are renamed for the backbone, shifted by one layer, and given opaque names.
3. False positives: 1000 unrelated keys (key-only test on the owner's release), 1000 forged-key ownership
   claims (each forger re-factorises the release to match their own key and publishes their own digest),
   1000 unrelated adapter/key pairs (the three plain-LoRA adapters against fresh keys, owner-style with a
   proof forged for that key), and the owner's key against the plain-LoRA adapters; 1000 forged proofs
   presented against the owner's digest (each must be refused: no verdict).
4. Whole-claim search: a forger tries ``--claims`` claims (default 20,000) over the owner's release, each with its
   own key, module subset, names and ranks; the smallest p any reaches, against what an exact test allows. Then
   ``--hostile`` hostile claims (default 20,000; ``attacks.hostile_claims``: supersets, mixed ranks, shuffled
   order, repeated entries, a forger key each), the same figures.
5. SmolLM2-135M-Instruct (the shipped LLaMA-architecture chat model) on the chat task of `peft-ctrl finetune`:
   SEAL vs LoRA on q,v (r=8, seed 0), then the merged-model rewrites on the released SEAL adapter (merge, head
   and neuron permutation with sign flips, residual-stream rotation with norm gains folded, both, and both with
   norm gains re-introduced), continued fine-tuning at two learning rates and with warmup and clipping, and
   distillation into a fresh LoRA (the released model's next-token distributions at the answer positions of the
   attacker's sentences): task metric (exact match) and p-values.
6. Time to verify a LLaMA2-7B-shaped adapter (224 matrices, r=32, random weights) from disk.

Each part's result is kept in runs/seal_robustness/PART.json (the adapters it trained in runs/seal_robustness/work),
so an interrupted run resumes at the part it stopped in; delete the folder to measure again. Writes
docs/results/seal_robustness.{md,json,png}. Continued fine-tuning on a small LLaMA, and what
``SealConfig.init_a_scale`` changes there: benchmarks/seal_finetune_attack.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import parser, pyplot, save_figure, write_results
from peft import LoraConfig, PeftModel, get_peft_model

from peft_ctrl import SealConfig
from peft_ctrl.seal.claim import Claim, read_claim, structure_of, weights_sha256
from peft_ctrl.seal.io import LoraFactors, Proof, read_adapter, write_lora, write_proof
from peft_ctrl.seal.keys import KEY_ENV, commitment, new_salt
from peft_ctrl.seal.release import CLAIM_FILE, release
from peft_ctrl.seal.verify import DEFAULT_THRESHOLD, OWNER_THRESHOLD, Suspect, verify_key, verify_owner
from peft_ctrl_app.datasets import stdlib_topics
from peft_ctrl_app.finetune import (
    FinetuneArgs,
    accuracy,
    build_model,
    encode,
    train_one,
)
from peft_ctrl_app.forensics import attacks
from peft_ctrl_app.training import length_bucketed_batches

RUNS = Path("runs/seal_robustness")
SEEDS = (0, 1, 2)
TRIALS = 1000
RANK = 8
# (steps, lr, warmup steps, gradient clipping): plain AdamW, then an attacker who keeps the task at a high lr
FINETUNE_SWEEP = (
    *((steps, lr, 0, None) for steps in (100, 400) for lr in (5e-3, 2e-2, 5e-2)),
    (300, 2e-2, 30, 1.0),
    (300, 5e-2, 30, 1.0),
)
CLAIM_SEARCH = 20_000
HOSTILE_SEARCH = 20_000
SMOL_STEPS, SMOL_LR, SMOL_ATTACK_STEPS, SMOL_BATCH = 60, 2e-3, 100, 8


def trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the padding columns that no sentence of the batch uses."""
    width = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :width] if v.dim() == 2 else v for k, v in batch.items()}


def owner_key(seed: int | str) -> str:
    return f"seal-benchmark-owner-key-seed-{seed}"


def train_adapters(root: Path, train: dict, test: dict, num_labels: int) -> dict:
    args = FinetuneArgs(methods=("lora", "seal"), seeds=SEEDS, output_dir=str(root))
    runs = []
    for seed in SEEDS:
        os.environ[KEY_ENV] = owner_key(seed)
        for method in ("lora", "seal"):
            result = train_one(method, seed, args, train, test, num_labels)
            runs.append({"method": method, "seed": seed, "accuracy": result.accuracy})
            print(f"{method} seed {seed}: accuracy {result.accuracy:.4f}")
    del os.environ[KEY_ENV]
    return {"runs": runs}


def evaluate(adapter_dir: Path, data: dict, num_labels: int) -> float:
    model = PeftModel.from_pretrained(build_model("minilm", num_labels, 0), adapter_dir)
    return accuracy(model, data)


def check(suspect: Suspect, proof: Path, key: str, published: str, record: Claim) -> dict:
    """Owner verdict (published digest; the key-only test with the claim's ranks and names, which key-only mode
    with the owner's public record computes too), the paper's passport test it reports, and key-only from the
    suspect alone (its own rank and names; the owner's rank for a merged suspect)."""
    owner = verify_owner(suspect, proof, published, key=key)
    with_record = verify_key(suspect, key=key, claim=record)
    assert with_record.log10_p == owner.log10_p
    alone = verify_key(suspect, key=key, r=None if suspect.factors else RANK)
    return {
        "owner_log10_p": owner.log10_p,
        "passport_log10_p": owner.components["passport"]["log10_p"],
        "key_alone_log10_p": alone.log10_p,
        "passport_agreement": owner.components["passport"]["statistic"],
        "note": suspect.note,
    }


class Table:
    """Rows of one model's attack table, each verified against the owner's release of that model."""

    def __init__(self, model: str, proof: Path, key: str, digest: str, record: Claim) -> None:
        self.model, self.proof, self.key, self.digest, self.record = model, proof, key, digest, record
        self.rows: list[dict] = []

    def add(self, attack: str, strength: str, acc: float | None, suspect: Suspect) -> None:
        row = {"model": self.model, "attack": attack, "strength": strength, "accuracy": acc}
        row |= check(suspect, self.proof, self.key, self.digest, self.record)
        self.rows.append(row)
        print({k: v for k, v in row.items() if k != "note"})


def unlabelled(data: dict, idx: torch.Tensor) -> dict:
    return trim({k: v[idx] for k, v in data.items() if k != "labels"})


def attack_table(root: Path, attacker: dict, evaluation: dict, num_labels: int) -> list[dict]:
    key = owner_key(0)
    released, proof = root / "release", root / "proof.safetensors"
    shutil.rmtree(released, ignore_errors=True)  # left by an interrupted run
    proof.unlink(missing_ok=True)
    digest = release(root / "minilm" / "seal" / "seed0", released, proof, key=key).digest()
    table = Table("MiniLM", proof, key, digest, read_claim(released / CLAIM_FILE))
    plain = read_adapter(released)

    def written(adapter: LoraFactors) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            write_lora(Path(tmp) / "a", adapter)
            return evaluate(Path(tmp) / "a", evaluation, num_labels)

    clean = written(plain)
    table.add("none", "-", clean, Suspect.from_adapter(plain))
    lengths = attacker["attention_mask"].sum(1)
    for steps, lr, warmup, clip in FINETUNE_SWEEP:
        model = PeftModel.from_pretrained(build_model("minilm", num_labels, 0), released, is_trainable=True)
        batches = (trim_all(attacker, idx) for idx in length_bucketed_batches(lengths, 32, steps, seed=1))
        attacks.continued_finetune(model, batches, steps, lr=lr, warmup_steps=warmup, max_grad_norm=clip)
        suspect = Suspect.from_adapter(LoraFactors.from_model(model))
        strength = f"{steps} steps lr {lr:g}" + (f", warmup {warmup}, clip {clip:g}" if warmup else "")
        table.add("fine-tune", strength, accuracy(model, evaluation), suspect)
    for fraction in (0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99):
        attacked = attacks.prune(plain, fraction)
        table.add("prune", f"{fraction:.0%}", written(attacked), Suspect.from_adapter(attacked))
    for std in (0.1, 0.3, 1.0, 3.0):
        attacked = attacks.noise(plain, std, seed=0)
        table.add("noise", f"{std:g} x RMS", written(attacked), Suspect.from_adapter(attacked))
    for kind in ("obfuscate", "permute"):
        attacked = getattr(attacks, kind)(plain, seed=0)
        table.add(kind, "-", written(attacked), Suspect.from_adapter(attacked))
    attacked = attacks.refactorize(plain)
    table.add("refactorize", "-", written(attacked), Suspect.from_adapter(attacked))
    attacked = attacks.pad_rank(plain, 60 - RANK)
    table.add("pad rank", f"r {RANK} -> 60, near-null", written(attacked), Suspect.from_adapter(attacked))
    # The adapter saved for the backbone (BertModel): the same weights under other names; then renamed on purpose,
    # every layer under the next one's name (each claimed name on the wrong module), and under opaque names.
    attacked = attacks.rename(plain, "bert.encoder.", "encoder.")
    table.add("rename modules", "backbone names, same weights", clean, Suspect.from_adapter(attacked))
    layers = 1 + max(int(m.split("layer.")[1].split(".")[0]) for m in plain.factors)

    def shifted(module: str) -> str:
        head, rest = module.split("layer.", 1)
        index, tail = rest.split(".", 1)
        return f"{head}layer.{(int(index) + 1) % layers}.{tail}"

    for strength, new_name in (
        ("layer i saved as layer i+1", shifted),
        ("opaque names, shuffled order", lambda m: f"m{hash_name(m)}"),
    ):
        renamed = LoraFactors({new_name(m): f for m, f in plain.factors.items()}, plain.scaling)
        table.add("rename modules", strength, clean, Suspect.from_adapter(renamed))
    base = build_model("minilm", num_labels, 0).state_dict()
    merged = PeftModel.from_pretrained(build_model("minilm", num_labels, 0), released).merge_and_unload()
    table.add(
        "merge", "into base", accuracy(merged, evaluation), Suspect.from_merged(attacks.merge(plain, base), base)
    )
    teacher = PeftModel.from_pretrained(build_model("minilm", num_labels, 0), released)
    student = get_peft_model(
        build_model("minilm", num_labels, 7),
        LoraConfig(
            r=RANK, lora_alpha=2 * RANK, lora_dropout=0.1, target_modules=["query", "value"], task_type="SEQ_CLS"
        ),
    )
    batches = length_bucketed_batches(lengths, 32, 400, seed=2)
    attacks.distill(teacher, student, (unlabelled(attacker, idx) for idx in batches), 400, lr=5e-3)
    suspect = Suspect.from_adapter(LoraFactors.from_model(student))
    table.add("distill", "fresh LoRA, 400 steps on its outputs", accuracy(student, evaluation), suspect)
    # The forger publishes a digest of their own (after the owner's); against the owner's digest the claim is
    # refused before any statistic (counted in false_positives).
    forger = "forger-key-for-the-benchmark-0"
    forged = attacks.forge_proof(plain, forger)
    claim = verify_owner(Suspect.from_adapter(plain), forged, attacks.claim_of(forged).digest(), key=forger)
    table.rows.append(
        {
            "model": "MiniLM",
            "attack": "forged-key claim",
            "strength": "forger's key, proof and digest",
            "accuracy": None,
            "owner_log10_p": claim.log10_p,
            "passport_log10_p": claim.components["passport"]["log10_p"],
            "key_alone_log10_p": verify_key(Suspect.from_adapter(plain), key=forger).log10_p,
            "passport_agreement": claim.components["passport"]["statistic"],
            "note": "",
        }
    )
    return table.rows


def hash_name(module: str) -> str:
    """A name that says nothing about the module (and sorts in no relation to model order)."""
    return hashlib.sha256(module.encode()).hexdigest()[:8]


def trim_all(data: dict, idx: torch.Tensor) -> dict:
    return trim({k: v[idx] for k, v in data.items()})


def false_positives(root: Path) -> dict:
    plain = read_adapter(root / "release")
    owner_digest = read_claim(root / "release" / CLAIM_FILE).digest()
    suspect = Suspect.from_adapter(plain)
    unrelated = [verify_key(suspect, key=f"unrelated-key-{i:05d}-0123").p_value for i in range(TRIALS)]
    forged, refused = [], 0
    for i in range(TRIALS):
        forger = f"forger-key-{i:05d}-0123456789"
        proof = attacks.forge_proof(plain, forger)
        forged.append(verify_owner(suspect, proof, attacks.claim_of(proof).digest(), key=forger).p_value)
        try:
            verify_owner(suspect, proof, owner_digest, key=forger)
        except ValueError:
            refused += 1
    adapters = [read_adapter(root / "minilm" / "lora" / f"seed{s}") for s in SEEDS]
    lora = [Suspect.from_adapter(adapter) for adapter in adapters]
    pairs = []
    for i in range(TRIALS):
        key = f"pair-key-{i:05d}-0123456789"
        j = i % len(SEEDS)
        proof = attacks.forge_proof(adapters[j], key)
        pairs.append(verify_owner(lora[j], proof, attacks.claim_of(proof).digest(), key=key).p_value)
    owner_vs_lora = [verify_key(s, key=owner_key(0)).p_value for s in lora]

    def summary(p: list[float], threshold: float = DEFAULT_THRESHOLD) -> dict:
        arr = np.array(p)
        return {
            "trials": len(arr),
            "threshold": threshold,
            "false_positives": int((arr < threshold).sum()),
            "share_p_above_0.01": float((arr > 0.01).mean()),
            "min_p": float(arr.min()),
            "p_values": arr.tolist(),
        }

    return {
        "unrelated keys (key-only)": summary(unrelated),
        "forged-key claims, forger's own digest (owner)": summary(forged, OWNER_THRESHOLD),
        "unrelated adapters + keys (owner)": summary(pairs, OWNER_THRESHOLD),
        "owner key vs plain LoRA adapters (key-only)": summary(owner_vs_lora),
        "forged proofs against the owner's digest": {"trials": TRIALS, "refused": refused},
    }


def _claim_chunk(job: tuple[Path, int, int]) -> list[float]:
    """log10 p of forged claims start..start+count-1 over the owner's release (``claim_search``)."""
    released, start, count = job
    torch.set_num_threads(1)
    plain = read_adapter(released)
    suspect = Suspect.from_adapter(plain)
    modules = sorted(plain.factors)
    weights = weights_sha256(plain.factors, plain.scaling)
    out = []
    for i in range(start, start + count):
        rng = np.random.default_rng(i)
        key = f"forger-claim-search-{i:09d}".encode()
        chosen = sorted(rng.choice(len(modules), size=int(rng.integers(1, len(modules) + 1)), replace=False).tolist())
        naming = i % 3  # the release's names, the release's names shuffled over the modules, or invented names
        names = (
            [modules[j] for j in chosen]
            if naming == 0
            else [modules[j] for j in rng.permutation(chosen)]
            if naming == 1
            else [f"{hash_name(str(i))}.{j}" for j in chosen]
        )
        ranks = rng.integers(1, 2 * RANK + 1, size=len(chosen))
        structure = tuple(
            (name, *suspect.shape(modules[j]), int(r)) for name, j, r in zip(names, chosen, ranks, strict=True)
        )
        salt = f"{i:032x}"
        claim = Claim(commitment(key, salt), salt, structure, weights)
        out.append(verify_key(suspect, key=key, claim=claim).log10_p)
    return out


def claim_search(root: Path, claims: int, chunk: int = 500) -> dict:
    """A forger's search using every freedom of the claim format: for each try a key, a subset of the release's
    modules, names for them (the release's, the release's shuffled, or invented) and a rank per module (1 to 2r),
    each a claim of their own over the owner's release; the verdict's p of every try (``verify_key`` with the
    claim, which is what owner verification decides on)."""
    jobs = [(root / "release", start, min(chunk, claims - start)) for start in range(0, claims, chunk)]
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        log10_p = np.concatenate(pool.map(_claim_chunk, jobs))
    return _search_summary(log10_p, time.perf_counter() - start)


def _search_summary(log10_p: np.ndarray, seconds: float) -> dict:
    """How the smallest p of N tries compares with the minimum of N uniform p-values, and the tail counts."""
    claims = len(log10_p)
    p = 10.0**log10_p
    best = int(log10_p.argmin())
    return {
        "claims": claims,
        "seconds": seconds,
        "min_log10_p": float(log10_p[best]),
        "best_claim": best,
        "expected_min_log10_p": float(np.log10(1 / claims)),
        "n_times_min_p": float(claims * p[best]),
        "below_1e-3": int((p < 1e-3).sum()),
        "expected_below_1e-3": claims * 1e-3,
        "below_owner_threshold": int((log10_p < math.log10(OWNER_THRESHOLD)).sum()),
        "union_bound": claims * OWNER_THRESHOLD,
        "histogram": np.histogram(p, bins=20, range=(0, 1))[0].tolist(),
    }


def _hostile_chunk(job: tuple[Path, int, int]) -> tuple[list[float], int, int]:
    """(log10 p of the accepted hostile claims of seed ``seed``, how many were refused, how many tested more rows
    or suspect modules than the claim and the suspect hold: must be 0)."""
    released, seed, count = job
    torch.set_num_threads(1)
    plain = read_adapter(released)
    suspect = Suspect.from_adapter(plain)
    shapes = {m: suspect.shape(m) for m in suspect.modules()}
    weights = weights_sha256(plain.factors, plain.scaling)
    out, refused, overused = [], 0, 0
    for claim, key in attacks.hostile_claims(shapes, weights, count, seed=seed, max_rank=2 * RANK):
        if claim is None:
            refused += 1
            continue
        result = verify_key(suspect, key=key, claim=claim)
        rows = sum(r for *_, r in claim.structure)
        for used in (result.components["by_name"], result.components["by_structure"]):
            overused += used["rows"] > rows or used["modules"] > len(shapes)
        out.append(result.log10_p)
    return out, refused, overused


def hostile_search(root: Path, claims: int, chunk: int = 500) -> dict:
    """Item 2 of the SEAL forgery issue at scale: ``attacks.hostile_claims`` (supersets of up to 4x the release's
    modules, mixed ranks, shuffled order, repeated entries, a forger key each) over the owner's release."""
    jobs = [(root / "release", 1000 + start // chunk, min(chunk, claims - start)) for start in range(0, claims, chunk)]
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        parts = pool.map(_hostile_chunk, jobs)
    log10_p = np.concatenate([np.array(p, dtype=float) for p, _, _ in parts])
    summary = _search_summary(log10_p, time.perf_counter() - start)
    summary["tried"] = claims
    summary["refused"] = sum(r for _, r, _ in parts)
    summary["overused"] = sum(o for _, _, o in parts)
    return summary


def smollm2_part(root: Path) -> dict:
    """SEAL vs LoRA on SmolLM2's chat task, then merged-model rewrites, fine-tuning and distillation attacks."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer

    from peft_ctrl.models import load_smollm2
    from peft_ctrl_app.tasks import stdlib_items
    from peft_ctrl_app.trainer_setup import ChatCollator, ChatDataset, in_batch_order, job_arguments, quiet_progress
    from peft_ctrl_app.training import (
        ChatExample,
        answer_logits,
        answer_loss,
        balanced_subset,
        chat_example,
        collate,
        greedy_hits,
    )

    _, tokenizer = load_smollm2()
    pad = tokenizer.pad_token_id
    # the stdlib chat task (peft_ctrl_app.tasks): every train sentence, 20 test sentences per topic scored by greedy
    # exact match; the attacker gets the other test sentences
    train_examples = [chat_example(tokenizer, it) for it in stdlib_items("stdlib", "train", tokenizer)]
    test_all = [chat_example(tokenizer, it) for it in stdlib_items("stdlib", "test", tokenizer)]
    test = balanced_subset(test_all, 20)
    shown = {e.sentence for e in test}
    attacker = [e for e in test_all if e.sentence not in shown]
    options = {"r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    key = owner_key("smollm2")

    def fresh() -> torch.nn.Module:
        return load_smollm2()[0]

    def batches(examples: list[ChatExample], steps: int, seed: int):
        lengths = torch.tensor([len(e.prompt_ids) + len(e.answer_ids) for e in examples])
        for idx in length_bucketed_batches(lengths, SMOL_BATCH, steps, seed):
            yield collate([examples[i] for i in idx.tolist()], pad)

    train_lengths = [len(e.prompt_ids) + len(e.answer_ids) for e in train_examples]

    def train(config) -> torch.nn.Module:
        torch.manual_seed(0)
        model = get_peft_model(fresh(), config)
        with tempfile.TemporaryDirectory() as output_dir:
            settings = job_arguments(
                output_dir, steps=SMOL_STEPS, batch_size=SMOL_BATCH, lr=SMOL_LR, seed=0, bf16=False
            )
            trainer = Trainer(
                model=model,
                args=settings,
                train_dataset=ChatDataset(in_batch_order(train_examples, train_lengths, SMOL_BATCH, SMOL_STEPS, 0)),
                data_collator=ChatCollator(pad),
            )
            quiet_progress(trainer).train()
        return model.eval()

    def score(model: torch.nn.Module) -> float:
        return statistics.fmean(greedy_hits(model, test, pad))

    lora_acc = score(train(LoraConfig(task_type="CAUSAL_LM", **options)))
    sealed = train(SealConfig(key=key, task_type="CAUSAL_LM", **options))
    seal_acc = score(sealed)
    for stale in ("smol-sealed", "smol-release"):  # left by an interrupted run
        shutil.rmtree(root / stale, ignore_errors=True)
    (root / "smol-proof.safetensors").unlink(missing_ok=True)
    sealed.save_pretrained(root / "smol-sealed")
    del sealed
    print(f"SmolLM2 q,v r={RANK}: LoRA {lora_acc:.4f}, SEAL {seal_acc:.4f}")
    released, proof = root / "smol-release", root / "smol-proof.safetensors"
    digest = release(root / "smol-sealed", released, proof, key=key).digest()
    table = Table("SmolLM2", proof, key, digest, read_claim(released / CLAIM_FILE))
    plain = read_adapter(released)
    table.add("none", "-", score(PeftModel.from_pretrained(fresh(), released)), Suspect.from_adapter(plain))

    base_model = fresh()
    config = base_model.config
    base = dict(base_model.state_dict())
    base.setdefault("lm_head.weight", base["model.embed_tokens.weight"])
    del base_model

    def merged_score(weights: dict[str, torch.Tensor]) -> float:
        model = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": False}))
        model.load_state_dict(weights)
        return score(model.eval())

    merged = attacks.merge(plain, base)
    rewrites = {
        "merge": ("into base", merged),
        "merge + permute": ("heads, neurons, signs", attacks.permute_heads(merged, config, seed=1)),
        "merge + rotate": ("residual stream, norms folded", attacks.rotate_residual(merged, config, seed=1)),
        "merge + rotate + permute": (
            "both",
            attacks.permute_heads(attacks.rotate_residual(merged, config, seed=1), config, seed=2),
        ),
        "merge + rotate + permute + norms": (
            "both, then norm gains re-introduced",
            attacks.rescale_norms(
                attacks.permute_heads(attacks.rotate_residual(merged, config, seed=1), config, seed=2), config, seed=3
            ),
        ),
    }
    for attack, (strength, weights) in rewrites.items():
        table.add(attack, strength, merged_score(weights), Suspect.from_merged(weights, base, rank=RANK))
    del merged, rewrites
    for lr, warmup, clip in ((SMOL_LR, 0, None), (1e-2, 0, None), (1e-2, 10, 1.0)):
        model = PeftModel.from_pretrained(fresh(), released, is_trainable=True)
        data = batches(attacker, SMOL_ATTACK_STEPS, 1)
        attacks.continued_finetune(
            model, data, SMOL_ATTACK_STEPS, lr=lr, loss=answer_loss, warmup_steps=warmup, max_grad_norm=clip
        )
        suspect = Suspect.from_adapter(LoraFactors.from_model(model))
        strength = f"{SMOL_ATTACK_STEPS} steps lr {lr:g}" + (f", warmup {warmup}, clip {clip:g}" if warmup else "")
        table.add("fine-tune", strength, score(model), suspect)
    # Distillation: a fresh LoRA learns the released model's next-token distributions at every answer position of
    # the attacker's sentences (teacher-forced on their answers).
    teacher = PeftModel.from_pretrained(fresh(), released).eval()
    torch.manual_seed(7)
    student = get_peft_model(fresh(), LoraConfig(task_type="CAUSAL_LM", **options))
    data = batches(attacker, SMOL_ATTACK_STEPS, 2)
    attacks.distill(teacher, student, data, SMOL_ATTACK_STEPS, lr=SMOL_LR, logits=answer_logits)
    suspect = Suspect.from_adapter(LoraFactors.from_model(student))
    table.add("distill", f"fresh LoRA, {SMOL_ATTACK_STEPS} steps on its outputs", score(student), suspect)
    return {"task": {"lora": lora_acc, "seal": seal_acc, "test_sentences": len(test)}, "attacks": table.rows}


def llama7b_timing() -> dict:
    """Write a random LLaMA2-7B-shaped release and proof, then time reading and verifying them."""
    shapes = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096)}
    shapes |= {"gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
    g = torch.Generator().manual_seed(0)
    factors = {}
    for layer in range(32):
        for name, (m, n) in shapes.items():
            part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            module = f"model.layers.{layer}.{part}.{name}"
            factors[module] = (torch.randn(m, 32, generator=g) * 0.01, torch.randn(32, n, generator=g) * 0.01)
    key = "timing-key-0123456789abcdef"
    with tempfile.TemporaryDirectory() as tmp:
        write_lora(Path(tmp) / "release", LoraFactors(factors, 2.0, {"r": 32, "lora_alpha": 64}))
        salt = new_salt()
        claim = Claim(commitment(key.encode(), salt), salt, structure_of(factors), weights_sha256(factors, 2.0))
        write_proof(Path(tmp) / "proof", Proof(factors, claim.key_commitment, salt, 32, claim.fields()))
        del factors
        timings = {}
        for mode in ("key", "owner"):
            start = time.perf_counter()
            suspect = Suspect.from_adapter(Path(tmp) / "release")
            if mode == "key":
                result = verify_key(suspect, key=key)
            else:
                result = verify_owner(suspect, Path(tmp) / "proof", claim.digest(), key=key)
            timings[mode] = {"seconds": time.perf_counter() - start, "modules": result.modules}
            print(f"7B-shaped {mode} verification: {timings[mode]['seconds']:.2f} s ({result.modules} modules)")
    return timings


def _attack_lines(rows: list[dict], metric: str) -> list[str]:
    clean = rows[0]["accuracy"]
    lines = [
        f"| attack | strength | {metric} | within 5% of unattacked | owner log10 p (key test, claim's ranks) "
        "| key-only log10 p (suspect alone) | passport log10 p (paper) | passport signs |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}"
        near = "-" if r["accuracy"] is None else ("yes" if r["accuracy"] >= 0.95 * clean else "no")
        lines.append(
            f"| {r['attack']} | {r['strength']} | {acc} | {near} | {r['owner_log10_p']:.1f} "
            f"| {r['key_alone_log10_p']:.1f} | {r['passport_log10_p']:.1f} | {r['passport_agreement']:.3f} |"
        )
    kept = [r for r in rows if r["accuracy"] is not None and r["accuracy"] >= 0.95 * clean]
    worst = max(kept, key=lambda r: r["owner_log10_p"])
    lines += [
        "",
        f"Largest owner log10 p among attacks that keep the {metric} within 5% (relative) of the unattacked "
        f"{100 * clean:.2f}: {worst['owner_log10_p']:.1f} ({worst['attack']}, {worst['strength']}).",
    ]
    notes = sorted({r["note"] for r in rows if r.get("note")})
    lines += [f"- {note}" for note in notes]
    return lines + [""]


def write_tables(result: dict) -> str:
    lines = []
    if "task" in result:
        runs = result["task"]["runs"]
        lines += ["Task metric (MiniLM accuracy on the stdlib-topics test split, 832 sentences):", ""]
        lines += ["| method | mean | per seed |", "|---|---:|---|"]
        means = {}
        for method in ("lora", "seal"):
            accs = [r["accuracy"] for r in runs if r["method"] == method]
            means[method] = sum(accs) / len(accs)
            lines.append(f"| {method} | {100 * means[method]:.2f} | {', '.join(f'{100 * a:.2f}' for a in accs)} |")
        lines += ["", f"SEAL - LoRA: {100 * (means['seal'] - means['lora']):+.2f} points (target: within 0.5).", ""]
    if "attacks" in result:
        lines += [
            "Attacks on the released MiniLM adapter of seed 0 (accuracy on the evaluation half of the test split, "
            f"416 sentences; owner verdict at p < 2^-64, i.e. log10 p < {math.log10(OWNER_THRESHOLD):.1f}; key-only "
            f"detection at p < {DEFAULT_THRESHOLD:g}):",
            "",
            *_attack_lines(result["attacks"], "accuracy"),
        ]
    if "smollm2" in result:
        s = result["smollm2"]
        t = s["task"]
        lines += [
            f"SmolLM2-135M-Instruct, chat task, q,v r={RANK}, {SMOL_STEPS} steps, seed 0 (exact match on "
            f"{t['test_sentences']} test sentences): LoRA {100 * t['lora']:.2f}, SEAL {100 * t['seal']:.2f} "
            f"({100 * (t['seal'] - t['lora']):+.2f} points). Attacks on the released SEAL adapter:",
            "",
            *_attack_lines(s["attacks"], "exact match"),
        ]
    if "false_positives" in result:
        fp = dict(result["false_positives"])
        refused = fp.pop("forged proofs against the owner's digest", None)
        lines += [
            "False positives (owner claims at p < 2^-64, key-only at p < 1e-6):",
            "",
            "| trials of | n | threshold | false positives | share with p > 0.01 | smallest p |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, s in fp.items():
            share, threshold = s["share_p_above_0.01"], s.get("threshold", DEFAULT_THRESHOLD)
            counts = f"{s['trials']} | {threshold:.3g} | {s['false_positives']}"
            lines.append(f"| {name} | {counts} | {share:.3f} | {s['min_p']:.2g} |")
        lines.append("")
        if refused is not None:
            lines += [
                f"Forged proofs presented against the owner's published digest: {refused['refused']} of "
                f"{refused['trials']} refused (no verdict).",
                "",
            ]
    if "claim_search" in result:
        k = result["claim_search"]
        lines += [
            f"Whole-claim search: {k['claims']:,} forged claims over the owner's release, each with its own key, "
            "module subset, names (the release's, shuffled, or invented) and ranks (1 to 16 per module) "
            f"({k['seconds']:.0f} s on 2 cores): smallest p = 10^{k['min_log10_p']:.2f} (an exact test gives about "
            f"10^{k['expected_min_log10_p']:.1f} after this many tries); {k['below_1e-3']} claims below 1e-3 "
            f"(expected at most {k['expected_below_1e-3']:.0f}); {k['below_owner_threshold']} below the owner "
            f"threshold 2^-64 (expected number {k['union_bound']:.1e}).",
            "",
        ]
    if "hostile_search" in result:
        k = result["hostile_search"]
        lines += [
            f"Hostile claims (item 2 of the SEAL forgery issue): {k['tried']:,} claims built to exploit the verifier "
            "over the owner's release, each with a forger key: the release's modules under their own names with "
            "mixed ranks (2 to 16), up to three times as many invented modules of its shapes, a shuffled order, and "
            f"in every fourth claim repeated entries ({k['seconds']:.0f} s on 2 cores). {k['refused']:,} refused "
            f"(repeated modules: no verdict); of the other {k['claims']:,}, the smallest p is "
            f"10^{k['min_log10_p']:.2f} (N x min p = {k['n_times_min_p']:.2f}; for the minimum of N uniform p-values "
            f"it is Exp(1)); {k['below_1e-3']} below 1e-3 (expected at most {k['expected_below_1e-3']:.0f}); "
            f"{k['below_owner_threshold']} below 2^-64; {k['overused']} tested more rows or modules than the claim "
            "and the suspect hold.",
            "",
        ]
    if "timing" in result:
        t = result["timing"]
        lines += [
            "Verifying a LLaMA2-7B-shaped released adapter (224 matrices, r=32, fp32, read from disk; 2 CPU "
            f"threads): key-only {t['key']['seconds']:.2f} s, owner (with proof) {t['owner']['seconds']:.2f} s "
            "(target < 5 s)."
        ]
    return "\n".join(lines).strip()


def _detection_panel(ax, rows: list[dict], title: str) -> None:
    labels = [f"{r['attack']}\n{r['strength']}" for r in rows]
    x = np.arange(len(rows))
    ax.bar(x - 0.27, [-r["owner_log10_p"] for r in rows], 0.27, label="owner (key test, claim's ranks)")
    ax.bar(x, [-r["key_alone_log10_p"] for r in rows], 0.27, label="key-only (suspect alone)")
    ax.bar(x + 0.27, [-r["passport_log10_p"] for r in rows], 0.27, label="passport (paper)")
    ax.axhline(-math.log10(OWNER_THRESHOLD), color="k", ls="--", lw=1, label="owner threshold 2^-64")
    ax.axhline(-math.log10(DEFAULT_THRESHOLD), color="k", ls=":", lw=1, label="key-only threshold 1e-6")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylabel("-log10 p")
    ax.set_xticks(x, labels, rotation=90, fontsize=6)
    twin = ax.twinx()
    twin.plot(x, [np.nan if r["accuracy"] is None else 100 * r["accuracy"] for r in rows], "ro", ms=3)
    twin.set_ylabel("task metric % (red)")
    ax.legend(fontsize=6)
    ax.set_title(title)


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(19, 5), gridspec_kw={"width_ratios": [3, 1.3, 1]})
    _detection_panel(ax1, result["attacks"], "MiniLM: detection after attacks (seed 0 release)")
    _detection_panel(ax2, result["smollm2"]["attacks"], "SmolLM2: detection after attacks")
    for name, s in result["false_positives"].items():
        if "p_values" in s:
            ax3.hist(s["p_values"], bins=20, range=(0, 1), histtype="step", density=True, label=name)
    k = result["claim_search"]
    ax3.stairs(
        np.array(k["histogram"]) * 20 / k["claims"], np.linspace(0, 1, 21), label=f"claim search ({k['claims']:,})"
    )
    if "hostile_search" in result:
        h = result["hostile_search"]
        counts = np.array(h["histogram"]) * 20 / h["claims"]
        ax3.stairs(counts, np.linspace(0, 1, 21), label=f"hostile claims ({h['claims']:,})")
    ax3.set_xlabel("p-value")
    ax3.set_ylabel("density")
    ax3.set_title("Null trials: p-values are uniform")
    ax3.legend(fontsize=6)
    save_figure(fig, path)


def part(name: str, compute: Callable[[], Any]) -> Any:
    """One part's result, computed once: kept in runs/seal_robustness/NAME.json so an interrupted run resumes."""
    file = RUNS / f"{name}.json"
    if file.exists():
        return json.loads(file.read_text())
    value = compute()
    file.write_text(json.dumps(value))
    return value


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--only", choices=["timing"], help="run one part only (results are not written)")
    cli.add_argument("--claims", type=int, default=CLAIM_SEARCH, help="claims the forger tries in the claim search")
    cli.add_argument("--hostile", type=int, default=HOSTILE_SEARCH, help="hostile claims tried (item 2)")
    args = cli.parse_args()
    torch.set_num_threads(2)
    if args.only == "timing":
        print(write_tables({"timing": llama7b_timing()}))
        return
    train_data, test_data = stdlib_topics()
    num_labels = len(train_data.label_names)
    train, test = encode(train_data, 64), encode(test_data, 64)
    order = torch.randperm(len(test["labels"]), generator=torch.Generator().manual_seed(0))
    half = len(order) // 2
    attacker = {k: v[order[:half]] for k, v in test.items()}
    evaluation = {k: v[order[half:]] for k, v in test.items()}
    root = RUNS / "work"  # the trained adapters and releases the parts share
    root.mkdir(parents=True, exist_ok=True)
    result = {"task": part("task", lambda: train_adapters(root, train, test, num_labels))}
    result["attacks"] = part("attacks", lambda: attack_table(root, attacker, evaluation, num_labels))
    result["false_positives"] = part("false_positives", lambda: false_positives(root))
    result["claim_search"] = part("claim_search", lambda: claim_search(root, args.claims))
    result["hostile_search"] = part("hostile_search", lambda: hostile_search(root, args.hostile))
    result["smollm2"] = part("smollm2", lambda: smollm2_part(root))
    result["timing"] = llama7b_timing()
    write_results(args.out, "seal_robustness", write_tables(result), result, lambda path: plot(result, path))


if __name__ == "__main__":
    main()
