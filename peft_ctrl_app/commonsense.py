"""Commonsense-reasoning data in the LLM-Adapters format, shipped with the application (``data/commonsense``).

Each file is a JSON list (optionally gzipped) of items with ``instruction`` (the question, its options and a last
line ``Answer format: a/b/c``), ``input`` (empty here), ``output`` (``the correct answer is X``) and ``answer`` (X).
The shipped splits are BoolQ, ARC-Easy, ARC-Challenge and OpenBookQA (train and test; sources and licences in
``peft_ctrl_app/data/commonsense/README.md``). ``read_items`` reads any file in the format, so the suite's other tasks
(PIQA, SIQA, WinoGrande, HellaSwag) or commonsense_170k work the same once downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data" / "commonsense"
TASKS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")
_FORMAT = re.compile(r"Answer format:\s*(\S+)\s*$")
_LABEL = re.compile(r"[a-z]+\d+")  # option labels written out in the instruction: answer1, solution2, option1, ending3


@dataclass(frozen=True)
class Item:
    """One question: the instruction shown to the model, the reference response, its answer and every option;
    ``system``, when set, is a system message shown before the instruction."""

    task: str
    instruction: str
    output: str
    answer: str
    options: tuple[str, ...]
    system: str | None = None

    def response(self, option: str) -> str:
        """The response that picks ``option``, in the wording of the reference (``the correct answer is X``)."""
        return self.output[: len(self.output) - len(self.answer)] + option


def read_items(path: str | os.PathLike, task: str | None = None) -> list[Item]:
    """Every item of an LLM-Adapters file (``.json`` or ``.json.gz``). The options come from the instruction's last
    line, ``Answer format: a/b/c``; the task name defaults to the file name without ``_train``/``_test``.

    Raises ``ValueError`` naming the item when a field is missing, the format line is absent, the answer is not one
    of the options or the output does not end with the answer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found.")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a JSON list in the LLM-Adapters format: {err}") from err
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path} must hold a non-empty JSON list of items, got {type(data).__name__}.")
    name = task or re.sub(r"_(train|test|dev|validation)$", "", path.name.split(".")[0])
    items = []
    for i, raw in enumerate(data):
        where = f"{path} item {i}"
        if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str) for k in ("instruction", "output")):
            raise ValueError(f"{where}: needs string fields 'instruction' and 'output' (and 'answer').")
        instruction = raw["instruction"].strip()
        if raw.get("input"):
            instruction += "\n\n" + raw["input"].strip()
        found = _FORMAT.search(raw["instruction"].strip())
        if found is None:
            raise ValueError(
                f"{where}: the instruction does not end with an 'Answer format: a/b/...' line, so its options are "
                "unknown; every LLM-Adapters commonsense file has one."
            )
        options = tuple(found.group(1).split("/"))
        answer = str(raw.get("answer", "")).strip()
        output = raw["output"].strip()
        if answer not in options:
            raise ValueError(f"{where}: answer {answer!r} is not one of the options {list(options)}.")
        if not output.endswith(answer):
            raise ValueError(f"{where}: output {output!r} does not end with the answer {answer!r}.")
        items.append(Item(name, instruction, output, answer, options))
    return items


def in_words(item: Item, show_options: bool = True) -> Item:
    """``item`` answered in the words of its option instead of its label: the response is the option's own text
    (``Sunlight is the source of energy ...`` instead of ``the correct answer is answer1``) and the options are the
    texts, so scoring compares the likelihood of each answer's words. The instruction loses its ``Answer format``
    line; with ``show_options=False`` it also loses the listed options (the cloze form: the question alone).

    Labels written out in the instruction (``Answer1: ...``, ``Solution1: ...``, ``Option1: ...``, ``Ending1: ...``,
    as in every LLM-Adapters commonsense file) are replaced by their text; options that are words already (BoolQ's
    ``true``/``false``) stay. Two options may have the same words (3 of OpenBookQA's 4,957 train items, none of the
    shipped test items): such an item still trains, and scoring it is refused (``lm_bench.scored_item``)."""
    body = _FORMAT.sub("", item.instruction).strip()
    if not all(_LABEL.fullmatch(o) for o in item.options):
        return Item(item.task, body, item.answer, item.answer, item.options, item.system)
    marks = [re.search(rf"\b{re.escape(o)}:", body, flags=re.IGNORECASE) for o in item.options]
    if any(m is None for m in marks) or [m.start() for m in marks] != sorted(m.start() for m in marks):
        raise ValueError(
            f"{item.task}: the instruction does not list the options {list(item.options)} in order as "
            f"'{item.options[0].capitalize()}: text'; cannot answer it in words: {item.instruction[:200]!r}"
        )
    ends = [m.start() for m in marks[1:]] + [len(body)]
    texts = tuple(body[m.end() : end].strip() for m, end in zip(marks, ends, strict=True))
    if not all(texts):
        raise ValueError(f"{item.task}: an option has no text in {item.instruction[:200]!r}")
    answer = texts[item.options.index(item.answer)]
    instruction = body if show_options else body[: marks[0].start()].strip()
    return Item(item.task, instruction, answer, answer, texts, item.system)


def shipped_file(task: str, split: str) -> Path:
    """The shipped file of one task (``TASKS``) and split (``train`` or ``test``)."""
    if task not in TASKS or split not in ("train", "test"):
        raise ValueError(
            f"Shipped commonsense files: tasks {list(TASKS)}, splits train and test; got {task!r}/{split!r}."
        )
    return DATA_DIR / f"{task}_{split}.json.gz"


def _rank(item: Item, salt: str) -> bytes:
    return hashlib.sha256((salt + item.instruction).encode()).digest()


def split_validation(items: list[Item], size: int) -> tuple[list[Item], list[Item]]:
    """(train, validation): ``size`` items picked by a hash of the instruction go to validation, the rest stay for
    training; the same on every run and machine. Learning rates and ablations are chosen on the validation part."""
    ranked = sorted(items, key=lambda it: _rank(it, "validation"))
    held = {id(it) for it in ranked[:size]}
    return [it for it in items if id(it) not in held], ranked[:size]


def subset(items: list[Item], size: int | None) -> list[Item]:
    """``size`` items picked by a hash of the instruction (all when ``size`` is None or larger), in file order, so
    every method and seed is scored on the same items."""
    if size is None or size >= len(items):
        return list(items)
    keep = {id(it) for it in sorted(items, key=lambda it: _rank(it, "test"))[:size]}
    return [it for it in items if id(it) in keep]
