"""Pieces the jobs share: chat examples for a causal LM (the prompt in the model's chat template, the response as
the only loss, the one-pass greedy score) and length-bucketed batches (the jobs' batch order on Trainer,
``trainer_setup.in_batch_order``, and the SEAL attacks' own loops).

The jobs train through ``transformers.Trainer`` (``peft_ctrl_app.trainer_setup``); ``answer_loss`` is the loss
their collator's labels give the model, kept for the attack simulations and the tests that check the two agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .commonsense import Item

# The seven linears of a LLaMA decoder layer.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def length_bucketed_batches(lengths: torch.Tensor, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``steps`` batches of indices: each epoch is shuffled, cut into pools of 50 batches, each pool sorted by
    length (so a batch holds sentences of similar length and little padding), and the batch order shuffled."""
    g = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(len(lengths), generator=g)
        epoch = []
        pool = 50 * batch_size
        for i in range(0, len(perm) - batch_size + 1, pool):
            chunk = perm[i : i + pool]
            chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
            epoch += [chunk[j : j + batch_size] for j in range(0, len(chunk) - batch_size + 1, batch_size)]
        out += [epoch[k] for k in torch.randperm(len(epoch), generator=g).tolist()]
    return out[:steps]


@dataclass
class ChatExample:
    sentence: str  # the question (the item's instruction)
    answer: str
    prompt_ids: list[int]
    answer_ids: list[int]  # the response's tokens, then the end-of-turn token


def prompt_ids(tokenizer: Any, instruction: str, system: str | None = None) -> list[int]:
    """The instruction as one user turn of the model's chat template (after ``system`` when given), ending with
    the assistant header."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": instruction})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_example(tokenizer: Any, item: Item) -> ChatExample:
    """``item`` as a training example: its prompt, and its reference response followed by the end-of-turn token."""
    answer = tokenizer(item.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ChatExample(item.instruction, item.answer, prompt_ids(tokenizer, item.instruction, item.system), answer)


def balanced_subset(examples: list[ChatExample], per_class: int) -> list[ChatExample]:
    """``per_class`` examples of each answer, picked by a hash of the sentence (the same on every run and seed)."""
    ordered = sorted(examples, key=lambda e: hashlib.sha256(e.sentence.encode()).digest())
    out: list[ChatExample] = []
    for answer in dict.fromkeys(e.answer for e in examples):
        out += [e for e in ordered if e.answer == answer][:per_class]
    return out


def left_padded(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Token sequences as one left-padded batch (so every sequence ends at the last position) with explicit
    position ids (so padding does not shift positions)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, width - len(seq) :] = torch.tensor(seq)
        mask[i, width - len(seq) :] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}


def collate(examples: Sequence[ChatExample], pad_id: int, with_answers: bool = True) -> dict[str, torch.Tensor]:
    """Prompts (and answers) as a ``left_padded`` batch, and ``targets``: the last k tokens, -100 where a shorter
    answer leaves prompt tokens."""
    batch = left_padded([e.prompt_ids + (e.answer_ids if with_answers else []) for e in examples], pad_id)
    if with_answers:
        k = max(len(e.answer_ids) for e in examples)
        targets = torch.full((len(examples), k), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            targets[i, k - len(e.answer_ids) :] = torch.tensor(e.answer_ids)
        batch["targets"] = targets
    return batch


def answer_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits that predict the last k tokens of the batch (k = ``targets``' width), computed for those positions
    only (``logits_to_keep``): the vocabulary projection is not run, nor kept, for the prompt."""
    k = batch["targets"].shape[1]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=k + 1,
    )
    return out.logits[:, :-1]


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy on the response tokens only (the loss of every causal-LM job)."""
    logits = answer_logits(model, batch)
    return F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)


@torch.no_grad()
def greedy_hits(model: nn.Module, examples: Sequence[ChatExample], pad_id: int, batch_size: int = 32) -> list[bool]:
    """For each example, whether greedy decoding writes exactly its reference response and end-of-turn token.

    Without a decoding loop: greedy decoding writes the reference exactly when, fed the reference, the model's most
    likely next token is the reference token at every response position (by induction over the positions), so one
    teacher-forced pass scores an example as ``generate(do_sample=False)`` followed by exact match would."""
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
