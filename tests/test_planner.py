"""The memory planner (peft_ctrl.planner) against the meter: on every shape the CPU can run, the bytes it plans on
the meta device (target "cpu": CPU's attention kernel and dropout) equal the bytes SavedTensorMeter measures in a
real CPU step, to the byte, for every method."""

import copy

import pytest
import torch
import transformers

from peft_ctrl.metrics import SavedTensorMeter
from peft_ctrl.planner import METHODS, SHIPPED, load_config, plan
from peft_ctrl.planner.plan import build

TINY = transformers.LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
# SmolLM2-135M's shape (its public config values), with random weights
SMOLLM2 = transformers.LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
)


def measured(config, method: str, batch: int, seq: int) -> tuple[int, int, int]:
    """(saved bytes, parameter bytes, trainable parameters) of one real fp32 CPU step."""
    torch.manual_seed(0)
    model = build(config, method, "fp32", device="cpu")
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with SavedTensorMeter(exclude=model) as meter:
        model(input_ids=ids, labels=ids).loss.backward()
    params = list(model.parameters())
    return meter.total_bytes, sum(p.nbytes for p in params), sum(p.numel() for p in params if p.requires_grad)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("config", "batch", "seq"), [(TINY, 2, 9), (SMOLLM2, 1, 16)], ids=["tiny", "smollm2"])
def test_the_plan_equals_the_meter_to_the_byte(method, config, batch, seq):
    planned = plan(config, method, dtype="fp32", batch=batch, seq=seq, target="cpu")
    saved, weights, trainable = measured(config, method, batch, seq)
    assert (planned.saved, planned.weights, planned.trainable_params) == (saved, weights, trainable)
    assert planned.gradients == 4 * trainable and planned.optimizer == 8 * trainable


def test_the_cuda_target_saves_bool_dropout_masks_and_flash_attention_tensors():
    """Against the CPU model of the same step: dropout masks shrink from 4 bytes to 1 per element, and attention
    saves the same tensors (both fused kernels keep q, k, v, the output and the log-sum-exp)."""
    cpu = plan(TINY, "lora-all", dtype="bf16", batch=2, seq=32, target="cpu")
    cuda = plan(TINY, "lora-all", dtype="bf16", batch=2, seq=32, target="cuda")
    assert cuda.saved < cpu.saved
    no_dropout_cpu = plan(TINY, "state-ctrl-mlp", dtype="bf16", batch=2, seq=32, target="cpu")
    no_dropout_cuda = plan(TINY, "state-ctrl-mlp", dtype="bf16", batch=2, seq=32, target="cuda")
    assert abs(no_dropout_cuda.saved - no_dropout_cpu.saved) <= 2 * 16 + 8  # the flash kernel's RNG seed and offset


def test_zero_stages_shard_what_they_shard():
    full = plan(TINY, "full", dtype="fp32", seq=8, target="cpu")
    stages = [plan(TINY, "full", dtype="fp32", seq=8, target="cpu", zero_stage=s, world_size=4) for s in (1, 2, 3)]
    assert stages[0].optimizer == full.optimizer // 4 and stages[0].gradients == full.gradients
    assert stages[1].gradients == full.gradients // 4 and stages[1].weights == full.weights
    assert stages[2].weights == full.weights // 4 and stages[2].saved == full.saved


def test_every_shipped_config_loads_and_bad_input_is_refused(tmp_path):
    assert set(SHIPPED) == {"gemma-2-9b", "llama-2-7b", "llama-3.1-8b", "mistral-7b", "qwen3-8b"}
    assert load_config("llama-3.1-8b").num_key_value_heads == 8
    with pytest.raises(ValueError, match="Unknown model"):
        load_config("llama-9")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no model_type"):
        load_config(tmp_path / "config.json")
    for kwargs, message in [
        ({"method": "qlora"}, "method must be one of"),
        ({"method": "lora-all", "dtype": "int8"}, "dtype must be one of"),
        ({"method": "lora-all", "seq": 0}, "seq must be a positive integer"),
        ({"method": "lora-all", "zero_stage": 4}, "zero_stage must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            plan(TINY, **kwargs)


def test_peft_ctrl_plan_prints_the_breakdown_and_the_longest_sequence(tmp_path, capsys):
    from peft_ctrl_app.cli import main

    path = tmp_path / "config.json"
    path.write_text(TINY.to_json_string())
    assert main(["plan", "--model", str(path), "--method", "state-ctrl", "--seq", "64", "--gpu-gib", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "state-ctrl-mlp, bf16, batch 1 x 64 tokens, cuda" in out and "peak (sum)" in out
    longest = int(out.rsplit(":", 1)[1])
    assert longest > 0 and plan(str(path), "state-ctrl-mlp", seq=longest).peak <= 0.01 * 2**30
    assert plan(str(path), "state-ctrl-mlp", seq=longest + 256).peak > 0.01 * 2**30
    assert main(["plan", "--model", "no-such-model"]) == 2
    assert "Unknown model" in capsys.readouterr().err


def test_the_plan_commands_copies_of_the_planners_names_match_them():
    from peft_ctrl_app import plan_command

    assert plan_command.SHIPPED == SHIPPED and plan_command.METHODS == tuple(METHODS)


@pytest.mark.parametrize("method", ["state-ctrl-mlp", "state-ctrl-both", "lora-all", "lora-qv", "full"])
def test_the_fp32_projection_formula_of_docs_agrees_with_the_plan_at_7b(method):
    """docs/state_ctrl.md's Llama-2-7B table comes from a per-token formula (benchmarks/_common.py); the planner
    runs the real model instead. They agree to within 16 bytes of 45-68 GB (fp32, CPU kernels, 1 x 4096)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _common import LLAMA2_7B, projected_bytes

    formula = {
        "state-ctrl-mlp": "state-ctrl mlp r=64",
        "state-ctrl-both": "state-ctrl both r=32",
        "lora-all": "PEFT LoRA all-linear r=16",
        "lora-qv": "PEFT LoRA q,v r=16",
        "full": "full fine-tuning",
    }[method]
    planned = plan("llama-2-7b", method, dtype="fp32", seq=4096, target="cpu").saved
    assert abs(planned - projected_bytes(formula, LLAMA2_7B)) <= 16


def test_the_logits_line_counts_with_and_without_checkpointing():
    """The logits and the loss's copies are saved outside the checkpointed layers: the same bytes either way."""
    config = copy.deepcopy(TINY)
    config.vocab_size = 1000  # logits wider than any other saved tensor
    plain, checkpointed = plan(config, "lora-all", seq=64), plan(config, "lora-all-ckpt", seq=64)
    assert plain.logits == checkpointed.logits > 64 * 1000 * 2  # at least the bf16 logits of 64 tokens
    assert checkpointed.saved < plain.saved


def test_the_gpu_check_script_runs_its_cpu_dry_run_and_measures_what_it_plans():
    """benchmarks/gpu_check.py is for a CUDA machine; --smoke runs its memory part on a tiny LLaMA on the CPU, where
    the measured saved bytes must equal the planned ones for every method."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--smoke"],
        capture_output=True, text=True, timeout=600, cwd=root,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])["memory"]
    assert [r["method"] for r in rows] == list(METHODS)
    assert all(r["measured_saved"] == r["planned_saved"] for r in rows), rows


@pytest.mark.parametrize("model", ["gemma-2-9b", "qwen3-8b", "mistral-7b"])
def test_state_ctrl_plans_on_the_other_shipped_families(model):
    """The tiny twin finds the bridges on each family (Gemma-2's sandwich norms included; Gemma-2 is planned with
    eager attention, which its softcapping needs), and state-ctrl keeps less than LoRA all-linear."""
    state_ctrl, lora = plan(model, "state-ctrl-mlp", seq=256), plan(model, "lora-all", seq=256)
    assert 0 < state_ctrl.saved < lora.saved and state_ctrl.trainable_params > 0
