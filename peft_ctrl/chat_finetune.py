"""The main job on a real chat model: fine-tune SmolLM2-135M-Instruct as a causal LM on a generative task, offline.

Task: the stdlib topics of ``peft_ctrl.datasets`` asked as a question in the model's own chat template. The system
message lists the six topics, the user message is a sentence from a docstring of Python's standard library, and the
assistant answers with the topic in words (``numbers``, ``files and OS``, ...) and ends its turn. Training is
teacher-forced with the loss on the answer tokens only; the score is exact match of the greedy answer.

Scoring without a decoding loop: greedy decoding writes the reference answer (its tokens, then the end-of-turn
token) exactly when, fed the reference answer, the model's most likely next token is the reference token at every
answer position (by induction over the positions). So one forward pass over prompt + reference scores a sentence
exactly as ``generate(do_sample=False)`` followed by exact match would. The job runs ``generate`` on the sentences it
shows and records that both agree.

Every method sees the same batches in the same order for a given seed; all methods of one seed run back to back,
so the step-time ratios compare runs made under the same machine load.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from tqdm.auto import tqdm

from ._checks import check_choice, check_int, check_probability
from .atomic import atomic_directory, atomic_file
from .datasets import TextDataset, stdlib_topics
from .finetune import check_run_settings, length_bucketed_batches, lr_at
from .metrics import SavedTensorMeter
from .state_ctrl import StateCtrlConfig

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# method id -> (table label, uses gradient checkpointing); the adapters are built by ``peft_config``.
CHAT_METHODS: dict[str, tuple[str, bool]] = {
    "state-ctrl-mlp": ("state-ctrl mlp", False),
    "state-ctrl-both": ("state-ctrl both", False),
    "lora-qv": ("PEFT LoRA q,v", False),
    "lora-all": ("PEFT LoRA all-linear", False),
    "dora": ("PEFT DoRA all-linear", False),
    "lora-all-ckpt": ("PEFT LoRA all-linear + checkpointing", True),
    "state-ctrl-mlp-ckpt": ("state-ctrl mlp + checkpointing", True),
}
REFERENCE = "lora-all"  # the ratios' denominator
REFERENCE_CKPT = "lora-all-ckpt"
# Peak learning rates from the grid in docs/finetune.md (seed 0); DoRA and every LoRA row share LoRA's.
DEFAULT_CHAT_LR = {"state-ctrl": 2e-4, "lora": 2e-3}
SYSTEM = "Topic of this Python doc sentence: networking, files and OS, numbers, text, concurrency, or dates and time?"
SHOWN = 4  # sentences whose generated answers the report shows, before and after fine-tuning


@dataclass
class ChatFinetuneArgs:
    """Settings of the SmolLM2 job (``peft-ctrl finetune``; ``quick()`` gives the smoke-run settings)."""

    methods: Sequence[str] = tuple(CHAT_METHODS)
    steps: int = 22
    seeds: Sequence[int] = (0, 1, 2)
    batch_size: int = 8
    max_length: int = 40
    eval_per_class: int = 20
    rank_state_ctrl: int = 64
    rank_lora: int = 16
    lora_dropout: float = 0.05
    lr: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_CHAT_LR))
    output_dir: str = "runs/finetune"
    results_dir: str | None = None
    save_adapters: bool = True

    def __post_init__(self) -> None:
        check_run_settings(self, tuple(CHAT_METHODS))
        check_int("max_length", self.max_length, low=4)
        check_int("eval_per_class", self.eval_per_class, low=1)
        check_int("rank_state_ctrl", self.rank_state_ctrl, low=2)
        check_int("rank_lora", self.rank_lora, low=1)
        check_probability("lora_dropout", self.lora_dropout)
        for key in ("state-ctrl", "lora"):
            if key not in self.lr:
                raise ValueError(f"lr needs a learning rate for {key!r}, got keys {sorted(self.lr)}.")

    @classmethod
    def quick(cls, **overrides: Any) -> ChatFinetuneArgs:
        """The smoke run: every method, one seed, 10 steps, 10 test sentences per topic (about 3 minutes)."""
        return cls(**{"steps": 10, "seeds": (0,), "eval_per_class": 10, **overrides})


@dataclass
class ChatExample:
    sentence: str
    answer: str
    prompt_ids: list[int]
    answer_ids: list[int]  # the answer's tokens, then the end-of-turn token


@dataclass
class ChatRunResult:
    method: str
    seed: int
    trainable_params: int
    accuracy: float
    saved_activation_bytes: int
    measured_tokens: int
    step_seconds: float
    final_loss: float
    answers: list[str]  # generated for the shown sentences
    shown_hits: list[bool]  # the one-pass score of the same sentences


def peft_config(method: str, args: ChatFinetuneArgs):
    """The adapter of one method. state-ctrl both uses half the rank of mlp, so both have the same parameters."""
    check_choice("method", method, tuple(CHAT_METHODS))
    if method.startswith("state-ctrl"):
        both = method == "state-ctrl-both"
        r = args.rank_state_ctrl // 2 if both else args.rank_state_ctrl
        return StateCtrlConfig(r=r, blocks="both" if both else "mlp", task_type="CAUSAL_LM")
    return LoraConfig(
        r=args.rank_lora,
        lora_alpha=2 * args.rank_lora,
        lora_dropout=args.lora_dropout,
        target_modules=["q_proj", "v_proj"] if method == "lora-qv" else ALL_LINEAR,
        use_dora=method == "dora",
        task_type="CAUSAL_LM",
    )


def method_lr(method: str, args: ChatFinetuneArgs) -> float:
    return args.lr["state-ctrl" if method.startswith("state-ctrl") else "lora"]


def chat_examples(data: TextDataset, tokenizer: Any, max_length: int) -> list[ChatExample]:
    """Each sentence (cut to ``max_length`` tokens) as a chat: system = the question, user = the sentence,
    assistant = the topic. The prompt ends with the template's assistant header (``add_generation_prompt``)."""
    end = tokenizer.eos_token_id
    out = []
    for text, label in zip(data.texts, data.labels, strict=True):
        sentence = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:max_length])
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": sentence}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        answer = data.label_names[label]
        out.append(
            ChatExample(
                sentence=sentence,
                answer=answer,
                prompt_ids=tokenizer(prompt, add_special_tokens=False)["input_ids"],
                answer_ids=tokenizer(answer, add_special_tokens=False)["input_ids"] + [end],
            )
        )
    return out


def balanced_subset(examples: list[ChatExample], per_class: int) -> list[ChatExample]:
    """``per_class`` examples of each answer, picked by a hash of the sentence (the same on every run and seed)."""
    ordered = sorted(examples, key=lambda e: hashlib.sha256(e.sentence.encode()).digest())
    out: list[ChatExample] = []
    for answer in dict.fromkeys(e.answer for e in examples):
        out += [e for e in ordered if e.answer == answer][:per_class]
    return out


def collate(examples: Sequence[ChatExample], pad_id: int, with_answers: bool = True) -> dict[str, torch.Tensor]:
    """Left-padded batch (so every answer ends at the last position) with explicit position ids (so padding does
    not shift positions), and ``targets``: the last k tokens, -100 where a shorter answer leaves prompt tokens."""
    seqs = [e.prompt_ids + (e.answer_ids if with_answers else []) for e in examples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, width - len(seq) :] = torch.tensor(seq)
        mask[i, width - len(seq) :] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
    if with_answers:
        k = max(len(e.answer_ids) for e in examples)
        targets = torch.full((len(seqs), k), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            targets[i, k - len(e.answer_ids) :] = torch.tensor(e.answer_ids)
        batch["targets"] = targets
    return batch


def answer_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits that predict the last k tokens of the batch (k = ``targets``' width), computed for those positions
    only (``logits_to_keep``): the 49k-word vocabulary projection is not run, nor kept, for the prompt."""
    k = batch["targets"].shape[1]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=k + 1,
    )
    return out.logits[:, :-1]


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = answer_logits(model, batch)
    return F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)


@torch.no_grad()
def greedy_hits(model: nn.Module, examples: Sequence[ChatExample], pad_id: int, batch_size: int = 32) -> list[bool]:
    """For each example, whether the greedy answer is exactly the reference (see the module docstring)."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    hits = [False] * len(examples)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([examples[i] for i in chunk], pad_id)
        targets = batch["targets"]
        predicted = answer_logits(model, batch).argmax(-1)
        for i, hit in zip(chunk, ((predicted == targets) | (targets == -100)).all(1).tolist(), strict=True):
            hits[i] = hit
    return hits


@torch.no_grad()
def generate_answers(
    model: nn.Module, tokenizer: Any, examples: Sequence[ChatExample], max_new_tokens: int
) -> list[str]:
    """Greedy answers from ``generate``: the text before the end-of-turn token, or the text so far followed by
    ``...`` when the model did not end its turn within ``max_new_tokens``."""
    model.eval()
    batch = collate(examples, tokenizer.pad_token_id, with_answers=False)
    out = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    answers = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        ended = tokenizer.eos_token_id in row
        text = tokenizer.decode(row[: row.index(tokenizer.eos_token_id)] if ended else row, skip_special_tokens=True)
        answers.append(text.strip() if ended else text.strip() + " ...")
    return answers


def build_model(method: str, args: ChatFinetuneArgs, seed: int) -> tuple[nn.Module, Any]:
    from .models import load_smollm2

    base, tokenizer = load_smollm2()
    if CHAT_METHODS[method][1]:
        # Non-reentrant checkpointing of every decoder layer: no input-gradient trick needed for frozen embeddings.
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)
    return get_peft_model(base, peft_config(method, args)), tokenizer


@dataclass
class ChatTask:
    train: list[ChatExample]
    test: list[ChatExample]
    shown: list[ChatExample]
    pad_id: int
    max_new_tokens: int


def prepare_task(tokenizer: Any, args: ChatFinetuneArgs) -> ChatTask:
    train_data, test_data = stdlib_topics()
    train = chat_examples(train_data, tokenizer, args.max_length)
    test = balanced_subset(chat_examples(test_data, tokenizer, args.max_length), args.eval_per_class)
    shown = balanced_subset(test, 1)[:SHOWN]
    # One token more than the longest answer: an answer that does not end its turn there is wrong anyway.
    longest = max(len(e.answer_ids) for e in train + test)
    return ChatTask(train, test, shown, tokenizer.pad_token_id, longest + 1)


def train_one_chat(method: str, seed: int, args: ChatFinetuneArgs, task: ChatTask) -> ChatRunResult:
    model, tokenizer = build_model(method, args, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    lr = method_lr(method, args)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    lengths = torch.tensor([len(e.prompt_ids) + len(e.answer_ids) for e in task.train])
    batches = length_bucketed_batches(lengths, args.batch_size, args.steps, seed)
    times, losses, saved, tokens = [], [], 0, 0
    model.train()
    bar = tqdm(batches, desc=f"{method} seed {seed}", leave=False, dynamic_ncols=True)
    for step, idx in enumerate(bar):
        batch = collate([task.train[i] for i in idx.tolist()], task.pad_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, lr)
        start = time.perf_counter()
        if step == 0:  # the same first batch for every method of a seed
            with SavedTensorMeter(exclude=model) as meter:
                loss = answer_loss(model, batch)
                loss.backward()
            saved, tokens = meter.total_bytes, int(batch["attention_mask"].numel())
            start = time.perf_counter()  # the meter's own work is not step time; step 0 is dropped below anyway
        else:
            loss = answer_loss(model, batch)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{statistics.fmean(losses[-10:]):.3f}")
    accuracy = statistics.fmean(greedy_hits(model, task.test, task.pad_id))
    answers = generate_answers(model, tokenizer, task.shown, task.max_new_tokens)
    shown_hits = greedy_hits(model, task.shown, task.pad_id)
    if args.save_adapters:
        with atomic_directory(Path(args.output_dir) / "smollm2" / method / f"seed{seed}") as folder:
            model.save_pretrained(folder)
    steady = times[2:] if len(times) > 4 else times  # the first steps warm up allocator and kernels
    return ChatRunResult(
        method=method,
        seed=seed,
        trainable_params=trainable,
        accuracy=accuracy,
        saved_activation_bytes=saved,
        measured_tokens=tokens,
        step_seconds=statistics.median(steady),
        final_loss=statistics.fmean(losses[-10:]),
        answers=answers,
        shown_hits=shown_hits,
    )


def run_chat_finetune(args: ChatFinetuneArgs) -> dict[str, Any]:
    """Run every method and seed and return the report (``write_report`` writes it)."""
    from .models import load_smollm2

    started = time.perf_counter()
    base, tokenizer = load_smollm2()
    task = prepare_task(tokenizer, args)
    print(
        f"task: stdlib topics as chat, {len(task.train)} train sentences, {len(task.test)} test sentences "
        f"({args.eval_per_class} per topic); model: SmolLM2-135M-Instruct; {args.steps} steps x batch "
        f"{args.batch_size}; seeds {list(args.seeds)}"
    )
    before = {
        "accuracy": statistics.fmean(greedy_hits(base, task.test, task.pad_id)),
        "answers": generate_answers(base, tokenizer, task.shown, task.max_new_tokens),
    }
    del base
    results: list[ChatRunResult] = []
    runs = [(m, s) for s in args.seeds for m in args.methods]
    for method, seed in tqdm(runs, desc="runs", dynamic_ncols=True):
        results.append(train_one_chat(method, seed, args, task))
    # generate() and the one-pass score must agree on the shown sentences (module docstring).
    disagreements = [
        {"method": r.method, "seed": r.seed, "sentence": e.sentence, "generated": text}
        for r in results
        for e, text, hit in zip(task.shown, r.answers, r.shown_hits, strict=True)
        if (text == e.answer) != hit
    ]
    return {
        "command": "peft-ctrl finetune",
        "args": {**asdict(args), "methods": list(args.methods), "seeds": list(args.seeds)},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "date": date.today().isoformat(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "task": {"train": len(task.train), "test": len(task.test), "system": SYSTEM},
        "shown": [{"sentence": e.sentence, "reference": e.answer} for e in task.shown],
        "before": before,
        "runs": [asdict(r) for r in results],
        "generate_disagreements": disagreements,
    }


def _by_method(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for run in report["runs"]:
        out.setdefault(run["method"], []).append(run)
    return out


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method: accuracy mean/std over seeds, bytes and median step time, and their ratios to PEFT
    LoRA all-linear (and to it with checkpointing) when those ran."""
    groups = _by_method(report)
    median_step = {m: statistics.median(r["step_seconds"] for r in runs) for m, runs in groups.items()}
    rows = []
    for method, runs in groups.items():
        accs = [100 * r["accuracy"] for r in runs]
        row = {
            "method": method,
            "label": CHAT_METHODS[method][0],
            "trainable_params": runs[0]["trainable_params"],
            "accuracy": accs,
            "accuracy_mean": statistics.fmean(accs),
            "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "saved_bytes": runs[0]["saved_activation_bytes"],
            "step_seconds": median_step[method],
        }
        if REFERENCE in groups:
            row["bytes_x_lora"] = row["saved_bytes"] / groups[REFERENCE][0]["saved_activation_bytes"]
            row["time_x_lora"] = row["step_seconds"] / median_step[REFERENCE]
        if REFERENCE_CKPT in groups:
            row["time_x_lora_ckpt"] = row["step_seconds"] / median_step[REFERENCE_CKPT]
        rows.append(row)
    return rows


def summary_table(report: dict[str, Any]) -> str:
    rows = summary_rows(report)
    ratios = [("bytes x LoRA all-linear", "bytes_x_lora"), ("time x LoRA all-linear", "time_x_lora")]
    ratios += [("time x LoRA+ckpt", "time_x_lora_ckpt")]
    ratios = [(name, key) for name, key in ratios if key in rows[0]]
    head = ["method", "trainable params", "exact match % (mean ± std)", "saved MiB", "step s"]
    lines = [
        "| " + " | ".join(head + [n for n, _ in ratios]) + " |",
        "|---|" + "---:|" * (len(head) - 1 + len(ratios)),
    ]
    lines.append(
        f"| SmolLM2 without fine-tuning | 0 | {100 * report['before']['accuracy']:.1f} | | |" + " |" * len(ratios)
    )
    for row in rows:
        each = ", ".join(f"{a:.1f}" for a in row["accuracy"])
        cells = [
            row["label"],
            f"{row['trainable_params']:,}",
            f"{row['accuracy_mean']:.1f} ± {row['accuracy_std']:.1f} ({each})",
            f"{row['saved_bytes'] / 2**20:.1f}",
            f"{row['step_seconds']:.3f}",
        ] + [f"{row[key]:.3f}" for _, key in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def answers_table(report: dict[str, Any]) -> str:
    """Generated answers to the shown sentences: the base model, then each method's first seed."""
    groups = _by_method(report)
    head = ["sentence", "reference", "before"] + [CHAT_METHODS[m][0] for m in groups]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for i, shown in enumerate(report["shown"]):
        cells = [shown["sentence"], shown["reference"], report["before"]["answers"][i]]
        cells += [runs[0]["answers"][i] for runs in groups.values()]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def report_markdown(report: dict[str, Any]) -> str:
    args = report["args"]
    tokens = report["runs"][0]["measured_tokens"]
    return (
        f"Command: `{report['command']}` ({args['steps']} steps x {args['batch_size']} chats, seeds "
        f"{' '.join(map(str, args['seeds']))}, {report['task']['test']} test sentences), {report['machine']}, "
        f"{report['date']}, {report['wall_seconds'] / 60:.1f} minutes in all.\n\n"
        f"{summary_table(report)}\n\n"
        f"Saved bytes: the first training step of seed {args['seeds'][0]} (the same {tokens} padded tokens for every "
        f"method), peak under checkpointing. Step time: median over steps and seeds.\n\n"
        f"Greedy answers generated for a few test sentences (first seed), before and after fine-tuning:\n\n"
        f"{answers_table(report)}\n"
    )


def bar_charts(
    path: str | os.PathLike,
    labels: list[str],
    colors: list[str],
    panels: list[tuple[str, list[float], list[float] | None]],
    title: str,
    figsize: tuple[float, float],
) -> bool:
    """One horizontal bar chart per ``(title, values, errors)`` panel, side by side and sharing the row labels,
    written atomically as a PNG; False if matplotlib is missing. Both SmolLM2 jobs plot their reports with it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=figsize)
    for ax, (name, values, errors) in zip(axes, panels, strict=True):
        ax.barh(labels, values, xerr=errors, color=colors)
        ax.invert_yaxis()
        ax.set_title(name)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def plot_labels(rows: list[dict[str, Any]]) -> list[str]:
    """Row labels shortened for a chart's axis."""
    return [r["label"].replace("PEFT ", "").replace(" + checkpointing", "\n+ ckpt") for r in rows]


def plot(report: dict[str, Any], path: Path) -> bool:
    """Accuracy, saved bytes and step time per method, as three bar charts; False if matplotlib is missing."""
    rows = summary_rows(report)
    colors = ["tab:blue" if r["method"].startswith("state-ctrl") else "tab:gray" for r in rows]
    panels = [
        (
            "exact match % (mean ± std over seeds)",
            [r["accuracy_mean"] for r in rows],
            [r["accuracy_std"] for r in rows],
        ),
        ("saved for backward, MiB (first step)", [r["saved_bytes"] / 2**20 for r in rows], None),
        ("median step time, s", [r["step_seconds"] for r in rows], None),
    ]
    title = "SmolLM2-135M-Instruct, stdlib topics as chat (state-ctrl in blue)"
    return bar_charts(path, plot_labels(rows), colors, panels, title, (15, 4.5))


def write_report(report: dict[str, Any], folder: str | os.PathLike) -> list[Path]:
    """``finetune_smollm2.json``, ``.md`` and ``.png`` (when matplotlib is installed) in ``folder``."""
    folder = Path(folder)
    written = []
    for name, text in [
        ("finetune_smollm2.json", json.dumps(report, indent=2) + "\n"),
        ("finetune_smollm2.md", report_markdown(report)),
    ]:
        with atomic_file(folder / name) as tmp:
            tmp.write_text(text)
        written.append(folder / name)
    if plot(report, folder / "finetune_smollm2.png"):
        written.append(folder / "finetune_smollm2.png")
    return written
