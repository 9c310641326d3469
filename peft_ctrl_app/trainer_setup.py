"""How the jobs train: ``transformers.Trainer`` with the library's callbacks, the way docs/ tell users to.

A job hands its chat examples to ``ChatDataset`` and ``ChatCollator`` and its settings to ``job_arguments``; the
Trainer does the rest (the schedule, clipping, bf16 autocast, logging), and callbacks measure
(``MemoryReportCallback``: bytes saved for backward in the first step; ``StepTimeCallback``: step times).

The batches are the jobs' own: ``in_batch_order`` lays the examples out in the order of ``length_bucketed_batches``
(each epoch shuffled, cut into pools of 50 batches sorted by length, the batch order shuffled again) and the Trainer
reads them sequentially. Trainer's own length-grouped sampler sorts each pool from its longest batch to its shortest,
a length curriculum that cost state-ctrl 5 points on the main job (docs/commonsense.md#protocol).
The loss is the model's own, on the response tokens only: the collator's labels are -100 on the prompt, and
``logits_to_keep`` limits the vocabulary projection to the response positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import ProgressCallback, Trainer, TrainingArguments

from .training import ChatExample, collate, length_bucketed_batches


class ChatDataset(Dataset):
    """Chat examples as a map-style dataset (in ``in_batch_order``'s layout for training); the collator reads each
    item's example."""

    def __init__(self, examples: Sequence[ChatExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"example": self.examples[index]}


class ChatCollator:
    """Items of ``ChatDataset`` as one left-padded batch with causal-LM ``labels`` (-100 outside the response) and
    ``logits_to_keep`` = response length + 1, so the model computes logits, and its loss, for the response only.
    ``first_batch_tokens`` is the padded size of the first batch it built (the tokens the memory figure is for)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id
        self.first_batch_tokens: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = collate([f["example"] for f in features], self.pad_id)
        targets = batch.pop("targets")
        k = targets.shape[1]
        batch["labels"] = torch.cat([torch.full_like(targets[:, :1], -100), targets], dim=1)
        batch["logits_to_keep"] = k + 1
        if self.first_batch_tokens is None:
            self.first_batch_tokens = int(batch["attention_mask"].numel())
        return batch


def in_batch_order(items: Sequence[Any], lengths: Sequence[int], batch_size: int, steps: int, seed: int) -> list[Any]:
    """``items`` repeated and reordered so that reading them in order gives the ``steps`` batches of
    ``length_bucketed_batches(lengths, batch_size, steps, seed)``: the same batches for every method of a seed."""
    batches = length_bucketed_batches(torch.tensor(list(lengths)), batch_size, steps, seed)
    return [items[i] for batch in batches for i in batch.tolist()]


def job_arguments(
    output_dir: str, *, steps: int, batch_size: int, lr: float, seed: int, bf16: bool, **overrides: Any
) -> TrainingArguments:
    """The jobs' Trainer settings: ``steps`` optimizer steps of ``batch_size`` examples read in the dataset's order
    (``in_batch_order``), AdamW without weight decay at peak ``lr`` after a 10% linear warm-up, then linear decay to
    0, gradients clipped to norm 1, bf16 autocast when ``bf16``, a loss logged every step, no checkpoints, no
    reporting services."""
    settings: dict[str, Any] = {
        "output_dir": output_dir,
        "max_steps": steps,
        "per_device_train_batch_size": batch_size,
        "learning_rate": lr,
        "lr_scheduler_type": "linear",
        "warmup_steps": max(1, steps // 10),
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "seed": seed,
        "bf16": bf16,
        "train_sampling_strategy": "sequential",  # the order of in_batch_order
        "remove_unused_columns": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),  # pinning needs a GPU; on CPU it only warns
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


def step_losses(log_history: list[dict[str, Any]]) -> list[float]:
    """The loss of every logged step, in order, from a Trainer's ``state.log_history``."""
    return [entry["loss"] for entry in log_history if "loss" in entry and "step" in entry]


class _LossInBar(ProgressCallback):
    """Trainer's progress bar with the latest loss beside it, instead of one printed line per logged step."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs and getattr(self, "training_bar", None) is not None:
            self.training_bar.set_postfix(loss=f"{float(logs['loss']):.3f}")


def quiet_progress(trainer: Trainer) -> Trainer:
    """Swap the Trainer's progress bar for one that shows the loss in the bar (the jobs log every step)."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_LossInBar())
    return trainer
