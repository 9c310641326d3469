"""Where a state-ctrl bridge goes, found and checked on the model itself with one probe forward.

A bridge ``(head, tail)`` spans one residual sub-block of a repeated block: the control reads the input of
``head`` (the residual state h entering the sub-block) and is added to the output of ``tail`` (what joins the
residual stream). Nothing here looks a family up by name. The probe runs the model on a few tokens (no grad, eval
mode, the model's own dtype and device) and stops as soon as the first block of each kind has run; hooks record
every module call inside those blocks (its first input and output tensor). The block is then decomposed from its
output backwards into residual sub-blocks, by values only:

* **additive** (pre-norm LLaMA, sandwich norms Gemma2/3 and OLMo2, layer scale): ``s' = s + o`` with o the output
  of the outermost module that returns it (for sandwich norms that is the branch's own output norm);
* **parallel** (GPT-J, Falcon, GPT-NeoX, Phi, Cohere): ``s' = s + o_attn + o_mlp``, both read from s;
* **post-norm** (the BERT family, DistilBERT, BART): ``s' = N(s + o)`` for a norm N: the control is added after
  the module whose output is s'.

The head is the outermost module that reads s before the tail runs; the state width is the width of the probed
tensors. A sub-block is an attention sub-block when a module whose class name says attention runs inside it
(cross-attention when its name says ``cross``, ``encoder_attn`` or ``EncDec``), else an MLP sub-block (a whole
MoE block, router included, is one module's output). Bridges given by the user are checked against the same
decomposition: a head that does not read the state entering its sub-block, or a tail whose output passes through
a norm or another module before it joins the stream, is a ``ValueError`` naming what it reads and the right
placement.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peft_ctrl._registry import adapters_disabled

from .config import ATTENTION_INPUTS
from .layer import first_tensor

PROBE_TOKENS = 6
KINDS = {"mlp": ("mlp",), "attn": ("attn", "cross"), "both": ("attn", "cross", "mlp")}
_ATTENTION = re.compile(r"attention|attn", re.IGNORECASE)
_CROSS = re.compile(r"cross|encoder_attn|encdec", re.IGNORECASE)
SKIP_HINT = (
    "To skip the probe (e.g. on a meta-device or sharded model), pass the bridges yourself with "
    "check_placement=False; `peft_ctrl.state_ctrl.find_bridges(model)` on any real-weight copy of the architecture "
    "(a tiny random one built from the same config will do) prints them."
)


class _ProbeDone(Exception):
    """Raised from a hook once every probed block has run: the rest of the forward is not needed."""


@dataclass
class Call:
    """One module call inside a probed block: its name relative to the block and its first tensors."""

    name: str
    module: nn.Module
    start: int
    end: int = -1
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None

    @property
    def depth(self) -> int:
        return self.name.count(".")


@dataclass
class BlockRecord:
    """What one probe forward saw of one block: its input and output state and every module call inside it."""

    name: str
    x0: torch.Tensor | None = None
    y: torch.Tensor | None = None
    calls: list[Call] = field(default_factory=list)
    end: int = -1

    def called(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]


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


def _first_output(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if isinstance(value, dict):
        return next((v for v in value.values() if isinstance(v, torch.Tensor)), None)
    return None


def _copy(t: torch.Tensor | None) -> torch.Tensor | None:
    """A copy of a probed tensor: blocks may change their tensors in place later (Falcon adds attention to the MLP
    output in place), and the probe needs the values each module saw and returned."""
    return None if t is None else t.detach().clone()


def _as(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.detach().float().reshape(like.shape)


def _tolerance(t: torch.Tensor) -> float:
    return 1e-5 if t.dtype in (torch.float32, torch.float64) else 1e-2


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same state shape up to flattening the token axes (OPT runs its MLP on (batch * tokens, d))."""
    return a.shape == b.shape or (
        a.numel() == b.numel() and a.dim() > 0 and b.dim() > 0 and a.shape[-1] == b.shape[-1]
    )


def _close(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Equal within the rounding of the probe's dtype, element by element."""
    if a is None or b is None or not _same_shape(a, b):
        return False
    if a is b:
        return True
    a, b = a.detach().float().reshape(b.shape), b.detach().float()
    return bool(_within(a - b, a.abs() + b.abs(), max(_tolerance(a), _tolerance(b))).all())


def _within(diff: torch.Tensor, magnitude: torch.Tensor, tol: float) -> torch.Tensor:
    """``|diff| <= tol * magnitude`` element by element, with a floor of ``tol * 1e-3 * max(magnitude)`` (exact
    zeros). ``magnitude`` is the size of the terms the values came from, which bounds their rounding error."""
    return diff.abs() <= tol * (magnitude + 1e-3 * float(magnitude.max()) + 1e-30)


# ---------------------------------------------------------------------------------------------- blocks and probe


def find_stacks(model: nn.Module) -> dict[str, list[str]]:
    """The model's lists of repeated blocks, ``{list name: [block names]}``: every ``nn.ModuleList`` whose entries
    hold parameters and that is not inside an entry of another such list (expert lists inside an MoE block and
    T5's sub-layer lists are parts of a block, not stacks)."""
    stacks: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if any(name.startswith(f"{s}.") for s in stacks):
            continue
        if not all(any(True for _ in child.parameters()) for child in module):
            continue
        prefix = f"{name}." if name else ""
        stacks[name] = [f"{prefix}{i}" for i in range(len(module))]
    return stacks


def _signature(module: nn.Module) -> tuple:
    return tuple((name, type(m).__name__) for name, m in module.named_modules())


def representatives(model: nn.Module, blocks: list[str]) -> dict[str, str]:
    """Each block -> the first block of the same structure (names and classes of all its modules): the one the
    probe runs. Blocks of one structure in one model are assumed to share their placement."""
    first: dict[tuple, str] = {}
    out = {}
    for block in blocks:
        sig = (type(model.get_submodule(block)).__name__, _signature(model.get_submodule(block)))
        out[block] = first.setdefault(sig, block)
    return out


def probe_inputs(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """A few tokens (or a tiny image / spectrogram) for ``model``'s forward, built from its config; ``None`` when
    the model has no transformers config to build them from."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    main = getattr(model, "main_input_name", "input_ids")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    ids = (torch.arange(PROBE_TOKENS, device=device) % max(vocab - 3, 1) + 3).unsqueeze(0)
    if main == "input_ids" and vocab:
        batch: dict[str, torch.Tensor] = {"input_ids": ids}
    elif main == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        batch = {"pixel_values": torch.randn(1, getattr(config, "num_channels", 3), size, size, device=device)}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    elif main == "input_features" and hasattr(config, "num_mel_bins"):
        frames = 2 * int(getattr(config, "max_source_positions", 1500))
        batch = {"input_features": torch.randn(1, config.num_mel_bins, frames, device=device).to(dtype)}
    else:
        return None
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None)
        start = start if isinstance(start, int) else 0
        batch["decoder_input_ids"] = torch.full((1, 3), start, device=device)
    return batch


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def record(model: nn.Module, blocks: list[str], run: Any) -> dict[str, BlockRecord]:
    """Run ``run()`` (one forward of ``model``) with hooks on ``blocks`` and every module inside them; stop the
    forward once all have run. Returns each block's record."""
    records = {b: BlockRecord(b) for b in blocks}
    clock = [0]
    handles = []

    def tick() -> int:
        clock[0] += 1
        return clock[0]

    def watch_block(rec: BlockRecord, block: nn.Module) -> None:
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if rec.x0 is None:
                rec.x0 = _copy(first_tensor(args, kwargs))

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if rec.end < 0:
                rec.y, rec.end = _copy(_first_output(output)), tick()
            if all(r.end >= 0 for r in records.values()):
                raise _ProbeDone

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
        for name, module in block.named_modules():
            if name:
                watch_call(rec, name, module)

    def watch_call(rec: BlockRecord, name: str, module: nn.Module) -> None:
        open_calls: list[Call] = []

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if rec.end < 0 and rec.x0 is not None:
                call = Call(name, module, tick(), input=_copy(first_tensor(args, kwargs)))
                rec.calls.append(call)
                open_calls.append(call)

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if open_calls:
                call = open_calls.pop()
                call.output, call.end = _copy(_first_output(output)), tick()

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))

    for name, rec in records.items():
        watch_block(rec, model.get_submodule(name))
    try:
        with torch.no_grad(), _eval_mode(model), adapters_disabled(model):
            run()
    except _ProbeDone:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [b for b, rec in records.items() if rec.end < 0]
    if missing:
        raise ValueError(
            f"The placement probe ran {type(model).__name__} on {PROBE_TOKENS} tokens, but block(s) {missing} never "
            f"ran. {SKIP_HINT}"
        )
    return records


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
        self.shape = rec.x0.shape
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


# ------------------------------------------------------------------------------------------------ the placement


@dataclass
class Placement:
    """Where one adapter's bridges go: tail module -> head module, each tail's (input, output) state widths and
    causality, and the Linear modules that Control+LoRA's ``"attention-inputs"`` stands for."""

    plan: dict[str, str] = field(default_factory=dict)
    widths: dict[str, tuple[int, int]] = field(default_factory=dict)
    causal: dict[str, bool | None] = field(default_factory=dict)
    attention_inputs: set[str] = field(default_factory=set)
    checked: bool = False


def _has_weights(model: nn.Module) -> bool:
    return all(not p.is_meta and p.numel() > 0 for p in model.parameters())


def _block_index(block: str, stacks: dict[str, list[str]]) -> tuple[str, int] | None:
    """(stack name, index) of a block that is an entry of one of ``stacks``."""
    stack, _, index = block.rpartition(".")
    return (stack, int(index)) if stack in stacks and index.isdigit() else None


def _layer_filter(config: Any, stacks: dict[str, list[str]]):
    """A predicate on block names from ``layers_to_transform`` / ``layers_pattern`` (indices within each stack),
    after checking that every index exists and every pattern names a stack."""
    layers = config.layers_to_transform
    if layers is None:
        return lambda block: True
    wanted = {layers} if isinstance(layers, int) else set(layers)
    patterns = config.layers_pattern
    patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
    chosen = {name: blocks for name, blocks in stacks.items() if not patterns or name.rpartition(".")[2] in patterns}
    if not chosen:
        raise ValueError(
            f"layers_pattern={config.layers_pattern!r} names none of the model's block lists "
            f"{sorted(n.rpartition('.')[2] for n in stacks) or 'none found'}."
        )
    longest = max(len(blocks) for blocks in chosen.values())
    beyond = sorted(i for i in wanted if i >= longest)
    if beyond:
        sizes = ", ".join(f"{name or 'top level'}: {len(blocks)}" for name, blocks in chosen.items())
        raise ValueError(
            f"layers_to_transform has layer indices {beyond}, but the model's block lists ({sizes}) have at most "
            f"{longest} blocks (indices 0 to {longest - 1})."
        )

    def keep(block: str) -> bool:
        where = _block_index(block, chosen)
        return where is not None and where[1] in wanted

    return keep


def _probe(model: nn.Module, blocks: list[str], inputs: dict[str, torch.Tensor]) -> dict[str, BlockRecord]:
    reps = sorted(set(representatives(model, blocks).values()))
    return record(model, reps, lambda: model(**inputs, **({"use_cache": False} if _takes_use_cache(model) else {})))


def _takes_use_cache(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "use_cache")


def _attention_inputs(rec: BlockRecord, subs: list[SubBlock]) -> list[str]:
    """The projections that read the input of each self-attention sub-block (q, k, v or a fused qkv): the first
    projection the sub-block runs and every other one that reads the same tensor."""
    names: list[str] = []
    since = -1
    for sub in subs:
        tail = rec.called(sub.tail)[0]
        if sub.kind == "attn":
            linears = [
                c
                for c in rec.calls
                if since < c.start < tail.end and _is_projection(_linear_of(c.module)) and c.input is not None
            ]
            linears = [c for c in linears if not any(c.name.startswith(f"{o.name}.") for o in linears)]
            if linears:
                first = linears[0].input
                names += [c.name for c in linears if _close(c.input, first)]
        since = tail.end
    return names


def _is_projection(module: nn.Module) -> bool:
    """A leaf module with a 2-D weight: nn.Linear, or another projection (transformers' Conv1D in GPT-2), which
    Control+LoRA then refuses by name rather than skipping it silently."""
    weight = getattr(module, "weight", None)
    return not any(True for _ in module.children()) and isinstance(weight, torch.Tensor) and weight.dim() == 2


def _linear_of(module: nn.Module) -> nn.Module:
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def find_bridges(model: nn.Module, blocks: str = "both") -> dict[str, list[SubBlock]]:
    """The residual sub-blocks the probe finds in ``model``, for each distinct block structure: ``{first block of
    that structure: [SubBlock, ...]}``, restricted to ``blocks`` ("mlp", "attn" (self- and cross-attention) or
    "both"). ``[(s.head, s.tail) for s in ...]`` are the ``bridges`` to pass where the probe cannot run."""
    stacks = find_stacks(model)
    inputs = probe_inputs(model)
    if inputs is None:
        raise ValueError(f"{type(model).__name__} has no transformers config to build a probe input from.")
    records = _probe(model, [b for blocks_ in stacks.values() for b in blocks_], inputs)
    return {name: [s for s in decompose(rec) if s.kind in KINDS[blocks]] for name, rec in records.items()}


def _guess_widths(model: nn.Module, head: nn.Module, tail: nn.Module) -> tuple[int, int] | None:
    """Widths of an unchecked bridge (``check_placement=False``): the model config's hidden size (the width of
    every residual state), else read off the modules (the head's norm size or first linear input, the tail's norm
    size or last linear output)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "d_model", "dim"):
        width = getattr(text, name, None)
        if isinstance(width, int) and width > 0:
            return width, width

    def first_in(module: nn.Module) -> int | None:
        for sub in module.modules():
            shape = getattr(sub, "normalized_shape", None)
            weight = getattr(sub, "weight", None)
            if shape:
                return int(shape[-1])
            if isinstance(weight, torch.Tensor) and weight.dim() == 1:
                return weight.shape[0]
            if isinstance(sub, nn.Linear):
                return sub.in_features
            if type(sub).__name__ == "Conv1D":
                return sub.weight.shape[0]
        return None

    def last_out(module: nn.Module) -> int | None:
        width = None
        for sub in module.modules():
            shape = getattr(sub, "normalized_shape", None)
            if isinstance(sub, nn.Linear):
                width = sub.out_features
            elif type(sub).__name__ == "Conv1D":
                width = sub.weight.shape[1]
            elif shape:
                width = int(shape[-1])
        return width

    widths = first_in(head), last_out(_linear_of(tail))
    return None if None in widths else widths  # type: ignore[return-value]


def _match_bridges(model: nn.Module, pairs: list[tuple[str, str]], skip: list[str]) -> dict[str, tuple[str, str, str]]:
    """User bridges on ``model``: ``{tail key: (block, head, tail)}`` where block + head and block + tail exist."""
    modules = dict(model.named_modules())
    found: dict[str, tuple[str, str, str]] = {}
    for key in modules:
        if not key or any(key.startswith(prefix) for prefix in skip):
            continue
        for head, tail in pairs:
            if key != tail and not key.endswith("." + tail):
                continue
            block = key[: len(key) - len(tail)].rstrip(".")
            head_key = f"{block}.{head}" if block else head
            if head_key not in modules:
                continue
            if key in found and found[key][1] != head:
                raise ValueError(f"Module {key!r} is the tail of two bridges (heads {found[key][1]!r} and {head!r}).")
            found[key] = (block, head, tail)
    return found


def place(model: nn.Module, config: Any, skip: list[str]) -> tuple[Placement, Any]:
    """The placement of ``config``'s bridges on ``model`` (modules under a prefix in ``skip`` are adapter
    internals). Returns it and, when the check has to wait for the model's first forward (a model without a
    transformers config to build a probe input from), a function that runs it on that forward's arguments."""
    stacks = find_stacks(model)
    keep = _layer_filter(config, stacks)
    placement = Placement()
    weights = _has_weights(model)
    inputs = probe_inputs(model) if weights else None
    want_attention_inputs = config.lora_target_modules == ATTENTION_INPUTS
    if config.bridges is None:
        if not config.check_placement:
            raise ValueError(
                "check_placement=False skips the probe that finds the bridges, so give them: "
                "StateCtrlConfig(bridges=[(head, tail)], check_placement=False). " + SKIP_HINT
            )
        if inputs is None:
            why = (
                "its weights are not materialised (meta device or sharded)"
                if not weights
                else ("it has no transformers config to build a probe input from")
            )
            raise ValueError(
                f"state-ctrl finds its bridges with one probe forward of {type(model).__name__}, but {why}. "
                + SKIP_HINT
            )
        blocks = [b for stack in stacks.values() for b in stack]
        records = _probe(model, blocks, inputs)
        subs, reasons = {}, []
        for name, rec in records.items():
            try:
                subs[name] = decompose(rec)
            except Undecomposable as err:
                reasons.append(str(err))
        reps = representatives(model, blocks)
        for block in blocks:
            if not keep(block) or reps[block] not in subs:
                continue
            found = subs[reps[block]]
            causal = next((s.causal for s in found if s.kind == "attn"), None)
            for sub in found:
                if sub.kind in KINDS[config.blocks or "mlp"]:
                    tail = f"{block}.{sub.tail}" if block else sub.tail
                    placement.plan[tail] = f"{block}.{sub.head}" if block else sub.head
                    placement.widths[tail] = (sub.width, sub.width)
                    placement.causal[tail] = causal
            if want_attention_inputs:
                rec = records[reps[block]]
                placement.attention_inputs |= {f"{block}.{n}" for n in _attention_inputs(rec, found)}
        if not placement.plan:
            detail = "; ".join(reasons) if reasons else f"no {config.blocks or 'mlp'} sub-block was found"
            raise ValueError(
                f"state-ctrl found no place for a bridge in {type(model).__name__} (block lists: "
                f"{sorted(stacks) or 'none'}): {detail}. Pass bridges=[(head, tail)] with module paths relative to "
                "one block: the control reads the input of head and is added to the output of tail."
            )
        placement.checked = True
        return placement, None

    matched = {k: v for k, v in _match_bridges(model, list(config.bridges), skip).items() if keep(v[0]) or not stacks}
    if config.layers_to_transform is not None and not stacks:
        raise ValueError("layers_to_transform needs a list of blocks (an nn.ModuleList), and the model has none.")
    if not matched:
        sample = ", ".join([k for k in dict(model.named_modules()) if k][:12])
        raise ValueError(
            f"No state-ctrl bridge matched {type(model).__name__}: looked for sibling modules named P+head and P+tail "
            f"for (head, tail) in {config.bridges}. Module names start with: {sample} ... Pass `bridges` with paths "
            "that exist in one block (print(model) shows them)."
        )
    for key, (block, head, _) in matched.items():
        placement.plan[key] = f"{block}.{head}" if block else head
    if config.check_placement and not weights:
        raise ValueError(
            f"state-ctrl checks the bridges with one probe forward of {type(model).__name__}, but its weights are not "
            "materialised (meta device or sharded). " + SKIP_HINT
        )
    if not config.check_placement or inputs is None:
        for key in matched:
            widths = _guess_widths(model, model.get_submodule(placement.plan[key]), model.get_submodule(key))
            if widths is None:
                raise ValueError(
                    f"Cannot tell the state width of bridge {placement.plan[key]!r} -> {key!r} without the probe; "
                    "leave check_placement=True so that it is read from the tensors."
                )
            placement.widths[key] = widths
        if want_attention_inputs:
            raise ValueError(
                "lora_target_modules='attention-inputs' is found by the placement probe, which cannot run here; name "
                "the Linear modules, e.g. ['q_proj', 'k_proj', 'v_proj']."
            )
        if not config.check_placement:
            return placement, None

        def deferred(args: tuple, kwargs: dict) -> None:
            _check_matched(model, placement, matched, lambda: model(*args, **kwargs), compare_widths=True)

        return placement, deferred
    _check_matched(model, placement, matched, lambda: model(**inputs), want_attention_inputs)
    return placement, None


def _check_matched(
    model: nn.Module,
    placement: Placement,
    matched: dict[str, tuple[str, str, str]],
    run: Any,
    want_attention_inputs: bool = False,
    compare_widths: bool = False,
) -> None:
    """Probe the blocks of the user's bridges and check each bridge there (see ``check_bridge``)."""
    blocks = sorted({block for block, _, _ in matched.values()})
    reps = representatives(model, blocks)
    records = record(model, sorted(set(reps.values())), run)
    subs: dict[str, list[SubBlock] | None] = {}
    for name, rec in records.items():
        try:
            subs[name] = decompose(rec)
        except Undecomposable:
            subs[name] = None
    for key, (block, head, tail) in matched.items():
        rep = reps[block]
        widths = check_bridge(records[rep], subs[rep], head, tail)
        if compare_widths and placement.widths[key] != widths:
            raise ValueError(
                f"The bridge {placement.plan[key]!r} -> {key!r} was built for state widths {placement.widths[key]} "
                f"read off its modules, but the probe forward shows {widths}; pass the right bridges."
            )
        placement.widths[key] = widths
        found = subs[rep] or []
        placement.causal[key] = next((s.causal for s in found if s.kind == "attn"), None)
    if want_attention_inputs:
        for block in blocks:
            rec, found = records[reps[block]], subs[reps[block]] or []
            placement.attention_inputs |= {f"{block}.{n}" if block else n for n in _attention_inputs(rec, found)}
    placement.checked = True
