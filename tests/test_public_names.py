"""Every dotted name the README and docs/ mention (``peft_ctrl.x.y``, ``peft_ctrl_app.x``, ``trainer_callbacks.X``)
and every ``from ... import ...`` line in their code blocks resolves: what the docs tell users to write works."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOTTED = re.compile(r"\b(?:peft_ctrl_app|peft_ctrl|trainer_callbacks)(?:\.[A-Za-z_]\w*)+")
FROM_IMPORT = re.compile(r"^\s*from ((?:peft_ctrl_app|peft_ctrl|trainer_callbacks)[\w.]*) import ([\w, ]+)$", re.M)


def resolve(dotted: str) -> None:
    """Import the longest module prefix of ``dotted`` and look the rest up as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return
    raise ModuleNotFoundError(dotted)


def names() -> list[str]:
    found = set()
    for doc in DOCS:
        text = doc.read_text()
        found |= set(DOTTED.findall(text))
        for module, imported in FROM_IMPORT.findall(text):
            found |= {f"{module}.{name.strip()}" for name in imported.split(",") if name.strip()}
    return sorted(found)


def test_the_docs_name_things():
    assert len(names()) > 40  # the reader finds the names (the test below cannot pass on an empty list)


@pytest.mark.parametrize("dotted", names())
def test_a_documented_name_resolves(dotted):
    resolve(dotted)
