"""What fits on a card: the longest sequence (or largest batch) whose planned peak stays within a memory size."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .plan import Plan, plan

GIB = 2**30


def _largest(fits: Callable[[int], bool], step: int, limit: int) -> int:
    """The largest multiple of ``step`` up to ``limit`` for which ``fits`` holds (0 if none): doubling, then
    bisection, assuming memory grows with the size (it does: every saved tensor's size is monotone in it)."""
    if not fits(step):
        return 0
    low, high = step, step
    while high < limit and fits(min(2 * high, limit)):
        low = high = min(2 * high, limit)
    if high == limit:
        return limit
    high = min(2 * high, limit)  # does not fit
    while high - low > step:
        middle = (low + high) // (2 * step) * step
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def longest_sequence(
    model: str | Any, method: str, memory_bytes: int, *, step: int = 256, limit: int = 131072, **options: Any
) -> int:
    """The longest sequence, in multiples of ``step`` up to ``limit``, whose planned peak (batch given in
    ``options``, default 1) fits in ``memory_bytes``; 0 when not even ``step`` tokens fit."""
    return _largest(lambda seq: plan(model, method, seq=seq, **options).peak <= memory_bytes, step, limit)


def largest_batch(
    model: str | Any, method: str, memory_bytes: int, *, seq: int, limit: int = 1024, **options: Any
) -> int:
    """The largest batch of ``seq`` tokens whose planned peak fits in ``memory_bytes`` (0: not even one)."""
    return _largest(lambda batch: plan(model, method, seq=seq, batch=batch, **options).peak <= memory_bytes, 1, limit)


def breakdown(p: Plan) -> str:
    """The plan as a small table, in GiB."""
    rows = [
        ("weights", p.weights),
        ("gradients", p.gradients),
        ("optimizer state (AdamW)", p.optimizer),
        ("saved for backward", p.saved),
        ("  of which logits and loss", p.logits),
        ("peak (sum)", p.peak),
    ]
    head = (
        f"{p.model}, {p.method}, {p.dtype}, batch {p.batch} x {p.seq} tokens, {p.target}"
        f"{', checkpointing' if p.checkpointing else ''}"
        f"{f', ZeRO-{p.zero_stage} x {p.world_size}' if p.zero_stage else ''}: "
        f"{p.trainable_params:,} trainable of {p.parameters:,} parameters"
    )
    return "\n".join([head, *(f"  {name:<28} {value / GIB:9.2f} GiB" for name, value in rows)])
