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


# The input dtypes the kernels are compiled and tested for (peft_ctrl.ops.triton_aot compiles each for sm_80, sm_90).
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_reason(x: torch.Tensor, rank: int = 0) -> str | None:
    """Why ``lowrank`` would not run its Triton kernels on ``x`` with a rank-``rank`` adapter, or None if it would:
    they run on CUDA tensors of ``TRITON_DTYPES`` up to ``MAX_RANK`` when Triton is installed."""
    if not _FORCED:  # force_triton() (tests) runs the kernels on any device and dtype, not at any rank
        if not x.is_cuda:
            return "not a CUDA tensor"
        if not triton_available():
            return "Triton is not installed (pip install 'peft-ctrl[triton]')"
        if x.dtype not in TRITON_DTYPES:
            return f"no Triton kernel for {x.dtype} (compiled for float32, bfloat16 and float16)"
    if rank > triton_ops().MAX_RANK:
        return f"rank {rank} is above the kernels' largest rank class, {triton_ops().MAX_RANK}"
    return None


def use_triton(x: torch.Tensor, rank: int = 0) -> bool:
    """Triton for CUDA tensors it has kernels for (``triton_reason``); a one-time warning and the torch path when
    Triton is not installed.

    ``force_triton()`` runs the kernels on any tensor (CPU tensors need ``TRITON_INTERPRET=1``), for tests.
    """
    global _WARNED
    reason = triton_reason(x, rank)
    if reason is not None and reason.startswith("Triton is not installed") and not _WARNED:
        warnings.warn(
            "peft_ctrl.ops: Triton is not installed, using the torch path on CUDA (same results, the dropout "
            "mask comes from torch's generator instead of Philox). Install it with: pip install 'peft-ctrl[triton]'.",
            stacklevel=3,
        )
        _WARNED = True
    return reason is None


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
