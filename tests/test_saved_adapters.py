"""Adapters saved before the library/application split load with the current code and give the same outputs.

tests/fixtures/adapters_v0 holds, for each method, an adapter saved by peft-ctrl at commit 8d25aee on the tiny LLaMA
of tests/models.py (its adapter parameters moved off their initial values, so the output differs from the base
model's), the base model's weights, the inputs and the logits the saving code computed, written by
tests/fixtures/make_adapters.py with that commit's source tree first on sys.path.
"""

from pathlib import Path

import pytest
import torch
from models import build
from peft import PeftModel
from safetensors.torch import load_file

import peft_ctrl  # noqa: F401  (registers the methods)

FIXTURES = Path(__file__).parent / "fixtures" / "adapters_v0"
METHODS = ("state-ctrl-mlp", "state-ctrl-both", "control-lora", "seal", "sublora")


def base_model() -> torch.nn.Module:
    model = build("llama")
    model.load_state_dict(load_file(FIXTURES / "base.safetensors"))
    return model.eval()


@pytest.mark.parametrize("method", METHODS)
def test_an_adapter_saved_before_the_split_loads_with_the_same_outputs(method, monkeypatch):
    monkeypatch.setenv("PEFT_CTRL_SEAL_KEY", "fixture-owner-key-0123456789")
    batch = load_file(FIXTURES / "inputs.safetensors")
    expected = load_file(FIXTURES / method / "expected_logits.safetensors")["logits"]
    model = PeftModel.from_pretrained(base_model(), FIXTURES / method).eval()
    with torch.no_grad():
        logits = model(**batch).logits
        plain = base_model()(**batch).logits
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(plain, expected)  # the adapter changes the output: the comparison means something
