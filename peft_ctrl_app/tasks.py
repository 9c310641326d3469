"""The causal-LM tasks of ``peft-ctrl bench`` and ``peft-ctrl finetune``, described as data.

A task is a list of subtasks whose train and test splits load as ``Item`` lists (a question, its reference
response, its answer and every option), plus the settings of its main job. One runner (``peft_ctrl_app.lm_bench``)
trains and scores every task the same way: the loss on the response only, the answer = the option whose response
the model finds most likely.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .commonsense import Item, in_words, read_items, shipped_file
from .datasets import stdlib_topics

STDLIB_SYSTEM = (
    "Topic of this Python doc sentence: networking, files and OS, numbers, text, concurrency, or dates and time?"
)
STDLIB_MAX_TOKENS = 40  # tokens kept of each stdlib sentence


@dataclass(frozen=True)
class Task:
    """One task: ``load(subtask, split, tokenizer)`` gives the items of a subtask's ``train`` or ``test`` split.

    ``end_of_turn``: score each option's response through the end-of-turn token, for options of different lengths
    (without it a short option would win by having fewer tokens to pay for). ``form``: applied to every item after
    the validation split and the scored subset are picked, so every form of a task trains and scores the same
    questions (``in_words`` for the cloze task). ``main_*``: the main job's rows, seeds and steps.
    """

    title: str
    subtasks: tuple[str, ...]
    load: Callable[[str, str, Any], list[Item]]
    main_methods: tuple[str, ...]
    main_seeds: tuple[int, ...]
    steps: int
    end_of_turn: bool = False
    form: Callable[[Item], Item] | None = None

    def prepare(self, items: list[Item]) -> list[Item]:
        """``items`` in this task's form."""
        return list(items) if self.form is None else [self.form(it) for it in items]


def commonsense_items(subtask: str, split: str, tokenizer: Any = None) -> list[Item]:
    """A shipped commonsense file (``peft_ctrl_app.commonsense``); the tokenizer is not needed."""
    return read_items(shipped_file(subtask, split), subtask)


def cloze(item: Item) -> Item:
    """The cloze form of a commonsense item: the question alone, answered with the words of its option
    (``peft_ctrl_app.commonsense.in_words`` without the listed options)."""
    return in_words(item, show_options=False)


def stdlib_items(subtask: str, split: str, tokenizer: Any) -> list[Item]:
    """The stdlib topics (``peft_ctrl_app.datasets.stdlib_topics``) as chat questions: the system message lists the six
    topics, the user message is the sentence (cut to its first 40 tokens) and the response is the topic's name."""
    if subtask != "stdlib" or split not in ("train", "test"):
        raise ValueError(f"The stdlib task has one subtask, 'stdlib', split train or test; got {subtask}/{split}.")
    data = stdlib_topics()[0 if split == "train" else 1]
    options = tuple(data.label_names)
    items = []
    for text, label in zip(data.texts, data.labels, strict=True):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:STDLIB_MAX_TOKENS]
        answer = options[label]
        items.append(Item("stdlib", tokenizer.decode(ids), answer, answer, options, STDLIB_SYSTEM))
    return items
