"""Where a state-based control edge attaches in each supported model family.

A bridge is a pair ``(head, tail)`` of module paths relative to one residual sub-block: the control
reads the *input* of ``head`` (the residual state h entering the sub-block) and adds ``alpha * B A h``
to the *output* of ``tail`` (the module whose output joins the residual stream). For pre-norm blocks
(LLaMA, GPT-2, ViT) the tail output is F(h) before the residual add, so the block computes
``h + F(h) + alpha * B A h``. For post-norm blocks (BERT, RoBERTa) the tail already applies
``LN(h + F(h))`` and the control is added after it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """Bridge placement for one model family: (head, tail) per block kind, and whether the family is causal.

    Post-norm families (BERT, RoBERTa) need no flag: their tail module ends with the block's LayerNorm, so
    the control is added after it, ``out = LN(h + F(h)) + alpha * B A h``.
    """

    mlp: tuple[str, str]
    attn: tuple[str, str]
    causal: bool


_LLAMA_LIKE = Architecture(mlp=("post_attention_layernorm", "mlp"), attn=("input_layernorm", "self_attn"), causal=True)
_BERT_LIKE = Architecture(mlp=("intermediate", "output"), attn=("attention", "attention.output"), causal=False)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gpt2": Architecture(mlp=("ln_2", "mlp"), attn=("ln_1", "attn"), causal=True),
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "vit": Architecture(mlp=("layernorm_after", "mlp"), attn=("layernorm_before", "attention"), causal=False),
}


def bridges_for(model_type: str | None, blocks: str) -> tuple[list[tuple[str, str]], bool]:
    """Return the ``(head, tail)`` bridges for ``blocks`` in ``{"mlp", "attn", "both"}`` and whether the
    family is causal. Raises ``ValueError`` for a family that is not in the table."""
    arch = ARCHITECTURES.get(model_type or "")
    if arch is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(
            f"state-ctrl has no built-in bridge placement for model_type={model_type!r}. Supported families: "
            f"{supported}. For any other model pass the bridges yourself, as (head, tail) module paths relative to "
            "one block: the control reads the input of `head` and is added to the output of `tail`, e.g. "
            "StateCtrlConfig(bridges=[('post_attention_layernorm', 'mlp')]) for a LLaMA-style MLP block."
        )
    chosen = {"mlp": [arch.mlp], "attn": [arch.attn], "both": [arch.attn, arch.mlp]}[blocks]
    return chosen, arch.causal
