"""Depth-scaled learning rates for state-ctrl bridges: each bridge's lr divided by the RMS of the state it reads.

A bridge adds ``alpha * B A h`` with h the residual stream, whose scale grows with depth (SmolLM2-135M: RMS 0.14
before layer 0's MLP, up to about 100 deeper). Adam moves every entry of B by about lr per step, so the change of the
control, ``dB A h``, is proportional to RMS(h): one lr is far too small for the first layer when it is right
for the deepest. LoRA does not meet this, because its linears read normed states (RMS about 1).
``depth_scaled_param_groups`` gives bridge l the learning rate ``lr / RMS(h_l)``, measured once on a batch, so
every layer's control moves at the rate of a unit-scale input, like LoRA; other trainable parameters (the LoRA
part of Control+LoRA, ``modules_to_save``) keep ``lr``. Nothing changes in the model, its memory or its saved
adapter. Measured on the commonsense validation split it did worse than one lr (docs/commonsense.md), so it is an
option, not state-ctrl's default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def bridge_input_rms(model: nn.Module, run: Callable[[], Any]) -> dict[str, float]:
    """The RMS of the state h each state-ctrl bridge reads, over every element of one forward pass ``run()``
    (called without gradients). Keys are the bridge layers' module names."""
    from peft_ctrl.state_ctrl import StateCtrlLayer

    modules = dict(model.named_modules())
    layers = {name: m for name, m in modules.items() if isinstance(m, StateCtrlLayer)}
    if not layers:
        raise ValueError("The model has no state-ctrl bridges; depth-scaled learning rates apply to bridges only.")
    squares: dict[str, list[float]] = {name: [] for name in layers}
    handles = []
    for name, layer in layers.items():
        head_name = next(iter(layer.head_name.values()))  # relative to the tuner's model: match it as a suffix
        head = next(m for n, m in modules.items() if n == head_name or n.endswith("." + head_name))

        def record(module: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            h = args[0] if args else kwargs.get("hidden_states")
            squares[name].append(h.detach().float().pow(2).mean().item())

        handles.append(head.register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sum(v) / len(v)) ** 0.5 for name, v in squares.items() if v}


def depth_scaled_param_groups(model: nn.Module, lr: float, input_rms: dict[str, float]) -> list[dict[str, Any]]:
    """Optimizer parameter groups: bridge ``name``'s trainable weights at ``lr / input_rms[name]``, every other
    trainable parameter at ``lr``. Pass them to any ``torch.optim`` optimizer (or Trainer's ``optimizers``)."""
    if not input_rms:
        raise ValueError("input_rms is empty; measure it with bridge_input_rms(model, run) first.")
    groups, seen = [], set()
    for name, rms in input_rms.items():
        if not rms > 0:
            raise ValueError(f"Bridge {name!r} reads a state of RMS {rms}; it must be positive.")
        params = [p for n, p in model.get_submodule(name).named_parameters() if p.requires_grad and "state_ctrl_" in n]
        seen.update(id(p) for p in params)
        groups.append({"params": params, "lr": lr / rms, "bridge": name})
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    if rest:
        groups.append({"params": rest, "lr": lr})
    return groups
