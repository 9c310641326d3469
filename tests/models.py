"""Tiny random-init models of every family in the architecture table (built from configs, no downloads)."""

from __future__ import annotations

import torch
import transformers
from torch import nn

VOCAB = 64
# bf16 autocast (the jobs' default) only where the CPU multiplies bf16 natively: on an AVX2-only CPU its backward
# takes the generic GEMM and one step of SmolLM2 runs for minutes. Tests of the real model train in fp32 there.
FAST_BF16 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _lm(config_cls, model_cls, layers=2, **kw):
    cfg = config_cls(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        **kw,
    )
    return model_cls(cfg)


def build(family: str, seed: int = 0, layers: int = 2) -> nn.Module:
    """A tiny model of ``family``; the same seed gives the same weights. ``layers`` applies to LLaMA."""
    torch.manual_seed(seed)
    t = transformers
    if family == "llama":
        model = _lm(t.LlamaConfig, t.LlamaForCausalLM, layers=layers)
    elif family == "mistral":
        model = _lm(t.MistralConfig, t.MistralForCausalLM)
    elif family == "qwen2":
        model = _lm(t.Qwen2Config, t.Qwen2ForCausalLM)
    elif family == "qwen3":
        model = _lm(t.Qwen3Config, t.Qwen3ForCausalLM, head_dim=8)
    elif family == "gpt2":
        model = t.GPT2LMHeadModel(
            t.GPT2Config(
                vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
            )
        )
    elif family in ("bert", "roberta"):
        cfg_cls, model_cls = (
            (t.BertConfig, t.BertForSequenceClassification)
            if family == "bert"
            else (t.RobertaConfig, t.RobertaForSequenceClassification)
        )
        cfg = cfg_cls(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=80,
            num_labels=3,
            pad_token_id=1,
        )
        model = model_cls(cfg)
    elif family == "vit":
        cfg = t.ViTConfig(
            image_size=16,
            patch_size=8,
            num_channels=3,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_labels=3,
        )
        model = t.ViTForImageClassification(cfg)
    elif family == "custom":
        model = ResidualMLP()
    else:
        raise KeyError(family)
    return model.eval()


def save_quantisable_llama(folder) -> None:
    """A tiny LLaMA saved to ``folder`` for loading quantised: bitsandbytes' CPU 4-bit inference kernel needs
    in_features >= its block size (64), so its hidden size is 64."""
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)


# bitsandbytes settings: 4-bit nf4 with double quantisation (fp32 or bf16 compute) and 8-bit
QUANTS = {
    "nf4-fp32": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),
    "nf4-bf16": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
    "int8": dict(load_in_8bit=True),
}


def quantised_base(folder, quant: str) -> nn.Module:
    """The model saved in ``folder`` loaded quantised (``QUANTS[quant]``) and prepared as QLoRA prepares it."""
    from peft import prepare_model_for_kbit_training

    config = transformers.BitsAndBytesConfig(**QUANTS[quant])
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    return prepare_model_for_kbit_training(model)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "bert", "roberta", "vit"]
CAUSAL = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]


def inputs(family: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    if family == "custom":
        return {"x": torch.randn(batch, seq, 16, generator=g)}
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def enable_checkpointing(model: nn.Module, mode: str | None) -> None:
    """Gradient checkpointing on every layer: ``"reentrant"``, ``"non-reentrant"`` or ``None`` (off)."""
    if mode is None:
        return
    reentrant = mode == "reentrant"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:  # the reentrant mode needs an input that requires grad to backpropagate at all
        model.enable_input_require_grads()


def output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    return out if isinstance(out, torch.Tensor) else out.logits


class Block(nn.Module):
    """A pre-norm residual MLP block, not a transformers model: needs custom bridges."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff(self.norm(x))


class ResidualMLP(nn.Module):
    def __init__(self, d: int = 16, n: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Pattern(torch.utils.data.Dataset):
    """Token sequences of a repeating pattern: a tiny LLaMA with an adapter learns them in a few steps."""

    def __init__(self, size: int = 16) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = (torch.arange(12) * 3 + i % 4) % 60 + 2
        return {"input_ids": ids, "labels": ids}


class Topics(torch.utils.data.Dataset):
    """Sequence classification: the class (of 3) is set by the first token; a tiny BERT learns it quickly."""

    def __init__(self, size: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, VOCAB, (size, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i, 0] % 3}
