"""A real text-classification task built from text that every Python installation ships.

``stdlib_topics``: sentences from the docstrings of Python's standard library, labelled with the topic of
the module they document (networking, files and OS, numbers, text, concurrency, dates and time). The
sentences are real English technical prose written by many authors; the label is not in the sentence
(module names are masked), so the model has to recognise the topic from the vocabulary and phrasing.
Nothing is downloaded. The exact sentences depend on the Python version, so compare methods within one
machine and run, as the finetune job does.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from dataclasses import dataclass

TOPICS: dict[str, list[str]] = {
    "networking": [
        "http.client",
        "http.server",
        "http.cookies",
        "http.cookiejar",
        "urllib.request",
        "urllib.parse",
        "smtplib",
        "imaplib",
        "poplib",
        "ftplib",
        "socket",
        "ssl",
        "email.message",
        "email.utils",
        "email.headerregistry",
        "xmlrpc.client",
        "ipaddress",
        "socketserver",
    ],
    "files and OS": [
        "os",
        "shutil",
        "pathlib",
        "tarfile",
        "zipfile",
        "tempfile",
        "glob",
        "fnmatch",
        "filecmp",
        "stat",
        "io",
        "gzip",
        "bz2",
        "lzma",
        "subprocess",
        "mailbox",
        "fileinput",
        "zipimport",
    ],
    "numbers": ["math", "cmath", "statistics", "decimal", "fractions", "random", "numbers", "_pydecimal"],
    "text": [
        "re",
        "string",
        "textwrap",
        "difflib",
        "codecs",
        "unicodedata",
        "html",
        "html.parser",
        "csv",
        "xml.dom.minidom",
        "xml.etree.ElementTree",
        "gettext",
        "locale",
        "shlex",
        "tokenize",
    ],
    "concurrency": [
        "threading",
        "multiprocessing.pool",
        "multiprocessing.managers",
        "multiprocessing.process",
        "multiprocessing.queues",
        "multiprocessing.synchronize",
        "asyncio.tasks",
        "asyncio.events",
        "asyncio.queues",
        "asyncio.locks",
        "asyncio.streams",
        "asyncio.subprocess",
        "asyncio.futures",
        "concurrent.futures._base",
        "concurrent.futures.thread",
        "concurrent.futures.process",
        "queue",
        "sched",
        "selectors",
    ],
    "dates and time": ["datetime", "_pydatetime", "time", "calendar", "zoneinfo", "_strptime"],
}

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@dataclass
class TextDataset:
    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def _docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # a module missing from this build of Python (e.g. no _ssl) simply contributes nothing
        return []
    docs = [inspect.getdoc(module) or ""]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("__") or getattr(obj, "__module__", module_name) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
            docs.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            for _, member in sorted(vars(obj).items()):
                if inspect.isfunction(member):
                    docs.append(inspect.getdoc(member) or "")
    return docs


def _sentences(doc: str, module_name: str) -> list[str]:
    prose = []
    for paragraph in doc.split("\n\n"):
        lines = paragraph.strip().splitlines()
        # Skip code examples, tables and parameter lists.
        if not lines or any(line.startswith((">>>", "...", "    ", "|", "-", "*", ":")) for line in lines):
            continue
        prose.append(" ".join(line.strip() for line in lines))
    out = []
    masked = [part for part in module_name.replace("_", "").split(".") if len(part) > 3]
    for sentence in _SENTENCE_END.split(" ".join(prose)):
        sentence = sentence.strip()
        for word in masked:
            sentence = re.sub(rf"\b{re.escape(word)}\b", "[MOD]", sentence, flags=re.IGNORECASE)
        if 6 <= len(sentence.split()) <= 60 and sentence[0].isalpha():
            out.append(sentence)
    return out


def stdlib_topics() -> tuple[TextDataset, TextDataset]:
    """The (train, test) split of the stdlib topic task; ~20% of sentences go to test, chosen by hash."""
    label_names = list(TOPICS)
    seen: set[str] = set()
    train, test = TextDataset([], [], label_names), TextDataset([], [], label_names)
    for label, topic in enumerate(label_names):
        for module_name in TOPICS[topic]:
            for doc in _docstrings(module_name):
                for sentence in _sentences(doc, module_name):
                    if sentence in seen:
                        continue
                    seen.add(sentence)
                    split = test if hashlib.sha256(sentence.encode()).digest()[0] < 52 else train
                    split.texts.append(sentence)
                    split.labels.append(label)
    if len(train) < 100 or len(test) < 50:
        raise RuntimeError(f"The stdlib topic task came out too small ({len(train)} / {len(test)} sentences).")
    return train, test
