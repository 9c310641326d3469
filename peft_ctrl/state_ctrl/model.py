from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TaskType
from torch import nn

from peft_ctrl._registry import StrictLoadMixin, matches_target, set_active_adapter
from peft_ctrl.linear_adapter import install_linear_adapter, linear_base
from peft_ctrl.ops.lean_mlp import lean_mlp, restore_mlp

from .config import ATTENTION_INPUTS, StateCtrlConfig
from .layer import MERGE_ERROR, ForwardContext, StateCtrlLayer, StateCtrlLoraLayer, StateCtrlTunerLayer
from .placement import Placement, place


def _is_causal(model: nn.Module, config: StateCtrlConfig, probed: set[bool | None]) -> bool | None:
    """Whether the attention controller must mask later tokens: the config's ``causal``, else what the probed
    attention modules say (``is_causal``), else the task type, the config's ``is_decoder`` or whether the model
    generates text without an encoder."""
    if config.causal is not None:
        return config.causal
    known = probed - {None}
    if len(known) == 1:
        return known.pop()
    if config.task_type == TaskType.CAUSAL_LM:
        return True
    model_config = getattr(model, "config", None)
    if getattr(model_config, "is_decoder", False):
        return True
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate() and not getattr(model_config, "is_encoder_decoder", False):
        return True
    return None


def _tuner_prefixes(modules: dict[str, nn.Module]) -> list[str]:
    """``"name."`` of every adapter layer already in the model: modules below one are not targets again."""
    return [name + "." for name, m in modules.items() if isinstance(m, BaseTunerLayer)]


def resolve_lora_targets(model: nn.Module, config: StateCtrlConfig, placement: Placement) -> set[str]:
    """The Linear modules that get Control+LoRA (``config.lora_target_modules``, filtered by
    ``layers_to_transform`` like the bridges, or the probe's attention inputs). A target inside a bridged tail
    module is a ``ValueError``: the tail is wrapped whole, so a LoRA inside it would be hidden from the adapter's
    bookkeeping."""
    if config.lora_target_modules is None:
        return set()
    plan = placement.plan
    inside_tuner = _tuner_prefixes(dict(model.named_modules()))
    found = set()
    for key, module in model.named_modules():
        if not key or any(key.startswith(prefix) for prefix in inside_tuner):
            continue
        if config.lora_target_modules == ATTENTION_INPUTS:
            if key not in placement.attention_inputs:
                continue
        elif not any(matches_target(key, target, config) for target in config.lora_target_modules):
            continue
        if isinstance(module, BaseTunerLayer) and not isinstance(module, StateCtrlLoraLayer):
            raise ValueError(f"Control+LoRA target {key!r} already holds an adapter of another method.")
        linear_base(module, "Control+LoRA", key)
        tail = next((t for t in plan if key.startswith(t + ".")), None)
        if tail is not None:
            raise ValueError(
                f"Control+LoRA target {key!r} lies inside the bridged block {tail!r}; put LoRA on linears outside "
                "the bridged blocks (e.g. blocks='mlp' with lora_target_modules=['q_proj', 'k_proj', 'v_proj'])."
            )
        found.add(key)
    if not found:
        raise ValueError(
            f"No module matched lora_target_modules={config.lora_target_modules!r}"
            + (f" in layers {config.layers_to_transform!r}" if config.layers_to_transform is not None else "")
            + "; give Linear module names that exist in the model (print(model) shows them)."
        )
    return found


class StateCtrlModel(StrictLoadMixin, BaseTuner):
    """Tuner that adds state-based parallel control edges to a model (see ``StateCtrlConfig``).

    Each bridged sub-block's tail module is wrapped in a ``StateCtrlLayer``; the head module gets a forward
    pre-hook that hands its input h to that layer. Merging is impossible (the bridged body is nonlinear), so
    ``merge_and_unload`` raises; ``unload``, ``disable_adapter``, multiple adapters and save/load work as in peft.
    """

    prefix: str = "state_ctrl_"
    method_name = "state-ctrl"
    # Set by _prepare_model: the bridge plan, causality, and the per-call context shared with the layers.
    _plan: dict[str, str] = {}
    _placement: Placement | None = None
    _pending_check = None
    _lora_targets: set[str] = set()
    _causal: bool = False
    _context: ForwardContext | None = None
    _call_hook: torch.utils.hooks.RemovableHandle | None = None
    tuner_layer_cls = StateCtrlTunerLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: StateCtrlConfig, model_config: dict) -> StateCtrlConfig:
        return peft_config

    def _prepare_model(self, peft_config: StateCtrlConfig, model: nn.Module) -> None:
        placement, deferred = place(model, peft_config, _tuner_prefixes(dict(model.named_modules())))
        causal = _is_causal(model, peft_config, set(placement.causal.values()))
        if peft_config.controller == "attention":
            if causal is None:
                raise ValueError(
                    "controller='attention' mixes tokens, so it must know whether the model is causal, and neither "
                    "the probe nor the config tells. Set StateCtrlConfig(causal=True) for a decoder, False otherwise."
                )
            if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
                raise ValueError(
                    "controller='attention' takes the padding mask of the model's input, which is not the "
                    "decoder's in an encoder-decoder model; use controller='linear' there."
                )
        narrow = {tail: w for tail, w in placement.widths.items() if peft_config.r > min(w)}
        if narrow:
            # A warning, not an error: it trains correctly, and one recipe (r=64, say) is often shared between a
            # small test model and the real one.
            tail, widths = next(iter(narrow.items()))
            warnings.warn(
                f"StateCtrlConfig(r={peft_config.r}) is above the state width {min(widths)} of bridge "
                f"{placement.plan[tail]!r} -> {tail!r} ({len(narrow)} bridges): B A has rank at most {min(widths)}, "
                f"so the extra rank only adds parameters. r <= {min(widths)} trains the same function class.",
                stacklevel=2,
            )
        self._placement, self._plan = placement, placement.plan
        self._pending_check = deferred
        self._lora_targets = resolve_lora_targets(model, peft_config, placement)
        self._causal = bool(causal)
        if peft_config.lean_mlp:
            lean_mlp(model)
        else:
            restore_mlp(model)
        if self._context is None:
            self._context = ForwardContext()
            self._call_hook = model.register_forward_pre_hook(self._record_call, with_kwargs=True)

    def _record_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        check, self._pending_check = self._pending_check, None
        if check is not None:  # a model without a probe input: its bridges are checked on its first forward
            check(args, kwargs)
        self._context.record(args, kwargs)

    def _check_target_module_exists(self, peft_config: StateCtrlConfig, key: str) -> bool:
        return key in self._plan or key in self._lora_targets

    def _create_and_replace(
        self,
        peft_config: StateCtrlConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if current_key in self._lora_targets:
            settings = {
                "r": peft_config.lora_r,
                "scaling": peft_config.lora_scaling,
                "dropout": float(peft_config.lora_dropout),
                "init_weights": peft_config.init_weights,
                "inference_mode": peft_config.inference_mode,
            }
            install_linear_adapter(
                self, StateCtrlLoraLayer, adapter_name, target, target_name, parent, current_key, **settings
            )
            return
        head_name = self._plan[current_key]
        head = self.model.get_submodule(head_name)
        if isinstance(target, StateCtrlLayer):
            layer = target
        else:
            in_features, out_features = self._placement.widths[current_key]
            layer = StateCtrlLayer(target, in_features, out_features, self._context)
            set_active_adapter(layer, adapter_name)
        layer.update_layer(
            adapter_name,
            head_name=head_name,
            head=head,
            r=peft_config.r,
            alpha=float(peft_config.alpha),
            dropout=float(peft_config.dropout),
            controller=peft_config.controller,
            causal=self._causal,
            init_weights=peft_config.init_weights,
            fused=peft_config.fused,
            inference_mode=peft_config.inference_mode,
        )
        if layer is not target:
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)
            self._replace_module(parent, target_name, layer, target)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise ValueError(MERGE_ERROR)

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any) -> nn.Module:
        if merge:
            raise ValueError(MERGE_ERROR)
        layers = [(name, m) for name, m in self.model.named_modules() if isinstance(m, StateCtrlTunerLayer)]
        for name, layer in layers:
            if isinstance(layer, StateCtrlLayer):
                layer.remove_hooks()
            parent_name, _, child_name = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child_name, layer.get_base_layer())
        if self._call_hook is not None:
            self._call_hook.remove()
            self._call_hook = self._context = None
        restore_mlp(self.model)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model
