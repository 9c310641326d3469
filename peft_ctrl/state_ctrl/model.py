from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TaskType
from torch import nn

from peft_ctrl._registry import StrictLoadMixin, matches_target, set_active_adapter
from peft_ctrl.linear_adapter import install_linear_adapter, linear_base
from peft_ctrl.ops.lean_mlp import lean_mlp, restore_mlp

from .architectures import bridges_for
from .config import StateCtrlConfig
from .layer import MERGE_ERROR, ForwardContext, StateCtrlLayer, StateCtrlLoraLayer, StateCtrlTunerLayer


def _input_width(module: nn.Module) -> int | None:
    """Width of the state a head module reads: a norm's size, else the first linear layer's input size."""
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.shape[0]
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            return sub.in_features
        if type(sub).__name__ == "Conv1D":  # transformers' GPT-2 linear, weight is (in, out)
            return sub.weight.shape[0]
    return None


def _output_width(module: nn.Module) -> int | None:
    """Width of a tail module's output: the last linear layer's output size (or a trailing norm's size)."""
    width = None
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            width = sub.out_features
        elif type(sub).__name__ == "Conv1D":
            width = sub.weight.shape[1]
    return width


def _is_causal(model: nn.Module, config: StateCtrlConfig, table_causal: bool | None) -> bool | None:
    if config.causal is not None:
        return config.causal
    if table_causal is not None:
        return table_causal
    if config.task_type == TaskType.CAUSAL_LM:
        return True
    return getattr(getattr(model, "config", None), "is_decoder", None)


def _tuner_prefixes(modules: dict[str, nn.Module]) -> list[str]:
    """``"name."`` of every adapter layer already in the model: modules below one are not targets again."""
    return [name + "." for name, m in modules.items() if isinstance(m, BaseTunerLayer)]


def resolve_bridges(model: nn.Module, config: StateCtrlConfig) -> tuple[dict[str, str], bool | None]:
    """Map every tail module name to its head module name for ``config`` on ``model``.

    Head and tail paths are relative to one block: a module named ``P + tail`` is a tail when ``P + head``
    exists too. ``layers_to_transform`` / ``layers_pattern`` / ``modules_to_save`` filter tails the way
    upstream peft filters ``target_modules``. Also returns whether the model is causal (``None`` = unknown).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table_causal = None
    if config.bridges is not None:
        pairs = list(config.bridges)
        try:
            table_causal = bridges_for(model_type, "mlp")[1]
        except ValueError:
            table_causal = None
    else:
        pairs, table_causal = bridges_for(model_type, config.blocks or "mlp")

    modules = dict(model.named_modules())
    inside_tuner = _tuner_prefixes(modules)
    plan: dict[str, str] = {}
    for key in modules:
        if not key or any(key.startswith(prefix) for prefix in inside_tuner):
            continue
        for head, tail in pairs:
            if key != tail and not key.endswith("." + tail):
                continue
            head_key = key[: len(key) - len(tail)] + head
            if head_key not in modules:
                continue
            if not matches_target(key, tail, config):
                continue
            if key in plan and plan[key] != head_key:
                raise ValueError(f"Module {key!r} is the tail of two bridges (heads {plan[key]!r} and {head_key!r}).")
            plan[key] = head_key
    if not plan:
        sample = ", ".join(list(k for k in modules if k)[:12])
        layers = ""
        if config.layers_to_transform is not None:
            layers = (
                f" with layers_to_transform={config.layers_to_transform!r} (if the layer list is a top-level "
                "module, name it with layers_pattern, e.g. layers_pattern='blocks')"
            )
        raise ValueError(
            f"No state-ctrl bridge matched {type(model).__name__}{layers}: looked for sibling modules named "
            f"P+head and P+tail for (head, tail) in {pairs}. Module names start with: {sample} ... Pass `bridges` "
            "with paths that exist in one block (print(model) shows them)."
        )
    return plan, _is_causal(model, config, table_causal)


def resolve_lora_targets(model: nn.Module, config: StateCtrlConfig, plan: dict[str, str]) -> set[str]:
    """The Linear modules that get Control+LoRA (``config.lora_target_modules``, filtered by
    ``layers_to_transform`` like the bridges). A target inside a bridged tail module is a ``ValueError``: the
    tail is wrapped whole, so a LoRA inside it would be hidden from the adapter's bookkeeping."""
    if config.lora_target_modules is None:
        return set()
    inside_tuner = _tuner_prefixes(dict(model.named_modules()))
    found = set()
    for key, module in model.named_modules():
        if not key or any(key.startswith(prefix) for prefix in inside_tuner):
            continue
        if not any(matches_target(key, target, config) for target in config.lora_target_modules):
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
    _lora_targets: set[str] = set()
    _causal: bool = False
    _context: ForwardContext | None = None
    _call_hook: torch.utils.hooks.RemovableHandle | None = None
    tuner_layer_cls = StateCtrlTunerLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: StateCtrlConfig, model_config: dict) -> StateCtrlConfig:
        return peft_config

    def _prepare_model(self, peft_config: StateCtrlConfig, model: nn.Module) -> None:
        plan, causal = resolve_bridges(model, peft_config)
        if peft_config.controller == "attention" and causal is None:
            raise ValueError(
                "controller='attention' mixes tokens, so it must know whether the model is causal; this model is "
                "not in the architecture table. Set StateCtrlConfig(causal=True) for a decoder, False otherwise."
            )
        self._plan = plan
        self._lora_targets = resolve_lora_targets(model, peft_config, plan)
        self._causal = bool(causal)
        if peft_config.lean_mlp:
            lean_mlp(model)
        else:
            restore_mlp(model)
        if self._context is None:
            self._context = ForwardContext()
            self._call_hook = model.register_forward_pre_hook(self._record_call, with_kwargs=True)

    def _record_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
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
            in_features, out_features = _input_width(head), _output_width(target)
            if in_features is None or out_features is None:
                raise ValueError(
                    f"Cannot infer the state width of bridge {head_name!r} -> {current_key!r}: the head should be a "
                    "norm or contain a linear layer, and the tail should contain a linear layer."
                )
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
