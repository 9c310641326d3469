"""Tiny random models of every family people fine-tune (built from each family's transformers config, hidden 64,
2 layers, no downloads), and the state-ctrl battery run over them: by ``tests/test_zoo.py`` in CI and by
``benchmarks/state_ctrl_zoo.py``, which writes the support table in docs/state_ctrl.md."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable

import torch
import transformers
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import CONFIG_MAPPING

from peft_ctrl import StateCtrlConfig
from peft_ctrl.state_ctrl import StateCtrlLayer, StateCtrlLoraLayer

FAMILIES = (
    "llama mistral ministral qwen2 qwen3 qwen2_moe qwen3_moe gemma gemma2 gemma3_text phi phi3 phimoe mixtral olmo "
    "olmo2 olmo3 granite granitemoe cohere cohere2 stablelm falcon gpt_neox gptj starcoder2 gpt_bigcode opt bloom "
    "deepseek_v3 smollm3 glm4 gpt_oss gpt2 bert roberta xlm-roberta deberta-v2 distilbert electra modernbert vit "
    "dinov2 t5 bart whisper"
).split()
# Families whose Control+LoRA fails by design, with the reason (tests/test_zoo.py checks the error).
NO_CONTROL_LORA = {"gpt2": "its attention inputs are transformers Conv1D modules, not torch.nn.Linear"}
VOCAB = 128
SIZES = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=VOCAB,
    head_dim=16,
    max_position_embeddings=128,
    num_local_experts=4,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=64,
    n_routed_experts=4,
    n_shared_experts=1,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    d_model=64,
    d_ff=128,
    d_kv=16,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    num_mel_bins=8,
    max_source_positions=16,
    max_target_positions=32,
    dim=64,
    hidden_dim=128,
    n_layers=2,
    n_heads=4,
    rotary_dim=8,
    ffn_dim=128,
    word_embed_proj_dim=64,
    image_size=16,
    patch_size=8,
    sliding_window=4,
    global_attn_every_n_layers=2,
    local_attention=4,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
    cls_token_id=3,
    sep_token_id=4,
    num_labels=3,
)


def tiny_config(family: str, **sizes: int) -> transformers.PretrainedConfig:
    """``family``'s config with the sizes above, or ``sizes`` where given (each under the name the family's config
    uses)."""
    cls = CONFIG_MAPPING[family]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in {**SIZES, **sizes}.items():
        real = cls.attribute_map.get(name, name)
        if real in fields:
            kwargs.setdefault(real, value)
    config = cls(**kwargs)
    if config.is_encoder_decoder and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = SIZES["pad_token_id"]  # what T5 starts decoding from
    return config


def tiny(family: str, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A tiny random ``family`` model (eval mode) with the head users fine-tune (causal LM, seq2seq LM, sequence
    classification, or the bare encoder for vision) and a batch of 2 for it."""
    config = tiny_config(family)
    torch.manual_seed(seed)
    auto = transformers
    g = torch.Generator().manual_seed(seed + 1)
    if family in ("vit", "dinov2"):
        model = auto.AutoModel.from_config(config)
        batch = {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    elif family == "whisper":
        model = auto.WhisperForConditionalGeneration(config)
        batch = {
            "input_features": torch.randn(2, 8, 32, generator=g),
            "decoder_input_ids": torch.randint(5, VOCAB, (2, 5), generator=g),
        }
    elif config.is_encoder_decoder:
        model = auto.AutoModelForSeq2SeqLM.from_config(config)
        ids = torch.randint(5, VOCAB, (2, 7), generator=g)
        batch = {"input_ids": ids, "decoder_input_ids": torch.randint(5, VOCAB, (2, 5), generator=g)}
    elif family in ("bert", "roberta", "xlm-roberta", "deberta-v2", "distilbert", "electra", "modernbert"):
        model = auto.AutoModelForSequenceClassification.from_config(config)
        batch = {"input_ids": torch.randint(5, VOCAB, (2, 7), generator=g)}
    else:
        model = auto.AutoModelForCausalLM.from_config(config)
        batch = {"input_ids": torch.randint(5, VOCAB, (2, 7), generator=g)}
    return model.eval(), batch


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def adapt(family: str, seed: int = 0, **kw) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    base, batch = tiny(family, seed)
    kw.setdefault("r", 4)
    torch.manual_seed(seed + 2)
    return get_peft_model(base, StateCtrlConfig(**kw)), batch


def bridges(model: nn.Module) -> list[StateCtrlLayer]:
    return [m for m in model.modules() if isinstance(m, StateCtrlLayer)]


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return logits(model, batch).float().pow(2).mean()


# ----------------------------------------------------------------------------------------------------- checks
# Each check raises AssertionError (or the library's error) on failure and returns a short note on success.


def check_placement(family: str) -> str:
    """Out of the box for blocks = mlp, attn and both: bridges in every block, 'both' = the other two."""
    counts = {}
    for blocks in ("mlp", "attn", "both"):
        model, _ = adapt(family, blocks=blocks)
        counts[blocks] = len(bridges(model))
    assert counts["mlp"] > 0 and counts["attn"] > 0, counts
    assert counts["both"] == counts["mlp"] + counts["attn"], counts
    return f"{counts['mlp']} mlp, {counts['attn']} attention"


def check_step0(family: str) -> str:
    """With B = 0 the adapted model is the base model (every sub-block bridged)."""
    model, batch = adapt(family, blocks="both")
    base, _ = tiny(family)
    torch.testing.assert_close(logits(model, batch), logits(base, batch), atol=1e-6, rtol=0)
    return "equal"


def check_train_step(family: str) -> str:
    """One SGD step changes adapter parameters only, and at least one of them."""
    model, batch = adapt(family, blocks="both")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _loss(model, batch).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("state_ctrl_" in n for n in changed), sorted(changed)[:5]
    return f"{len(changed)} adapter tensors changed"


def check_linear_in_b(family: str) -> str:
    """The change of the first bridged tail's output is linear in its B and lies in B's column space."""
    model, batch = adapt(family, blocks="both", init_weights=False)
    layer = bridges(model)[0]
    B = layer.state_ctrl_B["default"].weight
    seen = []
    handle = layer.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    outs = []
    with torch.no_grad():
        original = B.clone()
        for scale in (0.0, 1.0, 2.0):
            B.copy_(original * scale)
            seen.clear()
            logits(model, batch)
            outs.append(seen[0].double())
        B.copy_(original)
    handle.remove()
    d1, d2 = outs[1] - outs[0], outs[2] - outs[0]
    torch.testing.assert_close(d2, 2 * d1, atol=1e-5, rtol=1e-4)
    q, _ = torch.linalg.qr(original.double())
    flat = d1.reshape(-1, d1.shape[-1])
    residual = flat - (flat @ q) @ q.T
    # float32 rounding of the tail's own output bounds what is left outside col(B)
    assert float(residual.abs().max()) <= 1e-5 * float(outs[0].abs().max()), "not in B's column space"
    assert float(flat.abs().max()) > 0
    return "linear, in col(B)"


def can_generate(model: nn.Module) -> bool:
    return bool(getattr(model, "can_generate", lambda: False)()) and not isinstance(
        model, transformers.WhisperForConditionalGeneration
    )


def check_generate(family: str) -> str | None:
    """Greedy generate with the KV cache equals generate without it (None: the model does not generate)."""
    base, batch = tiny(family)
    if not can_generate(base):
        return None
    model, _ = adapt(family, blocks="both", init_weights=False)
    prompt = {k: v for k, v in batch.items() if k != "decoder_input_ids"}
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**prompt, use_cache=True, **settings)
        plain = model.generate(**prompt, use_cache=False, **settings)
    assert torch.equal(cached, plain), (cached, plain)
    return "equal"


def check_save_load(family: str) -> str:
    """Save, then stock ``PeftModel.from_pretrained`` on a fresh base reproduces the logits."""
    model, batch = adapt(family, blocks="both", init_weights=False)
    expected = logits(model, batch)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        base, _ = tiny(family)
        loaded = PeftModel.from_pretrained(base, folder)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-6, rtol=0)
    return "equal"


def check_checkpointing(family: str) -> str | None:
    """Gradient checkpointing (non-reentrant) gives the same adapter gradients (None: not supported)."""
    grads = []
    for on in (False, True):
        model, batch = adapt(family, blocks="both", init_weights=False)
        if on and not getattr(model.base_model.model, "supports_gradient_checkpointing", False):
            return None
        model.train()
        for m in model.modules():  # dropout off: the two runs must see the same function
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        _loss(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-4)
    return "same gradients"


def check_control_lora(family: str) -> str:
    """``StateCtrlConfig.control_lora()`` out of the box: MLP bridges plus LoRA on the attention inputs; one step
    trains both."""
    base, batch = tiny(family)
    torch.manual_seed(2)
    model = get_peft_model(base, StateCtrlConfig.control_lora(r=4, lora_r=2))
    lora = [m for m in model.modules() if isinstance(m, StateCtrlLoraLayer)]
    assert lora and bridges(model)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _loss(model, batch).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any("lora" in n for n in changed) and any("lora" not in n for n in changed), sorted(changed)[:4]
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, StateCtrlLoraLayer)})
    return "LoRA on " + ", ".join(names)


def check_bf16_probe(family: str) -> str:
    """The probe finds the same bridges on the model cast to bf16 (the dtype users train in) as in fp32."""
    from peft_ctrl.state_ctrl import find_bridges

    base, _ = tiny(family)
    fp32 = find_bridges(base)
    bf16 = find_bridges(base.to(torch.bfloat16))
    assert {k: [(s.head, s.tail) for s in v] for k, v in bf16.items()} == {
        k: [(s.head, s.tail) for s in v] for k, v in fp32.items()
    }
    return "same bridges"


CHECKS: dict[str, Callable[[str], str | None]] = {
    "placement": check_placement,
    "bf16 probe": check_bf16_probe,
    "step 0 = base": check_step0,
    "train step": check_train_step,
    "linear in B": check_linear_in_b,
    "cache generate": check_generate,
    "save/load": check_save_load,
    "checkpointing": check_checkpointing,
    "Control+LoRA": check_control_lora,
}


def placement_summary(family: str) -> str:
    """The bridges found in the first block of each structure, as 'kind: head -> tail (form)'."""
    from peft_ctrl.state_ctrl import find_bridges

    base, _ = tiny(family)
    rows = []
    for block, subs in find_bridges(base).items():
        rows.append(
            f"{block.rpartition('.')[0] or block}: "
            + "; ".join(f"{s.kind} {s.head} -> {s.tail} ({s.form})" for s in subs)
        )
    return " / ".join(dict.fromkeys(rows))


def run_battery(family: str) -> dict[str, str]:
    """Every check on ``family``: ``{check: 'yes: note' | 'n/a' | 'FAIL: error'}``."""
    results = {}
    for name, check in CHECKS.items():
        try:
            note = check(family)
            results[name] = "n/a" if note is None else f"yes: {note}"
        except Exception as err:  # noqa: BLE001 - the table reports every failure as it is
            results[name] = f"FAIL: {type(err).__name__}: {str(err)[:200]}"
    return results


__all__ = ["CHECKS", "FAMILIES", "NO_CONTROL_LORA", "adapt", "run_battery", "tiny"]
