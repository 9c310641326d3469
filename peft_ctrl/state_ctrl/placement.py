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

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import ATTENTION_INPUTS
from .decompose import KINDS, SubBlock, Undecomposable, check_bridge, decompose
from .probe import (
    SKIP_HINT,
    BlockRecord,
    _close,
    find_stacks,
    probe_inputs,
    record,
    representatives,
)

# ------------------------------------------------------------------------------------------------ the placement


@dataclass
class Placement:
    """Where one adapter's bridges go: tail module -> head module, each tail's (input, output) state widths and
    causality, and the Linear modules that Control+LoRA's ``"attention-inputs"`` stands for."""

    plan: dict[str, str] = field(default_factory=dict)
    widths: dict[str, tuple[int, int]] = field(default_factory=dict)
    causal: dict[str, bool | None] = field(default_factory=dict)
    attention_inputs: set[str] = field(default_factory=set)


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


def _join(block: str, name: str) -> str:
    """A module path relative to ``block`` as a path in the model."""
    return f"{block}.{name}" if block else name


def _probe_forward(model: nn.Module, inputs: dict[str, torch.Tensor]):
    """The probe's forward on the built ``inputs`` (without a KV cache where the model keeps one)."""
    cache = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    return lambda: model(**inputs, **cache)


def _probe(
    model: nn.Module, blocks: list[str], run: Any
) -> tuple[dict[str, str], dict[str, BlockRecord], dict[str, list[SubBlock] | None], list[str]]:
    """Run the probe on the first block of each structure among ``blocks``: each block's representative, the
    representatives' records and sub-blocks (None where a block does not decompose) and the reasons why not."""
    reps = representatives(model, blocks)
    records = record(model, sorted(set(reps.values())), run)
    subs: dict[str, list[SubBlock] | None] = {}
    reasons = []
    for name, rec in records.items():
        try:
            subs[name] = decompose(rec)
        except Undecomposable as err:
            subs[name] = None
            reasons.append(str(err))
    return reps, records, subs, reasons


def _attention_causal(subs: list[SubBlock] | None) -> bool | None:
    """Whether the block's self-attention is causal, as the probe saw it (None: unknown or no attention)."""
    return next((s.causal for s in subs or [] if s.kind == "attn"), None)


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
    _, _, subs, reasons = _probe(model, [b for bs in stacks.values() for b in bs], _probe_forward(model, inputs))
    if reasons:
        raise Undecomposable("; ".join(reasons))
    return {name: [s for s in found if s.kind in KINDS[blocks]] for name, found in subs.items()}


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
    weights = _has_weights(model)
    inputs = probe_inputs(model) if weights else None
    if config.bridges is None:
        return _discover(model, config, stacks, keep, inputs, weights), None
    return _place_given(model, config, skip, stacks, keep, inputs, weights)


def _discover(model: nn.Module, config: Any, stacks: dict, keep: Any, inputs: Any, weights: bool) -> Placement:
    """Bridges found by the probe: one per sub-block of the configured kinds, in every kept block."""
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
            f"state-ctrl finds its bridges with one probe forward of {type(model).__name__}, but {why}. " + SKIP_HINT
        )
    placement = Placement()
    blocks = [b for stack in stacks.values() for b in stack]
    reps, records, subs, reasons = _probe(model, blocks, _probe_forward(model, inputs))
    for block in blocks:
        found = subs[reps[block]]
        if not keep(block) or found is None:
            continue
        for sub in found:
            if sub.kind in KINDS[config.blocks or "mlp"]:
                tail = _join(block, sub.tail)
                placement.plan[tail] = _join(block, sub.head)
                placement.widths[tail] = (sub.width, sub.width)
                placement.causal[tail] = _attention_causal(found)
        if config.lora_target_modules == ATTENTION_INPUTS:
            placement.attention_inputs |= {_join(block, n) for n in _attention_inputs(records[reps[block]], found)}
    if not placement.plan:
        detail = "; ".join(reasons) if reasons else f"no {config.blocks or 'mlp'} sub-block was found"
        raise ValueError(
            f"state-ctrl found no place for a bridge in {type(model).__name__} (block lists: "
            f"{sorted(stacks) or 'none'}): {detail}. Pass bridges=[(head, tail)] with module paths relative to "
            "one block: the control reads the input of head and is added to the output of tail."
        )
    return placement


def _place_given(
    model: nn.Module, config: Any, skip: list[str], stacks: dict, keep: Any, inputs: Any, weights: bool
) -> tuple[Placement, Any]:
    """The user's ``bridges``, matched in every kept block and checked by the probe (now, on the first forward
    when there is no probe input, or not at all with check_placement=False)."""
    want_attention_inputs = config.lora_target_modules == ATTENTION_INPUTS
    placement = Placement()
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
        placement.plan[key] = _join(block, head)
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
    _check_matched(model, placement, matched, _probe_forward(model, inputs), want_attention_inputs)
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
    reps, records, subs, _ = _probe(model, blocks, run)
    for key, (block, head, tail) in matched.items():
        rep = reps[block]
        widths = check_bridge(records[rep], subs[rep], head, tail)
        if compare_widths and placement.widths[key] != widths:
            raise ValueError(
                f"The bridge {placement.plan[key]!r} -> {key!r} was built for state widths {placement.widths[key]} "
                f"read off its modules, but the probe forward shows {widths}; pass the right bridges."
            )
        placement.widths[key] = widths
        placement.causal[key] = _attention_causal(subs[rep])
    if want_attention_inputs:
        for block in blocks:
            rec, found = records[reps[block]], subs[reps[block]] or []
            placement.attention_inputs |= {_join(block, n) for n in _attention_inputs(rec, found)}
