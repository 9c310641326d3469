from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_ctrl._registry import move_adapter_to_base_device, set_active_adapter
from peft_ctrl.dtypes import autocast_state
from peft_ctrl.linear_adapter import LinearAdapterLayer
from peft_ctrl.ops import dropout_probability, lowrank

MERGE_ERROR = (
    "A state-ctrl adapter cannot be merged into the base weights: the control edge bridges a whole residual "
    "sub-block (out = F(h) + alpha * B A h) and F contains a norm and a nonlinearity, so no change of F's weights "
    "reproduces the bridge. Keep the adapter attached for inference (the extra cost is two r-wide matmuls per "
    "bridged block), or call `unload()` to get the plain base model back."
)


class ForwardContext:
    """Per-call facts the attention controller needs but a tail module does not receive.

    The tuner fills it from the top-level model's forward arguments (see ``StateCtrlModel``).
    """

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None
        self.has_past: bool = False

    def record(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Read one top-level forward call's arguments."""
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self.has_past = continues_a_cache(args, kwargs)


def _cache_length(value: Any) -> int | None:
    """Tokens held by a KV cache object (transformers ``Cache`` or anything with ``get_seq_length``), a legacy
    tuple-of-tensors cache, or ``None`` when ``value`` is not a cache."""
    if hasattr(value, "get_seq_length"):
        return int(value.get_seq_length())
    if isinstance(value, (tuple, list)) and value:
        first = value[0]
        while isinstance(first, (tuple, list)) and first:
            first = first[0]
        if isinstance(first, torch.Tensor) and first.dim() == 4:  # (batch, heads, tokens, head_dim)
            return first.shape[-2]
    return None


def _token_count(args: tuple, kwargs: dict[str, Any]) -> int | None:
    for name in ("input_ids", "inputs_embeds"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[1]
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
        return args[0].shape[1]
    return None


def continues_a_cache(args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether a forward call decodes incrementally, i.e. its tokens extend a KV cache filled by earlier calls.

    Independent of the name under which transformers passes the cache (``past_key_values`` up to 5.23, ``cache``
    from 5.24): any argument that is a non-empty cache counts, and so does a ``cache_position`` starting after 0
    or a 2-D attention mask covering more tokens than the call feeds.
    """
    for key, value in (*enumerate(args), *kwargs.items()):
        if key in ("input_ids", "inputs_embeds", "attention_mask"):
            continue
        length = _cache_length(value)
        if length:
            return True
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel() and int(position.reshape(-1)[0]) > 0:
        return True
    mask, tokens = kwargs.get("attention_mask"), _token_count(args, kwargs)
    return isinstance(mask, torch.Tensor) and mask.dim() == 2 and tokens is not None and mask.shape[-1] > tokens


def first_tensor(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The residual state passed to a head module: its first positional tensor or ``hidden_states``."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def attention_control(u: torch.Tensor, causal: bool, key_mask: torch.Tensor | None) -> torch.Tensor:
    """The ICML 2024 nonlinear controller ``u + softmax(u u^T) u`` over the token axis (no parameters).

    ``u`` is ``(batch, tokens, d)``. ``causal`` hides later tokens; ``key_mask`` (``(batch, tokens)``, 1 = real
    token) hides padding. Rows with nothing left to attend to (padding queries) keep their value finite.
    """
    if u.dim() != 3:
        raise ValueError(
            f"The attention controller needs (batch, tokens, features) states, got shape {tuple(u.shape)}."
        )
    n = u.shape[1]
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :].to(torch.bool)
    if causal:
        tri = torch.ones(n, n, dtype=torch.bool, device=u.device).tril()
        mask = tri if mask is None else mask & tri
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=u.dtype, device=u.device).masked_fill(~mask, torch.finfo(u.dtype).min)
    mixed = F.scaled_dot_product_attention(u.unsqueeze(1), u.unsqueeze(1), u.unsqueeze(1), attn_mask=bias, scale=1.0)
    return u + mixed.squeeze(1)


class StateCtrlTunerLayer(BaseTunerLayer):
    """What the tuner treats as its layers (peft's ``tuner_layer_cls``): the bridges and the Control+LoRA linears."""


class StateCtrlLayer(nn.Module, StateCtrlTunerLayer):
    """Wraps the *tail* module of a residual sub-block and adds ``alpha * B A h`` to its output.

    h is the input of the sub-block's *head* module, captured by a forward pre-hook that keeps a reference (no
    copy) until the tail runs. Per-adapter weights live in ``state_ctrl_A`` / ``state_ctrl_B`` keyed by adapter
    name, like upstream peft layers.
    """

    adapter_layer_names = ("state_ctrl_A", "state_ctrl_B")
    other_param_names = ("r", "alpha", "controller", "causal", "head_name", "fused", "state_ctrl_dropout")

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, context: ForwardContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.state_ctrl_A = nn.ModuleDict()
        self.state_ctrl_B = nn.ModuleDict()
        self.state_ctrl_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.controller: dict[str, str] = {}
        self.causal: dict[str, bool] = {}
        self.head_name: dict[str, str] = {}
        self.fused: dict[str, bool] = {}
        set_active_adapter(self, [])
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._context = context
        self._captured: dict[str, torch.Tensor] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}

    def update_layer(
        self,
        adapter_name: str,
        head_name: str,
        head: nn.Module,
        r: int,
        alpha: float,
        dropout: float,
        controller: str,
        causal: bool,
        init_weights: bool,
        fused: bool = True,
        inference_mode: bool = False,
    ) -> None:
        """Create (or re-create) one adapter's control edge, reading the input of ``head``."""
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.controller[adapter_name] = controller
        self.causal[adapter_name] = causal
        self.head_name[adapter_name] = head_name
        self.fused[adapter_name] = fused
        self.state_ctrl_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.state_ctrl_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.state_ctrl_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.reset_parameters(adapter_name, init_weights)
        if head_name not in self._hooks:
            self._hooks[head_name] = head.register_forward_pre_hook(
                functools.partial(self._capture, head_name), with_kwargs=True
            )
        weight = next(self.base_layer.parameters(), None)
        created_on_meta = self.state_ctrl_A[adapter_name].weight.is_meta  # peft's low_cpu_mem_usage=True
        if weight is not None and not created_on_meta:
            for container in (self.state_ctrl_A, self.state_ctrl_B):
                container[adapter_name].to(weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """A Kaiming-uniform (a = sqrt(5), like nn.Linear); B = 0 unless ``init_weights`` is False."""
        nn.init.kaiming_uniform_(self.state_ctrl_A[adapter_name].weight, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.state_ctrl_B[adapter_name].weight)
        else:
            nn.init.normal_(self.state_ctrl_B[adapter_name].weight, std=0.02)

    def _capture(self, head_name: str, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._captured[head_name] = first_tensor(args, kwargs)

    def control(self, adapter_name: str, h: torch.Tensor) -> torch.Tensor:
        """``alpha * B (A dropout(h))``, or the attention controller applied to ``u = B A dropout(h)``.

        The fused path (``peft_ctrl.ops.lowrank``) keeps h by reference, ``A h`` and a dropout seed for the
        backward; the unfused path is the plain module expression (kept for comparison).
        """
        A = self.state_ctrl_A[adapter_name]
        B = self.state_ctrl_B[adapter_name]
        alpha = self.alpha[adapter_name]
        linear = self.controller[adapter_name] == "linear"
        if not autocast_state(h.device.type)[0]:
            h = h.to(A.weight.dtype)
        if self.fused[adapter_name]:
            p = dropout_probability(self.state_ctrl_dropout[adapter_name])
            u = lowrank(h, A.weight, B.weight, scale=alpha if linear else 1.0, dropout=p, training=self.training)
            if linear:
                return u
        else:
            u = B(A(self.state_ctrl_dropout[adapter_name](h)))
        if not linear:
            if self._context.has_past:
                raise ValueError(
                    "The attention controller mixes all tokens of a sequence and cannot run incremental decoding with "
                    "a KV cache. Call generate(..., use_cache=False) or use controller='linear'."
                )
            mask = self._context.attention_mask
            if mask is not None and (mask.dim() != 2 or mask.shape[-1] != u.shape[1]):
                raise ValueError(
                    f"The attention controller got an attention mask of shape {tuple(mask.shape)} for "
                    f"{u.shape[1]} tokens; it supports 2-D (batch, tokens) padding masks without a KV cache."
                )
            u = attention_control(u, self.causal[adapter_name], mask)
        return u if alpha == 1.0 else u * alpha

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        result = self.base_layer(*args, **kwargs)
        captured, self._captured = self._captured, {}
        if self.disable_adapters or self.merged:
            return result
        active = [name for name in self.active_adapters if name in self.state_ctrl_A]
        if not active:
            return result
        out = result[0] if isinstance(result, tuple) else result
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"state-ctrl adds the control to the tail's output, but {type(self.base_layer).__name__} returned "
                f"{type(out).__name__}; choose a tail module that returns a tensor (or a tuple starting with one)."
            )
        for name in active:
            h = captured.get(self.head_name[name])
            if h is None:
                raise RuntimeError(
                    f"state-ctrl adapter {name!r}: the head module {self.head_name[name]!r} did not run before this "
                    "tail module finished, so its input state h is unknown. Check the bridge's (head, tail) pair."
                )
            out = out + self.control(name, h).to(out.dtype)
        return (out, *result[1:]) if isinstance(result, tuple) else out

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        """Nothing is ever merged (see ``merge``)."""

    def delete_adapter(self, adapter_name: str) -> None:
        head = self.head_name.get(adapter_name)
        super().delete_adapter(adapter_name)
        if head is not None and head not in self.head_name.values():
            self._hooks.pop(head).remove()

    def remove_hooks(self) -> None:
        """Detach the capture hooks from the head modules (done on ``unload``)."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._captured.clear()

    def __repr__(self) -> str:
        return "state_ctrl." + super().__repr__()


class StateCtrlLoraLayer(LinearAdapterLayer, StateCtrlTunerLayer):
    """The LoRA part of a Control+LoRA adapter: ``h = W x + (lora_alpha / lora_r) B A dropout(x)`` on one
    ``nn.Linear`` (``StateCtrlConfig.lora_target_modules``), with peft LoRA's initialisation (A Kaiming-uniform,
    B = 0). Its weights carry the ``state_ctrl_`` prefix, so they are saved, loaded and trained with the bridges of
    the same adapter."""

    adapter_layer_names = ("state_ctrl_lora_A", "state_ctrl_lora_B")
    other_param_names = ("lora_r", "lora_scaling", "state_ctrl_lora_dropout")
    method_name = "state-ctrl (Control+LoRA)"

    def __init__(self, base_layer: nn.Linear, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(base_layer)
        self.state_ctrl_lora_A = nn.ModuleDict()
        self.state_ctrl_lora_B = nn.ModuleDict()
        self.state_ctrl_lora_dropout = nn.ModuleDict()
        self.lora_r: dict[str, int] = {}
        self.lora_scaling: dict[str, float] = {}
        set_active_adapter(self, adapter_name)
        self.update_layer(adapter_name, **kwargs)

    def update_layer(
        self, adapter_name: str, r: int, scaling: float, dropout: float, init_weights: bool, inference_mode: bool
    ) -> None:
        self.lora_r[adapter_name] = r
        self.lora_scaling[adapter_name] = scaling
        self.state_ctrl_lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.state_ctrl_lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.state_ctrl_lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        nn.init.kaiming_uniform_(self.state_ctrl_lora_A[adapter_name].weight, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.state_ctrl_lora_B[adapter_name].weight)
        else:
            nn.init.normal_(self.state_ctrl_lora_B[adapter_name].weight, std=0.02)
        if not self.state_ctrl_lora_A[adapter_name].weight.is_meta:
            move_adapter_to_base_device(self, adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``(lora_alpha / lora_r) B A``: what this adapter's LoRA part adds to W."""
        A, B = self.state_ctrl_lora_A[adapter].weight, self.state_ctrl_lora_B[adapter].weight
        return self.lora_scaling[adapter] * (B @ A)

    def delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        A, B = self.state_ctrl_lora_A[adapter].weight, self.state_ctrl_lora_B[adapter].weight
        return self.low_rank(x, A, B, self.lora_scaling[adapter], self.state_ctrl_lora_dropout[adapter])

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(MERGE_ERROR)

    def __repr__(self) -> str:
        return "state_ctrl." + super().__repr__()
