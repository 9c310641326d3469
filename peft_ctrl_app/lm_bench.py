"""Method comparison on a causal LM: ``peft-ctrl bench TASK`` and ``peft-ctrl finetune`` (the README's main job).

In the spirit of upstream peft's ``method_comparison``: an experiment is data, a method of ``METHODS`` (an adapter
config and its training settings) on a task of ``TASKS`` (``peft_ctrl_app.tasks``) at one seed, and one runner trains
and scores any of them. Each finished experiment writes one JSON file (``RESULTS/SPLIT/METHOD__seedN.json``) and a
run skips the experiments whose file exists, so an interrupted comparison resumes where it stopped.

Protocol (the commonsense task; the stdlib task differs only in its data, a system message and scoring through
the end-of-turn token, ``peft_ctrl_app.tasks``). SmolLM2-135M-Instruct is fine-tuned on the shuffled mixture of the
train splits of BoolQ, ARC-Easy, ARC-Challenge and OpenBookQA (``peft_ctrl_app.commonsense``), each question asked as
a user turn of the model's chat template and answered with the reference response (``the correct answer is X``,
then the end-of-turn token); the loss is on the response only. A fixed part of every train split
(``validation_items`` per task, picked by hash) is held out as the validation split, on which learning rates and
ablations are chosen; the test splits are never used for that. Scoring: for each question, the response with each
answer option (``the correct answer is answer1``, ``... answer2``, ...) and the option whose response the model
gives the highest likelihood is the model's answer. The responses share their first tokens and, for these four
tasks, differ in one last token, so one teacher-forced pass over the question and the shared part gives every
option's likelihood (options of several tokens are scored by one pass each, summing their tokens'
log-probabilities). Training and scoring run under bf16 autocast on CPU (fp32 weights and adapters), the same for
every method.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from peft_ctrl._checks import check_choice, check_float, check_int
from peft_ctrl.atomic import atomic_directory, atomic_file
from peft_ctrl.optim import bridge_input_rms, depth_scaled_param_groups
from peft_ctrl.optim.odelora import SCHEMES
from peft_ctrl.state_ctrl import StateCtrlConfig
from trainer_callbacks import (
    AdaLoRACallback,
    MemoryReportCallback,
    ODELoRATrainer,
    StepTimeCallback,
    SubLoRACallback,
)

from .commonsense import TASKS as COMMONSENSE_TASKS
from .commonsense import Item, in_words, read_items, split_validation, subset
from .tasks import Task, cloze, commonsense_items, stdlib_items
from .trainer_setup import ChatCollator, ChatDataset, in_batch_order, job_arguments, quiet_progress, step_losses
from .training import ALL_LINEAR, ChatExample, chat_example, left_padded, prompt_ids

QKV = ["q_proj", "k_proj", "v_proj"]


@dataclass(frozen=True)
class Method:
    """One row of the comparison: the adapter (``kind`` + ``options``), its learning rate and training switches.

    ``kind``: ``lora`` (peft ``LoraConfig``), ``adalora`` (peft ``AdaLoraConfig``), ``state-ctrl``, ``seal`` or
    ``sublora`` (this package's configs). ``optimizer``: ``adamw`` or ``odelora-SCHEME`` (``create_odelora_optimizer``,
    run for ``steps / evaluations per step`` steps so every row spends the same gradient evaluations).
    """

    label: str
    kind: str
    options: dict[str, Any]
    lr: float
    checkpointing: bool = False
    depth_lr: bool = False  # bridges at lr / RMS(h) (peft_ctrl.optim.depth_lr)
    optimizer: str = "adamw"
    # (reference, twin): train for the reference's wall-clock time, i.e. steps x (reference's median step time /
    # twin's), both measured at the same seed in this run (the twin is this row at the fixed number of steps)
    same_time_as: tuple[str, str] | None = None


LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
CONTROL_LORA = {
    "r": 64,
    "blocks": "mlp",
    "lora_target_modules": QKV,
    "lora_r": 32,
    "lora_alpha": 64.0,
    "lora_dropout": 0.05,
}
# AdaLoRA and SubLoRA: 12 components per module at the start, 8 on average at the end, on every linear.
BUDGETED = {"lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ALL_LINEAR}
# Learning rates: the validation grid and ablation of docs/commonsense.md (benchmarks/commonsense_grid.py, seed 0,
# lowest option NLL): 1e-3 for LoRA all-linear (every LoRA-family row) and for state-ctrl mlp with one lr (every row
# with bridges); depth-scaled learning rates did worse than one lr there, so they are an ablation row, not the default.
# ODELoRA's step is on another scale: 3e-2 from its own grid (--groups odelora; 0.1 and above diverge).
METHODS: dict[str, Method] = {
    "base": Method("SmolLM2 without fine-tuning", "none", {}, 0.0),
    "lora-all": Method("PEFT LoRA all-linear", "lora", {**LORA, "target_modules": ALL_LINEAR}, 1e-3),
    "lora-qkv": Method("PEFT LoRA q,k,v", "lora", {**LORA, "target_modules": QKV}, 1e-3),
    "dora": Method("PEFT DoRA all-linear", "lora", {**LORA, "target_modules": ALL_LINEAR, "use_dora": True}, 1e-3),
    "lora-all-ckpt": Method(
        "PEFT LoRA all-linear + checkpointing", "lora", {**LORA, "target_modules": ALL_LINEAR}, 1e-3, True
    ),
    "state-ctrl-mlp": Method("state-ctrl mlp", "state-ctrl", {"r": 64, "blocks": "mlp"}, 1e-3),
    "state-ctrl-both": Method("state-ctrl both", "state-ctrl", {"r": 32, "blocks": "both"}, 1e-3),
    "control-lora": Method("Control+LoRA (mlp bridge + LoRA q,k,v)", "state-ctrl", CONTROL_LORA, 1e-3),
    "state-ctrl-mlp-same-time": Method(
        "state-ctrl mlp at LoRA all-linear's wall-clock time",
        "state-ctrl",
        {"r": 64, "blocks": "mlp"},
        1e-3,
        same_time_as=("lora-all", "state-ctrl-mlp"),
    ),
    "seal-qkv": Method("SEAL q,k,v (twin of LoRA q,k,v)", "seal", {**LORA, "target_modules": QKV}, 1e-3),
    "adalora": Method("PEFT AdaLoRA all-linear 12 -> 8", "adalora", {**BUDGETED, "init_r": 12, "target_r": 8}, 1e-3),
    # SubLoRA's default block curvature needs double backward through the model: over 3.5 minutes per allocation on
    # SmolLM2 on 2 CPU cores, six allocations. The Fisher estimate (per-example gradients) keeps the row in minutes.
    "sublora": Method(
        "SubLoRA all-linear 12 -> 8 (Fisher curvature)",
        "sublora",
        {**BUDGETED, "r": 12, "target_r": 8, "hessian": "fisher"},
        1e-3,
    ),
    "odelora": Method(
        "ODELoRA (Euler) on LoRA all-linear",
        "lora",
        {**LORA, "target_modules": ALL_LINEAR},
        3e-2,
        optimizer="odelora-euler",
    ),
    # Ablation rows (validation split): a state-ctrl row with one thing changed, here depth-scaled learning rates
    # (each bridge at lr / RMS of the state it reads, peft_ctrl.optim.depth_lr) and the rank.
    "state-ctrl-mlp-depth-lr": Method(
        "state-ctrl mlp, depth-scaled lr", "state-ctrl", {"r": 64, "blocks": "mlp"}, 3e-3, depth_lr=True
    ),
    "state-ctrl-mlp-r16": Method("state-ctrl mlp r=16, depth-scaled lr", "state-ctrl", {"r": 16}, 1e-3, depth_lr=True),
    "state-ctrl-both-depth-lr": Method(
        "state-ctrl both, depth-scaled lr", "state-ctrl", {"r": 32, "blocks": "both"}, 1e-3, depth_lr=True
    ),
    "control-lora-depth-lr": Method("Control+LoRA, depth-scaled lr", "state-ctrl", CONTROL_LORA, 1e-3, depth_lr=True),
    # Cloze-form ablation: the bridge reads the MLP's input, the normed state, instead of the residual stream h
    # (whose RMS grows from 0.14 to about 100 with depth), via custom bridges (head = tail = mlp), which the
    # placement probe would refuse as not reading the residual state, so it is skipped on purpose; the rank; and
    # LoRA's dropout on the bridge input.
    "state-ctrl-mlp-normed": Method(
        "state-ctrl mlp reading the normed state",
        "state-ctrl",
        {"r": 64, "bridges": [("mlp", "mlp")], "check_placement": False},
        1e-3,
    ),
    "state-ctrl-mlp-r128": Method("state-ctrl mlp r=128", "state-ctrl", {"r": 128, "blocks": "mlp"}, 1e-3),
    "state-ctrl-mlp-dropout": Method(
        "state-ctrl mlp, dropout 0.05", "state-ctrl", {"r": 64, "blocks": "mlp", "dropout": 0.05}, 1e-3
    ),
}
REFERENCE = "lora-all"
MAIN_JOB = ("lora-all", "lora-qkv", "state-ctrl-mlp", "control-lora")
HEADLINE = (
    "base",
    "lora-all",
    "lora-qkv",
    "dora",
    "lora-all-ckpt",
    "state-ctrl-mlp",
    "state-ctrl-both",
    "control-lora",
    "state-ctrl-mlp-same-time",
)
# the project's other methods, each beside its twin: SEAL beside LoRA q,k,v, SubLoRA beside AdaLoRA, ODELoRA beside
# LoRA all-linear (AdamW)
OTHERS = ("lora-all", "lora-qkv", "seal-qkv", "adalora", "sublora", "odelora")
ABLATION = ("state-ctrl-mlp", "state-ctrl-mlp-depth-lr", "state-ctrl-mlp-r16", "state-ctrl-both-depth-lr")
ABLATION += ("control-lora-depth-lr",)
STDLIB_JOB = ("lora-all", "lora-qkv", "dora", "lora-all-ckpt", "state-ctrl-mlp", "state-ctrl-both")
# The cloze form's table: the headline rows whose accuracy can differ (checkpointing gives LoRA all-linear's answers
# exactly and DoRA takes 1.8x its step time: both keep their figures in the label form's table), plus the cloze
# ablation's best candidate (docs/commonsense.md#the-cloze-form).
CLOZE_HEADLINE = (
    "base",
    "lora-all",
    "lora-qkv",
    "state-ctrl-mlp",
    "state-ctrl-both",
    "control-lora",
    "state-ctrl-mlp-dropout",
    "state-ctrl-mlp-same-time",
)


def _commonsense(form_name: str, form: Callable[[Item], Item] | None = None) -> Task:
    """The commonsense suite in one form: the main job's rows, seed 0, 60 steps; forms in words are scored through
    the end-of-turn token (their options differ in length)."""
    title = f"commonsense{form_name} (BoolQ, ARC-e, ARC-c, OBQA)"
    in_words_form = form is not None
    return Task(title, COMMONSENSE_TASKS, commonsense_items, MAIN_JOB, (0,), 60, end_of_turn=in_words_form, form=form)


TASKS: dict[str, Task] = {
    "commonsense": _commonsense(""),
    # The same questions in the cloze form: the question alone, answered with the option's words and scored through
    # the end-of-turn token (docs/commonsense.md#the-cloze-form). SmolLM2-135M is above chance on ARC in this form,
    # and at chance in the label form above, so this is the form in which the rows' accuracies can differ.
    "commonsense-cloze": _commonsense(", cloze form", cloze),
    # The options listed as in the label form, answered with the option's words: the middle form, measured against
    # the other two on the validation split (docs/commonsense.md#the-cloze-form).
    "commonsense-listed": _commonsense(", options listed, answered in words", in_words),
    # The stdlib topics as a chat question. Its validation grid (benchmarks/commonsense_grid.py --task stdlib, 22
    # steps, seed 0, docs/finetune.md) picks the rows' own 1e-3 for LoRA all-linear and state-ctrl mlp.
    "stdlib": Task(
        "stdlib topics as chat",
        ("stdlib",),
        stdlib_items,
        main_methods=STDLIB_JOB,
        main_seeds=(0, 1, 2),
        steps=22,
        end_of_turn=True,
    ),
}


@dataclass
class BenchArgs:
    """Settings of ``peft-ctrl bench TASK``; ``main_job(task)`` gives ``peft-ctrl finetune``'s (for commonsense the
    README's 20-minute subset)."""

    task: str = "commonsense"
    methods: Sequence[str] = HEADLINE
    seeds: Sequence[int] = (0, 1, 2)
    steps: int = 60
    batch_size: int = 8
    split: str = "test"  # "test" or "validation"
    eval_items: int | None = 150  # per task; None = the whole split
    validation_items: int = 100  # per task, carved from train
    max_tokens: int = 256  # training examples longer than this (prompt + response) are left out
    lr: dict[str, float] = field(default_factory=dict)  # per-method overrides of METHODS' lr
    results_dir: str | None = None  # default runs/TASK
    save_adapters: str | None = None
    bf16: bool = True
    eval_every: int | None = None  # also score every N steps (the record's "curve"); None: at the end only

    def __post_init__(self) -> None:
        check_choice("task", self.task, tuple(TASKS))
        if self.results_dir is None:
            self.results_dir = f"runs/{self.task}"
        if not self.methods:
            raise ValueError(f"methods is empty; choose from {list(METHODS)}.")
        for method in (*self.methods, *self.lr):
            check_choice("method", method, tuple(METHODS))
        if not self.seeds:
            raise ValueError("Give at least one seed.")
        for seed in self.seeds:
            check_int("seed", seed, low=0)
        check_int("steps", self.steps, low=1)
        check_int("batch_size", self.batch_size, low=1)
        check_choice("split", self.split, ("test", "validation"))
        if self.eval_items is not None:
            check_int("eval_items", self.eval_items, low=1)
        check_int("validation_items", self.validation_items, low=1)
        check_int("max_tokens", self.max_tokens, low=16)
        if self.eval_every is not None:
            check_int("eval_every", self.eval_every, low=1)
        for key, value in self.lr.items():
            check_float(f"lr[{key!r}]", value, 0.0, low_open=True)

    @classmethod
    def main_job(cls, task: str = "commonsense", **overrides: Any) -> BenchArgs:
        """``peft-ctrl finetune --task TASK``: the task's main rows, seeds and steps. For commonsense (the README's
        main job): 4 rows (LoRA all-linear and q,k,v, state-ctrl mlp, Control+LoRA) at seed 0 with the full
        comparison's settings, so its results are that comparison's seed-0 experiments (about 11 minutes on 2
        cores)."""
        check_choice("task", task, tuple(TASKS))
        spec = TASKS[task]
        defaults = {"methods": spec.main_methods, "seeds": spec.main_seeds, "steps": spec.steps}
        return cls(**{"task": task, **defaults, **overrides})

    def lr_of(self, method: str) -> float:
        """The flag's lr, else the method's own."""
        return self.lr.get(method, METHODS[method].lr)


# ---------------------------------------------------------------- data


@dataclass
class Query:
    """One scoring pass: ``input_ids`` and, per option index, the option's remaining tokens (their targets)."""

    input_ids: list[int]
    targets: dict[int, list[int]]


@dataclass
class Scored:
    item: Item
    queries: list[Query]


def scored_item(tokenizer: Any, item: Item, end_of_turn: bool = False) -> Scored:
    """The passes that score every option of ``item``: the prompt plus the options' shared first tokens, then
    each option's remaining tokens (and the end-of-turn token with ``end_of_turn``) as targets. Options that differ
    in one last token share one pass. Raises ``ValueError`` when two options are the same (no answer can win)."""
    if len(set(item.options)) < len(item.options):
        raise ValueError(f"{item.task}: two options are the same, so the item cannot be scored: {item.options}")
    prompt = prompt_ids(tokenizer, item.instruction, item.system)
    end = [tokenizer.eos_token_id] if end_of_turn else []
    responses = [tokenizer(item.response(o), add_special_tokens=False)["input_ids"] + end for o in item.options]
    shared = 0
    while all(len(r) > shared + 1 for r in responses) and len({r[shared] for r in responses}) == 1:
        shared += 1
    queries: dict[tuple[int, ...], Query] = {}
    for index, response in enumerate(responses):
        rest = response[shared:]
        ids = tuple(prompt + response[: shared + len(rest) - 1])
        queries.setdefault(ids, Query(list(ids), {})).targets[index] = rest
    return Scored(item, list(queries.values()))


@dataclass
class BenchData:
    train: list[ChatExample]
    evaluation: dict[str, list[Scored]]  # task -> items of the scored split
    dropped_long: int


def load_data(tokenizer: Any, args: BenchArgs, test_files: Sequence[str | os.PathLike] = ()) -> BenchData:
    """The train mixture of ``args.task``'s subtasks (validation items held out) and the scored items of
    ``args.split`` per subtask; with ``test_files``, those files are scored instead of the test splits."""
    spec = TASKS[args.task]
    train: list[ChatExample] = []
    validation: dict[str, list[Item]] = {}
    for task in spec.subtasks:
        kept, held = split_validation(spec.load(task, "train", tokenizer), args.validation_items)
        validation[task] = held
        train += [chat_example(tokenizer, it) for it in spec.prepare(kept)]
    fits = [e for e in train if len(e.prompt_ids) + len(e.answer_ids) <= args.max_tokens]
    if test_files:
        scored = {}
        for file in test_files:
            items = read_items(file)
            scored[items[0].task] = items
    elif args.split == "validation":
        scored = validation
    else:
        scored = {task: spec.load(task, "test", tokenizer) for task in spec.subtasks}
    evaluation = {
        task: [scored_item(tokenizer, it, spec.end_of_turn) for it in spec.prepare(subset(items, args.eval_items))]
        for task, items in scored.items()
    }
    return BenchData(fits, evaluation, len(train) - len(fits))


# ---------------------------------------------------------------- scoring


@torch.no_grad()
def option_scores(
    model: nn.Module, items: Sequence[Scored], pad_id: int, bf16: bool, batch_size: int = 32
) -> list[dict[int, float]]:
    """Per item, the log-likelihood of each option's remaining tokens (option index -> log-probability) given
    the question and the options' shared first tokens (see the module docstring)."""
    model.eval()
    jobs = [(i, q) for i, scored in enumerate(items) for q in scored.queries]
    jobs.sort(key=lambda job: len(job[1].input_ids))
    scores: list[dict[int, float]] = [{} for _ in items]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        k = max(len(t) for _, q in chunk for t in q.targets.values())
        batch = left_padded([q.input_ids for _, q in chunk], pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(**batch, logits_to_keep=k).logits
        logp = logits.float().log_softmax(-1)
        for row, (i, query) in enumerate(chunk):
            for option, target in query.targets.items():
                positions = logp[row, k - len(target) :]
                scores[i][option] = positions.gather(1, torch.tensor(target)[:, None]).sum().item()
    return scores


def option_choices(
    model: nn.Module, items: Sequence[Scored], pad_id: int, bf16: bool, batch_size: int = 32
) -> list[int]:
    """The option index each item's most likely response picks."""
    return [max(s, key=s.get) for s in option_scores(model, items, pad_id, bf16, batch_size)]


def evaluate(
    model: nn.Module, data: BenchData, pad_id: int, bf16: bool
) -> tuple[dict[str, list[int]], dict[str, float]]:
    """Per task: the hits (1 where the model's choice is the reference answer, else 0, in item order) and the mean
    option NLL, ``-log softmax(option log-likelihoods)[reference]`` (nats; log(options) at chance, 0 when sure and
    right). The NLL moves before accuracy does, so it separates methods that accuracy still ties."""
    hits, nll = {}, {}
    for task, items in data.evaluation.items():
        scores = option_scores(model, items, pad_id, bf16)
        hits[task], losses = [], []
        for scored, by_option in zip(items, scores, strict=True):
            answer = scored.item.options.index(scored.item.answer)
            hits[task].append(int(max(by_option, key=by_option.get) == answer))
            values = torch.tensor([by_option[o] for o in range(len(scored.item.options))], dtype=torch.float64)
            losses.append(float(torch.logsumexp(values, 0) - values[answer]))
        nll[task] = statistics.fmean(losses)
    return hits, nll


# ---------------------------------------------------------------- one experiment


def peft_config(method: str, steps: int) -> Any:
    """The adapter config of ``method``; AdaLoRA's and SubLoRA's schedules are set from ``steps``: all
    components for the first fifth, the budget reached at three quarters, allocations every tenth."""
    spec = METHODS[method]
    if spec.kind == "state-ctrl":
        return StateCtrlConfig(task_type="CAUSAL_LM", **spec.options)
    if spec.kind == "seal":
        from peft_ctrl.seal import SealConfig

        return SealConfig(task_type="CAUSAL_LM", **spec.options)
    schedule = {"total_step": steps}
    t_init, t_final, delta_t = steps // 5, steps // 4, max(1, steps // 10)
    if spec.kind == "adalora":
        from peft import AdaLoraConfig

        return AdaLoraConfig(
            task_type="CAUSAL_LM", tinit=t_init, tfinal=t_final, deltaT=delta_t, **schedule, **spec.options
        )
    if spec.kind == "sublora":
        from peft_ctrl.sublora import SubLoRAConfig

        return SubLoRAConfig(
            task_type="CAUSAL_LM", t_init=t_init, t_final=t_final, delta_t=delta_t, **schedule, **spec.options
        )
    return LoraConfig(task_type="CAUSAL_LM", **spec.options)


def adapter_bytes(model: PeftModel) -> int:
    """Size on disk of the saved adapter (every file ``save_pretrained`` writes)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())


def _task_means(hits: dict[str, list[int]]) -> dict[str, float]:
    return {task: statistics.fmean(h) for task, h in hits.items()}


class _Curve(TrainerCallback):
    """Scores the model every ``every`` steps during training (the record's ``curve``)."""

    def __init__(self, every: int | None, data: BenchData, pad: int, bf16: bool) -> None:
        self.every, self.data, self.pad, self.bf16 = every, data, pad, bf16
        self.points: list[dict[str, Any]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        step = state.global_step
        if self.every and step % self.every == 0 and step < state.max_steps:
            scored, nll = evaluate(model, self.data, self.pad, self.bf16)
            self.points.append({"step": step, "accuracy": _task_means(scored), "option_nll": nll})
            model.train()


def _trainer(
    method: str, model: nn.Module, args: BenchArgs, data: BenchData, seed: int, steps: int, output_dir: str, pad: int
) -> tuple[Trainer, int, dict[str, float]]:
    """The Trainer of one row, the optimizer steps it takes and the bridge-input RMS (depth-scaled rows), with the
    method's own callback: AdaLoRA's and SubLoRA's allocation, ODELoRA's trainer."""
    spec = METHODS[method]
    lr = args.lr_of(method)
    trainer_class: type[Trainer] = Trainer
    options: dict[str, Any] = {}
    callbacks: list[TrainerCallback] = []
    optimizer, rms = None, {}
    if spec.optimizer.startswith("odelora"):
        scheme = spec.optimizer.split("-", 1)[1]
        trainer_class, options = ODELoRATrainer, {"scheme": scheme}
        steps = max(1, steps // SCHEMES[scheme])  # the same gradient evaluations as the AdamW rows
    lengths = [len(e.prompt_ids) + len(e.answer_ids) for e in data.train]
    ordered = in_batch_order(data.train, lengths, args.batch_size, steps, seed)
    if spec.depth_lr:  # each bridge's lr from the RMS of the state it reads, on the first batch
        first = ChatCollator(pad)([{"example": e} for e in ordered[: args.batch_size]])
        first = {k: v for k, v in first.items() if k != "labels"}
        rms = bridge_input_rms(model, lambda: model(**first))
        optimizer = torch.optim.AdamW(depth_scaled_param_groups(model, lr, rms), weight_decay=0.0)
    if spec.kind == "adalora":
        callbacks.append(AdaLoRACallback())
    elif spec.kind == "sublora":
        callbacks.append(SubLoRACallback())
    trainer = trainer_class(
        model=model,
        args=job_arguments(output_dir, steps=steps, batch_size=args.batch_size, lr=lr, seed=seed, bf16=args.bf16),
        train_dataset=ChatDataset(ordered),
        data_collator=ChatCollator(pad),
        callbacks=callbacks,
        optimizers=(optimizer, None),
        **options,
    )
    return trainer, steps, rms


def train_and_score(
    method: str,
    seed: int,
    args: BenchArgs,
    data: BenchData,
    load: Callable[[], tuple[nn.Module, Any]] | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """Train one method at one seed through ``transformers.Trainer`` and score it; returns the experiment's result
    record. ``load`` gives the base model and tokenizer (default: SmolLM2-135M-Instruct); ``steps`` replaces
    ``args.steps`` (gradient evaluations)."""
    from peft_ctrl.models import load_smollm2

    spec = METHODS[method]
    started = time.perf_counter()
    base, tokenizer = (load or load_smollm2)()
    if spec.checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)
    evaluations = steps or args.steps
    model = get_peft_model(base, peft_config(method, evaluations))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pad = tokenizer.pad_token_id
    memory, timer, curve = (
        MemoryReportCallback(),
        StepTimeCallback(skip=2),
        _Curve(args.eval_every, data, pad, args.bf16),
    )
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, steps, rms = _trainer(method, model, args, data, seed, evaluations, output_dir, pad)
        # Callbacks run in the order they were added: the method's own (allocation counts in its step time), then
        # the timer, then the curve (its scoring does not).
        for callback in (memory, timer, curve):
            trainer.add_callback(callback)
        quiet_progress(trainer).train()
    trained = time.perf_counter() - started
    scored, nll = evaluate(model, data, pad, args.bf16)
    if args.save_adapters:
        with atomic_directory(Path(args.save_adapters) / method / f"seed{seed}") as folder:
            model.save_pretrained(folder)
    return {
        "method": method,
        "label": spec.label,
        "kind": spec.kind,
        "seed": seed,
        "lr": args.lr_of(method),
        "depth_lr": spec.depth_lr,
        "optimizer": spec.optimizer,
        "optimizer_steps": steps,
        "trainable_params": trainable,
        "adapter_bytes": adapter_bytes(model),
        "saved_activation_bytes": memory.saved_bytes,
        "measured_tokens": trainer.data_collator.first_batch_tokens,
        "step_seconds": timer.median(),
        "train_seconds": round(trained, 1),
        "losses": [round(x, 4) for x in step_losses(trainer.state.log_history)],
        "accuracy": _task_means(scored),
        "option_nll": nll,
        "curve": [*curve.points, {"step": steps, "accuracy": _task_means(scored), "option_nll": nll}],
        "bridge_input_rms": rms,
        "hits": scored,
    }


def score_base(args: BenchArgs, data: BenchData, load: Callable[[], tuple[nn.Module, Any]] | None = None) -> dict:
    """The ``base`` row: the model without fine-tuning, scored like every other row (no costs: nothing trains)."""
    from peft_ctrl.models import load_smollm2

    started = time.perf_counter()
    model, tokenizer = (load or load_smollm2)()
    scored, nll = evaluate(model, data, tokenizer.pad_token_id, args.bf16)
    zero = {"trainable_params": 0, "adapter_bytes": 0, "saved_activation_bytes": 0, "measured_tokens": 0}
    return {
        "method": "base",
        "label": METHODS["base"].label,
        "kind": "none",
        "seed": 0,
        "lr": 0.0,
        "depth_lr": False,
        "optimizer": "none",
        "optimizer_steps": 0,
        **zero,
        "step_seconds": 0.0,
        "train_seconds": round(time.perf_counter() - started, 1),
        "losses": [float("nan")],
        "accuracy": _task_means(scored),
        "option_nll": nll,
        "curve": [],
        "hits": scored,
    }


def result_path(args: BenchArgs, method: str, seed: int) -> Path:
    return Path(args.results_dir) / args.split / f"{method}__seed{seed}.json"


def settings_of(args: BenchArgs, method: str) -> dict[str, Any]:
    """What an experiment's result depends on besides its method and seed; a resumed run must match it."""
    keys = (
        "task",
        "steps",
        "batch_size",
        "split",
        "eval_items",
        "validation_items",
        "max_tokens",
        "bf16",
        "eval_every",
    )
    return {**{k: getattr(args, k) for k in keys}, "lr": args.lr_of(method)}


def _read_result(path: Path) -> dict[str, Any]:
    """An experiment's result record; files from before tasks existed are commonsense experiments."""
    record = json.loads(path.read_text())
    if isinstance(record.get("settings"), dict):
        record["settings"] = {"task": "commonsense", **record["settings"]}
    return {"task": "commonsense", **record}


def same_time_steps(args: BenchArgs, method: str, seed: int) -> int | None:
    """Steps for a ``same_time_as`` row: ``args.steps`` x the reference's median step time / the twin's, from their
    result files at ``seed`` (``None`` for other rows). Raises ``ValueError`` when either has not run yet."""
    pair = METHODS[method].same_time_as
    if pair is None:
        return None
    times = []
    for other in pair:
        path = result_path(args, other, seed)
        if not path.is_file():
            raise ValueError(
                f"{method} trains for {pair[0]}'s wall-clock time as measured beside {pair[1]}: run both at seed "
                f"{seed} first (list them before {method} in methods)."
            )
        times.append(json.loads(path.read_text())["step_seconds"])
    return max(1, round(args.steps * times[0] / times[1]))


def run_bench(args: BenchArgs) -> list[dict[str, Any]]:
    """Run every (seed, method) experiment that has no result file yet, writing each file when it finishes; returns
    all results of ``args.methods`` x ``args.seeds``. All methods of one seed run back to back."""
    from peft_ctrl.models import load_smollm2
    from peft_ctrl.seal.keys import KEY_ENV

    if any(METHODS[m].kind == "seal" for m in args.methods) and not os.environ.get(KEY_ENV):
        raise ValueError(f"The SEAL row trains with the owner's key: set {KEY_ENV} (make one: peft-ctrl seal keygen).")
    _, tokenizer = load_smollm2()
    data = load_data(tokenizer, args)
    sizes = ", ".join(f"{task} {len(items)}" for task, items in data.evaluation.items())
    print(
        f"{args.task}: {len(data.train)} train examples ({data.dropped_long} longer than {args.max_tokens} tokens "
        f"left out), scored on the {args.split} split: {sizes}; {args.steps} steps x batch {args.batch_size}; "
        f"seeds {list(args.seeds)}; results in {Path(args.results_dir) / args.split}"
    )
    # the base model does not depend on the seed: scored once, as seed 0
    runs = list(dict.fromkeys((m, 0 if m == "base" else s) for s in args.seeds for m in args.methods))
    for method, seed in runs:
        path = result_path(args, method, seed)
        recorded = _read_result(path).get("settings") if path.is_file() else None
        if path.is_file() and recorded != settings_of(args, method):
            raise ValueError(
                f"{path} was made with other settings ({recorded}); resuming would mix them. Use another "
                "--results-dir, or delete the file to rerun it."
            )
    todo = [(m, s) for m, s in runs if not result_path(args, m, s).is_file()]
    if len(todo) < len(runs):
        print(f"resuming: {len(runs) - len(todo)} of {len(runs)} experiments already have results")
    for method, seed in tqdm(todo, desc="experiments", dynamic_ncols=True):
        steps = same_time_steps(args, method, seed)
        record = score_base(args, data) if method == "base" else train_and_score(method, seed, args, data, steps=steps)
        record.update(
            {
                "settings": settings_of(args, method),
                "task": args.task,
                "steps": args.steps,
                "budget_steps": steps or args.steps,
                "batch_size": args.batch_size,
                "split": args.split,
                "eval_items": args.eval_items,
                "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
                "date": date.today().isoformat(),
            }
        )
        with atomic_file(result_path(args, method, seed)) as tmp:
            tmp.write_text(json.dumps(record) + "\n")
    return [_read_result(result_path(args, m, s)) for m, s in runs]


def score_adapters(
    adapters: str | os.PathLike, test_files: Sequence[str | os.PathLike], bf16: bool = True, task: str = "commonsense"
) -> list[dict]:
    """``--eval-only``: score every saved adapter under ``adapters`` (folders holding ``adapter_config.json``) on
    each file in the LLM-Adapters format, in ``task``'s form (``commonsense-cloze``: answered in words); returns one
    record per adapter with per-file accuracy."""
    from peft_ctrl.models import load_smollm2

    folders = sorted(p.parent for p in Path(adapters).rglob("adapter_config.json"))
    if not folders:
        raise ValueError(f"No saved adapter (a folder with adapter_config.json) under {adapters}.")
    if not test_files:
        raise ValueError("--eval-only needs --test-file FILE (one or more files in the LLM-Adapters format).")
    _, tokenizer = load_smollm2()
    data = load_data(tokenizer, BenchArgs(task=task, eval_items=None), test_files)
    out = []
    for folder in tqdm(folders, desc="adapters", dynamic_ncols=True):
        base, _ = load_smollm2()
        model = PeftModel.from_pretrained(base, folder)
        scored, nll = evaluate(model, data, tokenizer.pad_token_id, bf16)
        accuracy = {t: statistics.fmean(h) for t, h in scored.items()}
        out.append({"adapter": str(folder), "accuracy": accuracy, "option_nll": nll})
    return out


# ---------------------------------------------------------------- report


def _average(accuracy: dict[str, float]) -> float:
    return 100 * statistics.fmean(accuracy.values())


def paired_difference(
    runs: list[dict[str, Any]], reference: list[dict[str, Any]], resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Average-accuracy difference (points) of ``runs`` minus ``reference`` and its 95% bootstrap interval, paired
    over seeds and test items: per task, each item's hit is averaged over the seeds both ran, items are resampled
    with replacement within each task, and the average over tasks is recomputed for each resample."""
    import numpy as np

    seeds = sorted({r["seed"] for r in runs} & {r["seed"] for r in reference})
    if not seeds:
        raise ValueError("The two rows share no seed; a paired difference needs the same seeds.")
    mine = {r["seed"]: r["hits"] for r in runs}
    ref = {r["seed"]: r["hits"] for r in reference}
    rng = np.random.default_rng(seed)
    point, draws = [], []
    for task in mine[seeds[0]]:
        d = np.mean([np.array(mine[s][task], float) - np.array(ref[s][task], float) for s in seeds], axis=0)
        point.append(d.mean())
        draws.append(d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1))
    boot = 100 * np.mean(draws, axis=0)
    low, high = np.percentile(boot, [2.5, 97.5])
    return 100 * float(np.mean(point)), float(low), float(high)


def summary_rows(results: list[dict[str, Any]], reference: str = REFERENCE) -> list[dict[str, Any]]:
    """One row per method (in the order they ran): per-task and average accuracy (mean and std over seeds), the
    paired difference to ``reference`` with its 95% interval, bytes, step time (ratios to ``reference``) and size."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["method"], []).append(r)
    step = {m: statistics.median(r["step_seconds"] for r in runs) for m, runs in groups.items()}
    rows = []
    for method, runs in groups.items():
        averages = [_average(r["accuracy"]) for r in runs]
        row = {
            "method": method,
            "label": runs[0]["label"],
            "seeds": [r["seed"] for r in runs],
            "tasks": {t: 100 * statistics.fmean(r["accuracy"][t] for r in runs) for t in runs[0]["accuracy"]},
            "average": averages,
            "average_mean": statistics.fmean(averages),
            "average_std": statistics.stdev(averages) if len(averages) > 1 else 0.0,
            "option_nll": statistics.fmean(statistics.fmean(r["option_nll"].values()) for r in runs),
            "final_loss": statistics.fmean(statistics.fmean(r["losses"][-20:]) for r in runs),
            "trainable_params": runs[0]["trainable_params"],
            "adapter_bytes": runs[0]["adapter_bytes"],
            "saved_bytes": runs[0]["saved_activation_bytes"],
            "step_seconds": step[method],
            "lr": runs[0]["lr"],
            "kind": runs[0]["kind"],
        }
        if reference in groups:
            ref = groups[reference]
            row["bytes_x_ref"] = row["saved_bytes"] / ref[0]["saved_activation_bytes"]
            row["time_x_ref"] = row["step_seconds"] / step[reference]
            if method != reference:
                diff, low, high = paired_difference(runs, ref)
                row["difference"] = {"points": diff, "low": low, "high": high, "tie": low <= 0 <= high}
        rows.append(row)
    return rows


def summary_table(results: list[dict[str, Any]], reference: str = REFERENCE) -> str:
    """The comparison as a markdown table (per task, average, difference to the reference, cost columns)."""
    rows = summary_rows(results, reference)
    tasks = list(rows[0]["tasks"])
    names = {"boolq": "BoolQ", "openbookqa": "OBQA", "ARC-Easy": "ARC-e", "ARC-Challenge": "ARC-c"}
    ref_label = "LoRA all-linear" if reference == REFERENCE else reference
    head = ["method", "params", *[names.get(t, t) for t in tasks], "average (mean ± std)"]
    head += [
        f"Δ vs {ref_label} [95% CI]",
        "option NLL",
        "train loss",
        "saved MiB",
        "bytes x ref",
        "step s",
        "time x ref",
        "adapter MB",
        "lr",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        diff = row.get("difference")
        if diff is None:
            delta = "reference" if row["method"] == reference else ""
        else:
            verdict = " (tie)" if diff["tie"] else ""
            delta = f"{diff['points']:+.1f} [{diff['low']:+.1f}, {diff['high']:+.1f}]{verdict}"
        seeds = f" ({len(row['seeds'])} seeds)" if len(row["seeds"]) > 1 else ""
        trained = row["kind"] != "none"
        cells = [
            row["label"],
            f"{row['trainable_params'] / 1e6:.2f}M" if trained else "0",
            *[f"{row['tasks'][t]:.1f}" for t in tasks],
            f"{row['average_mean']:.1f} ± {row['average_std']:.1f}{seeds}",
            delta,
            f"{row['option_nll']:.3f}",
        ]
        costs = [
            f"{row['final_loss']:.3f}",
            f"{row['saved_bytes'] / 2**20:.0f}",
            f"{row.get('bytes_x_ref', float('nan')):.3f}",
            f"{row['step_seconds']:.2f}",
            f"{row.get('time_x_ref', float('nan')):.3f}",
            f"{row['adapter_bytes'] / 1e6:.1f}",
            f"{row['lr']:g}",
        ]
        cells += costs if trained else [""] * len(costs)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_charts(
    path: str | os.PathLike,
    labels: list[str],
    colors: list[str],
    panels: list[tuple[str, list[float], list[float] | None]],
    title: str,
    figsize: tuple[float, float],
) -> bool:
    """One horizontal bar chart per ``(title, values, errors)`` panel, side by side and sharing the row labels,
    written atomically as a PNG; False if matplotlib is missing."""
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


def plot(results: list[dict[str, Any]], path: str | os.PathLike, title: str, reference: str = REFERENCE) -> bool:
    """Average accuracy (with the seeds' std), saved bytes and step time per method; False without matplotlib."""
    rows = summary_rows(results, reference)
    colors = ["tab:blue" if r["kind"] == "state-ctrl" else "tab:gray" for r in rows]
    panels = [
        (
            "average accuracy % (mean ± std over seeds)",
            [r["average_mean"] for r in rows],
            [r["average_std"] for r in rows],
        ),
        ("saved for backward, MiB (first step)", [r["saved_bytes"] / 2**20 for r in rows], None),
        ("median step time, s", [r["step_seconds"] for r in rows], None),
    ]
    labels = [r["label"].replace("PEFT ", "").replace(" + checkpointing", "\n+ ckpt") for r in rows]
    return bar_charts(path, labels, colors, panels, title, (16, 0.5 * len(rows) + 2.5))


def write_report(
    results: list[dict[str, Any]], folder: str | os.PathLike, name: str, command: str, reference: str = REFERENCE
) -> list[Path]:
    """``NAME.json`` (every experiment's record), ``NAME.md`` (the table and protocol line) and ``NAME.png``."""
    folder = Path(folder)
    first = results[0]
    task = TASKS[first["task"]]
    minutes = sum(r["train_seconds"] for r in results) / 60
    text = (
        f"Command: `{command}`. SmolLM2-135M-Instruct, {task.title}, {first['steps']} steps x batch "
        f"{first['batch_size']}, "
        f"{first['split']} split, {first['eval_items'] or 'all'} items per subtask, seeds "
        f"{sorted({r['seed'] for r in results})}; {first['machine']}; {first['date']}; {minutes:.0f} minutes of "
        "training and scoring in all.\n\n"
        f"{summary_table(results, reference)}\n\n"
        "Accuracy: the option with the most likely response, per task and averaged over tasks. Δ: paired difference "
        "to the reference row in points with its 95% bootstrap interval over test items (hits averaged over the "
        "shared seeds); an interval that holds 0 is a tie. Option NLL: -log of the reference option's share of the "
        "options' likelihoods, averaged over items and tasks (nats; chance: the log of the number of options, for "
        "commonsense log 2 for BoolQ and log 4 for ARC and OBQA, 1.21 averaged). Train loss: the response loss of "
        "the last 20 steps (mean over seeds). Saved bytes: "
        "the first step's tensors saved for backward (same batch for every method). Step time: median over steps "
        "and seeds, ratios from the same run.\n"
    )
    written = []
    for suffix, content in ((".json", json.dumps(results, indent=1) + "\n"), (".md", text)):
        with atomic_file(folder / f"{name}{suffix}") as tmp:
            tmp.write_text(content)
        written.append(folder / f"{name}{suffix}")
    if plot(
        results, folder / f"{name}.png", f"SmolLM2-135M-Instruct, {task.title} ({first['split']} split)", reference
    ):
        written.append(folder / f"{name}.png")
    return written
