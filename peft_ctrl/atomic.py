"""Atomic writes: a failure midway (disk full, a crash, an exception) never destroys what was there before.

Everything is written to a temporary file or directory on the same filesystem first and moved into place by
``os.replace`` (a rename, which needs no space and cannot half-happen) only once it is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Files a reader opens first to decide what to load; they are moved into place last, so the moment a new
# config is visible the new weights are already beside it.
_LAST = (".json",)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``path``; when the block succeeds, move every file written
    there into ``path`` (created if needed), replacing files of the same name. Files of ``path`` that were not
    rewritten are left alone (a Trainer checkpoint folder also holds optimizer and trainer state). If the block
    raises, ``path`` is untouched and the temporary directory is removed.

    ``keep`` names files of ``path`` copied into the temporary directory first, so a writer that updates an
    existing file (peft's model card) sees it.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for name in keep:
            if (target / name).is_file():
                shutil.copy2(target / name, tmp / name)
        yield tmp
        files = sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: (p.name.endswith(_LAST), str(p)))
        for file in files:
            _fsync(file)
        for file in files:
            destination = target / file.relative_to(tmp)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; on success it replaces ``path``, on error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
