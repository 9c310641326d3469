"""Chooses the Triton kernels or the torch path for ``peft_ctrl.ops``."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

_FORCED = False
_WARNED = False


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    """Triton for CUDA tensors when it is installed; a one-time warning and the torch path when it is not.

    ``force_triton()`` runs the kernels on any tensor (CPU tensors need ``TRITON_INTERPRET=1``), for tests.
    """
    global _WARNED
    if _FORCED:
        return True
    if not x.is_cuda:
        return False
    if triton_available():
        return True
    if not _WARNED:
        warnings.warn(
            "peft_ctrl.ops: Triton is not installed, using the torch path on CUDA (same results, the dropout "
            "mask comes from torch's generator instead of Philox). Install it with: pip install 'peft-ctrl[triton]'.",
            stacklevel=3,
        )
        _WARNED = True
    return False


def triton_ops() -> ModuleType:
    from . import triton_lowrank

    return triton_lowrank


@contextlib.contextmanager
def force_triton() -> Iterator[None]:
    """Route every call through the Triton kernels (tests run them on CPU with ``TRITON_INTERPRET=1``)."""
    global _FORCED
    previous, _FORCED = _FORCED, True
    try:
        yield
    finally:
        _FORCED = previous
