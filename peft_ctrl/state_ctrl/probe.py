"""The placement probe: one forward of a model on a few tokens, recording every module call inside the first
block of each structure (its first input and output tensor, copied), then stopped. ``peft_ctrl.state_ctrl.decompose``
reads the records; ``peft_ctrl.state_ctrl.placement`` decides the bridges from them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peft_ctrl._registry import adapters_disabled

from .layer import first_tensor

PROBE_TOKENS = 6
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


class _Recorder:
    """Forward hooks on blocks and every module inside them, each call stamped by one shared clock."""

    def __init__(self, blocks: list[str]) -> None:
        self.records = {b: BlockRecord(b) for b in blocks}
        self.clock = 0
        self.handles: list[Any] = []

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def watch_block(self, rec: BlockRecord, block: nn.Module) -> None:
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if rec.x0 is None:
                rec.x0 = _copy(first_tensor(args, kwargs))

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if rec.end < 0:
                rec.y, rec.end = _copy(_first_output(output)), self.tick()
            if all(r.end >= 0 for r in self.records.values()):
                raise _ProbeDone

        self.handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(block.register_forward_hook(post, with_kwargs=True))
        for name, module in block.named_modules():
            if name:
                self.watch_call(rec, name, module)

    def watch_call(self, rec: BlockRecord, name: str, module: nn.Module) -> None:
        open_calls: list[Call] = []

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if rec.end < 0 and rec.x0 is not None:
                call = Call(name, module, self.tick(), input=_copy(first_tensor(args, kwargs)))
                rec.calls.append(call)
                open_calls.append(call)

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if open_calls:
                call = open_calls.pop()
                call.output, call.end = _copy(_first_output(output)), self.tick()

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(post, with_kwargs=True))


def record(model: nn.Module, blocks: list[str], run: Any) -> dict[str, BlockRecord]:
    """Run ``run()`` (one forward of ``model``) with hooks on ``blocks`` and every module inside them; stop the
    forward once all have run. Returns each block's record."""
    recorder = _Recorder(blocks)
    for name, rec in recorder.records.items():
        recorder.watch_block(rec, model.get_submodule(name))
    try:
        with torch.no_grad(), _eval_mode(model), adapters_disabled(model):
            run()
    except _ProbeDone:
        pass
    finally:
        for handle in recorder.handles:
            handle.remove()
    missing = [b for b, rec in recorder.records.items() if rec.end < 0]
    if missing:
        raise ValueError(
            f"The placement probe ran {type(model).__name__} on {PROBE_TOKENS} tokens, but block(s) {missing} never "
            f"ran. {SKIP_HINT}"
        )
    return recorder.records
