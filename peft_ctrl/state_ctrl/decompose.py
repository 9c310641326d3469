"""A probed block decomposed into residual sub-blocks by the recorded values alone, and a bridge checked against
them (the rules are in ``peft_ctrl.state_ctrl.placement``'s module doc and docs/state_ctrl.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .probe import BlockRecord, Call, _as, _close, _same_shape, _tolerance

KINDS = {"mlp": ("mlp",), "attn": ("attn", "cross"), "both": ("attn", "cross", "mlp")}
_ATTENTION = re.compile(r"attention|attn", re.IGNORECASE)
_CROSS = re.compile(r"cross|encoder_attn|encdec", re.IGNORECASE)


@dataclass(frozen=True)
class SubBlock:
    """One residual sub-block of a block: ``kind`` is ``"attn"``, ``"cross"`` or ``"mlp"``; ``form`` is
    ``"additive"``, ``"parallel"`` or ``"post-norm"``; head and tail are relative to the block."""

    kind: str
    form: str
    head: str
    tail: str
    width: int
    causal: bool | None = None


# ------------------------------------------------------------------------------------------------- decomposition


class Undecomposable(ValueError):
    """A block whose output is not reached from its input through residual sub-blocks the probe recognises."""


def _stack_of(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.detach().float().reshape(-1) for v in values])


def _find(target: torch.Tensor, magnitude: torch.Tensor, stacked: torch.Tensor, tol: float) -> int | None:
    """Row of ``stacked`` equal to ``target`` within tolerance (``_within``), the closest one if several."""
    t, mag = target.reshape(-1), magnitude.reshape(-1)
    diff = (stacked - t).abs()
    bound = tol * (mag + stacked.abs() + 1e-3 * float(mag.max()) + 1e-30)
    ok = (diff <= bound).all(dim=1)
    if not bool(ok.any()):
        return None
    score = (diff / bound).amax(dim=1).masked_fill(~ok, float("inf"))
    return int(score.argmin())


class _Decomposer:
    def __init__(self, rec: BlockRecord) -> None:
        self.rec = rec
        if rec.x0 is None or rec.y is None or not _same_shape(rec.x0, rec.y):
            raise Undecomposable(
                f"block {rec.name!r} does not map a state to a state of the same shape "
                f"({None if rec.x0 is None else tuple(rec.x0.shape)} -> "
                f"{None if rec.y is None else tuple(rec.y.shape)})"
            )
        self.counts: dict[str, int] = {}
        for c in rec.calls:
            self.counts[c.name] = self.counts.get(c.name, 0) + 1
        self.calls = [c for c in rec.calls if self.counts[c.name] == 1]
        # (state candidate, when it is first read): the block input, and every tensor of its shape a module reads
        self.states = [(rec.x0, 0)] + [
            (c.input, c.start) for c in self.calls if c.input is not None and _same_shape(c.input, rec.x0)
        ]
        self._stacked = _stack_of([s for s, _ in self.states])

    def producers(self, before: int) -> list[Call]:
        """Calls that return a tensor of the state's shape and end before ``before``."""
        return [
            c for c in self.calls if c.output is not None and _same_shape(c.output, self.rec.x0) and c.end < before
        ]

    def state_index(
        self, value: torch.Tensor, magnitude: torch.Tensor, t: torch.Tensor, producers: list[Call]
    ) -> int | None:
        """Index in ``self.states`` of a state equal to ``value`` that existed before every producer started (the
        state a branch starts from, not the branch's own output) and is not ``t`` itself."""
        start = min(p.start for p in producers)
        usable = [i for i, (s, time) in enumerate(self.states) if time < start and not _close(s, t)]
        if not usable:
            return None
        found = _find(value, magnitude, self._stacked[usable], _tolerance(self.rec.x0))
        return None if found is None else usable[found]

    def read_time(self, state: torch.Tensor) -> int:
        """When ``state`` is first read by a module (the block's end for its output)."""
        if state is self.rec.y:
            return self.rec.end
        times = [c.start for c in self.calls if _close(c.input, state)]
        return min(times) if times else self.rec.end

    def tail_for(self, value: torch.Tensor, state: torch.Tensor | None, before: int) -> Call:
        """The outermost single-call module returning ``value`` (ties: the one that starts first; dropout modules
        only when nothing else returns it). For a post-norm sub-block, not a module that reads the entering
        ``state`` itself (BERT's ``attention``, which holds the whole sub-block: its ``attention.output`` is the
        tail)."""
        found = [c for c in self.calls if c.end <= before and _close(c.output, value) and not _close(c.input, state)]
        plain = [c for c in found if not isinstance(c.module, nn.Dropout)] or found
        return min(plain, key=lambda c: (c.depth, c.start))

    def head_for(self, state: torch.Tensor, tail: Call) -> Call | None:
        """The last outermost module that reads ``state`` before ``tail`` starts and is not inside ``tail``."""
        readers = [
            c
            for c in self.calls
            if c.start < tail.start and _close(c.input, state) and not c.name.startswith(f"{tail.name}.")
        ]
        outer = [c for c in readers if not any(c.name.startswith(f"{o.name}.") for o in readers)]
        return max(outer, key=lambda c: c.start) if outer else None

    def step(self, t: torch.Tensor) -> tuple[torch.Tensor, str, list[Call]]:
        """The sub-block(s) ending at state ``t``: (entering state, form, tails)."""
        time = self.read_time(t)
        producers = self.producers(time)
        # additive: t = s + o. Of all matches, the one whose state is latest: a state further back would skip a
        # sub-block whose output is small next to the stream (a tiny random MoE block in bf16 is).
        matches = []
        for p in producers:
            o = _as(p.output, t)
            i = self.state_index(t.float() - o, t.float().abs() + o.abs(), t, [p])
            if i is not None and not _close(p.output, t):
                matches.append((self.states[i][1], p.start, i, p))
        if matches:
            _, _, i, p = max(matches, key=lambda m: (m[0], m[1]))
            return self.states[i][0], "additive", [self.tail_for(p.output, None, time)]
        for n in self.calls:  # post-norm: t = N(s + o), the tail returns t
            if n.end > time or not _close(n.output, t) or n.input is None or not _same_shape(n.input, t):
                continue
            for p in self.producers(n.start):
                u, o = n.input.float(), _as(p.output, n.input)
                i = self.state_index(u - o, u.abs() + o.abs(), t, [p])
                if i is not None and not _close(p.output, n.input):
                    s = self.states[i][0]
                    return s, "post-norm", [self.tail_for(t, s, time)]
        for a, p1 in enumerate(producers):  # parallel: t = s + o1 + o2
            for p2 in producers[a + 1 :]:
                if (
                    _close(p1.output, p2.output)
                    or p1.name.startswith(f"{p2.name}.")
                    or p2.name.startswith(f"{p1.name}.")
                ):
                    continue
                o1, o2 = _as(p1.output, t), _as(p2.output, t)
                i = self.state_index(t.float() - o1 - o2, t.float().abs() + o1.abs() + o2.abs(), t, [p1, p2])
                if i is not None:
                    tails = sorted((self.tail_for(p.output, None, time) for p in (p1, p2)), key=lambda c: c.start)
                    return self.states[i][0], "parallel", tails
        raise Undecomposable(
            f"block {self.rec.name!r}: no module output joins the residual state at this point additively, in "
            "parallel or through a post-norm"
        )

    def kind(self, tail: Call, since: int) -> str:
        span = [c for c in self.calls if (since < c.start and c.end <= tail.end) or tail.name.startswith(f"{c.name}.")]
        attention = [c for c in span if _ATTENTION.search(type(c.module).__name__)]
        if not attention:
            return "mlp"
        return (
            "cross"
            if any(_CROSS.search(c.name) or _CROSS.search(type(c.module).__name__) for c in attention)
            else "attn"
        )

    def causal(self, tail: Call, since: int) -> bool | None:
        flags = {
            c.module.is_causal
            for c in self.calls
            if ((since < c.start and c.end <= tail.end) or tail.name.startswith(f"{c.name}."))
            and isinstance(getattr(c.module, "is_causal", None), bool)
        }
        return flags.pop() if len(flags) == 1 else None

    def decompose(self) -> list[SubBlock]:
        found: list[tuple[torch.Tensor, str, Call]] = []
        t = self.rec.y
        for _ in range(len(self.calls) + 1):
            if _close(t, self.rec.x0):
                break
            s, form, tails = self.step(t)
            found.extend((s, form, tail) for tail in tails)
            t = s
        else:
            raise Undecomposable(f"block {self.rec.name!r}: the residual chain does not lead back to the block input")
        found.sort(key=lambda item: item[2].end)
        subs, since = [], -1
        for s, form, tail in found:
            head = self.head_for(s, tail)
            if head is None:
                raise Undecomposable(f"block {self.rec.name!r}: no module reads the state that {tail.name!r} joins")
            subs.append(
                SubBlock(
                    self.kind(tail, since), form, head.name, tail.name, int(s.shape[-1]), self.causal(tail, since)
                )
            )
            since = tail.end
        return subs


def decompose(rec: BlockRecord) -> list[SubBlock]:
    """The residual sub-blocks of a probed block, in forward order (``Undecomposable`` if there are none)."""
    return _Decomposer(rec).decompose()


# ------------------------------------------------------------------------------------------- checking a bridge


def _describe(rec: BlockRecord, tensor: torch.Tensor) -> str:
    """What a probed tensor is, in words: the block input, some module's output, or an inner tensor."""
    if _close(tensor, rec.x0):
        return "the block's input state"
    for c in rec.calls:
        if c.output is not None and _close(c.output, tensor):
            return f"the output of {c.name!r} ({type(c.module).__name__})"
    return "a tensor computed inside the block"


def check_bridge(rec: BlockRecord, subs: list[SubBlock] | None, head: str, tail: str) -> tuple[int, int]:
    """Check the bridge ``(head, tail)`` (names relative to ``rec``'s block) on the probe; returns its (input,
    output) widths from the probed tensors. Raises ``ValueError`` naming what is wrong and the right placement."""
    where = f"bridge ({head!r}, {tail!r}) in block {rec.name!r}"
    for role, name in (("head", head), ("tail", tail)):
        calls = rec.called(name)
        if len(calls) != 1:
            raise ValueError(
                f"The {where}: its {role} {name!r} ran {len(calls)} times in one forward of the block; a bridge needs "
                "modules that run exactly once per block."
            )
    h, o = rec.called(head)[0].input, rec.called(tail)[0].output
    if h is None or o is None:
        raise ValueError(f"The {where}: the head's input or the tail's output is not a tensor.")
    right = ", ".join(f"({s.head!r}, {s.tail!r}) [{s.kind}]" for s in subs or [])
    advice = f" The residual sub-blocks of this block are: {right}." if right else ""
    if subs is None:
        later = [c.input for c in rec.calls if c.input is not None and c.start > rec.called(tail)[0].end]
        if not (_close(o, rec.y) or any(_close(h.float() + o.float(), t) for t in [*later, rec.y] if t is not None)):
            raise ValueError(
                f"The {where} is not a residual sub-block: the tail's output plus the head's input is no later state "
                "of the block, and the tail's output is not the block's output."
            )
        return int(h.shape[-1]), int(o.shape[-1])
    matched = None
    for sub in subs:
        ref = rec.called(sub.tail)[0].output
        if _close(o, ref):
            matched = sub
            break
    if matched is None:
        consumer = next((c for c in rec.calls if c.start > rec.called(tail)[0].end and _close(c.input, o)), None)
        through = (
            f" passes through {consumer.name!r} ({type(consumer.module).__name__})"
            if consumer
            else " is changed by an operation outside any module"
        )
        raise ValueError(
            f"The {where}: what {tail!r} returns{through} before it joins the residual stream, so the control would "
            f"not be added to the stream.{advice}"
        )
    state = rec.called(matched.head)[0].input
    if not _close(h, state):
        raise ValueError(
            f"The {where}: the head {head!r} reads {_describe(rec, h)}, not the residual state entering the "
            f"sub-block that {tail!r} closes (read by {matched.head!r}). Use ({matched.head!r}, {matched.tail!r})."
            + advice
        )
    return int(h.shape[-1]), int(o.shape[-1])
