from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from peft.config import PeftConfig
from peft.utils import PeftType

from peft_ctrl._checks import check_bool, check_choice, check_float, check_int, check_probability

ATTENTION_INPUTS = "attention-inputs"
BLOCKS = ("mlp", "attn", "both")
CONTROLLERS = ("linear", "attention")


@dataclass
class StateCtrlConfig(PeftConfig):
    """Configuration of state-based parallel control (Zhang, Ren, Cheng, Li, ICML 2025).

    Each chosen residual sub-block with input state h and frozen body F gets one trainable low-rank edge:
    ``out = h + F(h) + alpha * B (A h)`` (pre-norm) or ``out = LN(h + F(h)) + alpha * B (A h)`` (post-norm),
    with ``A: r x d`` and ``B: d x r``. B starts at zero, so the adapted model equals the base model at step 0.

    Args:
        r (`int`): Rank of the control edge (width of ``A h``).
        alpha (`float`): Plain scale of the control (not divided by ``r``).
        dropout (`float`): Dropout probability on the control input h.
        blocks (`str`, *optional*): Which residual sub-blocks to bridge, found on the model by the placement probe
            (``peft_ctrl.state_ctrl.placement``): ``"mlp"`` (default; a whole MoE block counts as the MLP),
            ``"attn"`` (self- and cross-attention) or ``"both"`` (every sub-block). Leave unset when ``bridges`` is
            given.
        bridges (`list[tuple[str, str]]`, *optional*): Your own ``(head, tail)`` module paths relative to one block:
            the control reads the input of ``head`` and is added to the output of ``tail``. Checked by the probe
            like a found placement.
        check_placement (`bool`): ``True`` (default): one probe forward on a few tokens finds the bridges (or checks
            the given ones) and reads the state width from the tensors. ``False`` skips it (e.g. a meta-device or
            sharded model); then ``bridges`` is required and nothing checks them.
        controller (`str`): ``"linear"`` (``B A h`` per token) or ``"attention"`` (the ICML 2024 nonlinear
            controller ``u + softmax(u u^T) u`` over the token axis with ``u = B A h``).
        causal (`bool`, *optional*): Whether the attention controller must be causally masked. Inferred from the
            placement probe (the attention modules' ``is_causal``), the task type or the model config when unset.
        layers_to_transform (`int | list[int]`, *optional*): Only bridge blocks with these layer indices.
        layers_pattern (`str | list[str]`, *optional*): Name of the layer list (e.g. ``"layers"``, ``"h"``) used
            with ``layers_to_transform`` when the default index detection is ambiguous.
        fused (`bool`): Use the fused low-rank op (default); ``False`` runs the plain module expression, which
            keeps a dropped copy of h and the mask when ``dropout > 0``.
        lean_mlp (`bool`): ``True`` (default): frozen gated-SiLU MLPs keep two tensors for backward instead of three
            (``peft_ctrl.ops.lean_mlp``); same values and gradients.
        init_weights (`bool`): ``True`` (default): A Kaiming-uniform, B = 0. ``False``: B random as well, so the
            adapter changes the output from the start (for tests).
        modules_to_save (`list[str]`, *optional*): Extra modules (e.g. a classifier head) trained and saved in full.
        lora_target_modules (`list[str] | str`, *optional*): Control+LoRA: also put LoRA, ``W x + (lora_alpha /
            lora_r) B A x``, on these Linear modules (names or path suffixes, e.g. ``["q_proj", "k_proj", "v_proj"]``),
            in the same adapter; ``"attention-inputs"``: the Linear modules that read each self-attention
            sub-block's input (q, k, v or a fused qkv), found by the probe. They must lie outside the bridged tails.
        lora_r (`int`): Rank of the Control+LoRA linears.
        lora_alpha (`float`): LoRA scale numerator: the update is scaled by ``lora_alpha / lora_r``.
        lora_dropout (`float`): Dropout on the Control+LoRA linears' input.
    """

    # Bridges are resolved from `blocks`/`bridges`, not from module-name targets; peft's injection code reads
    # this attribute, so it exists and stays None (a ClassVar, so it is not saved in adapter_config.json).
    target_modules: ClassVar[None] = None

    r: int = field(default=64, metadata={"help": "Rank of the control edge A: r x d, B: d x r."})
    alpha: float = field(default=1.0, metadata={"help": "Plain scale of the control (not divided by r)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the control input h."})
    blocks: Literal["mlp", "attn", "both"] | None = field(
        default=None,
        metadata={
            "help": "Residual sub-blocks to bridge, found on the model by the placement probe: 'mlp' (default), "
            "'attn' "
            "(self- and cross-attention) or 'both'. Leave unset when passing `bridges`."
        },
    )
    bridges: list[tuple[str, str]] | None = field(
        default=None,
        metadata={
            "help": "Custom (head, tail) module paths relative to one block: the control reads the input of head "
            "and is added to the output of tail. Checked by the placement probe like a found placement."
        },
    )
    check_placement: bool = field(
        default=True,
        metadata={
            "help": "Find (or check) the bridges with one probe forward on a few tokens and read the state width from "
            "the tensors. False skips it (meta-device or sharded models): then `bridges` is required, unchecked."
        },
    )
    controller: Literal["linear", "attention"] = field(
        default="linear",
        metadata={"help": "'linear': B A h per token; 'attention': u + softmax(u u^T) u over tokens, u = B A h."},
    )
    causal: bool | None = field(
        default=None,
        metadata={"help": "Causally mask the attention controller. Inferred from the model when unset."},
    )
    layers_to_transform: int | list[int] | None = field(
        default=None, metadata={"help": "Only bridge blocks with these layer indices."}
    )
    layers_pattern: str | list[str] | None = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform (e.g. 'layers')."}
    )
    fused: bool = field(
        default=True,
        metadata={
            "help": "Compute the control with peft_ctrl.ops.lowrank, which keeps h by reference, A h and a dropout "
            "seed for the backward (no mask, no dropped copy). False: the plain nn.Linear expression."
        },
    )
    lean_mlp: bool = field(
        default=True,
        metadata={
            "help": "Let the frozen gated-SiLU MLPs (LLaMA, Mistral, Qwen2/3) keep two tensors for backward instead "
            "of three (peft_ctrl.ops.lean_mlp: the SiLU is recomputed); same values and gradients. The setting of the "
            "adapter added last applies to the whole model."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: B = 0 so step 0 equals the base model. False: random B (changes outputs; tests)."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Extra modules (e.g. a classifier head) to train and save in full."},
    )
    lora_target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Control+LoRA: Linear modules (names or path suffixes, e.g. ['q_proj', 'k_proj', 'v_proj']) that "
            "also get LoRA in this adapter, or 'attention-inputs' (the Linears that read each self-attention "
            "sub-block's input, found by the probe); outside the bridged tails. None: bridges only."
        },
    )
    lora_r: int = field(default=32, metadata={"help": "Rank of the Control+LoRA linears."})
    lora_alpha: float = field(default=64.0, metadata={"help": "Control+LoRA scale numerator: lora_alpha / lora_r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the Control+LoRA linears' input."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.STATE_CTRL
        check_int("StateCtrlConfig.r", self.r, low=1)
        self.alpha = check_float("StateCtrlConfig.alpha", self.alpha)
        self.dropout = check_probability("StateCtrlConfig.dropout", self.dropout)
        check_choice("StateCtrlConfig.controller", self.controller, CONTROLLERS)
        if self.blocks is not None:
            check_choice("StateCtrlConfig.blocks", self.blocks, BLOCKS)
        if self.causal is not None:
            check_bool("StateCtrlConfig.causal", self.causal)
        check_bool("StateCtrlConfig.fused", self.fused)
        check_bool("StateCtrlConfig.init_weights", self.init_weights)
        check_bool("StateCtrlConfig.lean_mlp", self.lean_mlp)
        check_bool("StateCtrlConfig.check_placement", self.check_placement)
        if self.bridges is not None:
            if self.blocks is not None:
                raise ValueError(
                    "Pass either `blocks` (sub-blocks found by the placement probe) or `bridges` (your own "
                    "(head, tail) pairs), not both."
                )
            self.bridges = [_as_bridge(b) for b in self.bridges]
            if not self.bridges:
                raise ValueError("`bridges` is empty; give at least one (head, tail) pair or leave it unset.")
        if isinstance(self.layers_to_transform, list) and not self.layers_to_transform:
            raise ValueError("`layers_to_transform` is empty; leave it unset to bridge every layer.")
        layers = self.layers_to_transform
        for index in [layers] if layers is not None and not isinstance(layers, list) else layers or []:
            check_int("StateCtrlConfig.layers_to_transform", index, low=0)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if self.lora_target_modules is not None and self.lora_target_modules != ATTENTION_INPUTS:
            if isinstance(self.lora_target_modules, str) or not all(
                isinstance(t, str) and t.strip(".") for t in self.lora_target_modules
            ):
                raise ValueError(
                    f"`lora_target_modules` must be a list of module names or {ATTENTION_INPUTS!r}, got "
                    f"{self.lora_target_modules!r}; for example ['q_proj', 'k_proj', 'v_proj']."
                )
            self.lora_target_modules = [t.strip(".") for t in self.lora_target_modules]
            if not self.lora_target_modules:
                raise ValueError("`lora_target_modules` is empty; leave it unset for bridges only.")
        check_int("StateCtrlConfig.lora_r", self.lora_r, low=1)
        self.lora_alpha = check_float("StateCtrlConfig.lora_alpha", self.lora_alpha)
        self.lora_dropout = check_probability("StateCtrlConfig.lora_dropout", self.lora_dropout)

    @property
    def lora_scaling(self) -> float:
        """The Control+LoRA update's scale, ``lora_alpha / lora_r``."""
        return self.lora_alpha / self.lora_r

    @classmethod
    def control_lora(cls, **overrides) -> StateCtrlConfig:
        """The authors' Control+LoRA recipe: an MLP bridge (r = 64, alpha 1) plus LoRA r = 32, alpha 64 on the
        Linear modules that read each self-attention input (q_proj, k_proj and v_proj in LLaMA; found by the probe
        in any family), in one adapter. ``overrides`` replace any field (``bridges`` replaces ``blocks``)."""
        settings = {
            "r": 64,
            "lora_target_modules": ATTENTION_INPUTS,
            "lora_r": 32,
            "lora_alpha": 64.0,
            **({} if "bridges" in overrides else {"blocks": "mlp"}),
            **overrides,
        }
        return cls(**settings)


def _as_bridge(pair) -> tuple[str, str]:
    if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(p, str) and p.strip(".") for p in pair):
        raise ValueError(
            f"Each bridge must be a (head, tail) pair of non-empty module paths, got {pair!r}; "
            "for example ('post_attention_layernorm', 'mlp')."
        )
    return (pair[0].strip("."), pair[1].strip("."))
