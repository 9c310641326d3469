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
from peft_ctrl.planner.quantized import quantize_nf4, weight_bytes

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


def measured(config, method: str, batch: int, seq: int, dtype: str = "fp32") -> tuple[int, int, int]:
    """(saved bytes, weight bytes, trainable parameters) of one real CPU step (the quantised methods on
    bitsandbytes' CPU backend; dtype "autocast": fp32 weights under CPU bf16 autocast)."""
    torch.manual_seed(0)
    model = build(config, method, dtype, device="cpu")
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with SavedTensorMeter(exclude=model) as meter, torch.autocast("cpu", torch.bfloat16, enabled=dtype == "autocast"):
        model(input_ids=ids, labels=ids).loss.backward()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return meter.total_bytes, weight_bytes(model), trainable


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("config", "batch", "seq"), [(TINY, 2, 9), (SMOLLM2, 1, 16)], ids=["tiny", "smollm2"])
def test_the_plan_equals_the_meter_to_the_byte(method, config, batch, seq):
    planned = plan(config, method, dtype="fp32", batch=batch, seq=seq, target="cpu")
    saved, weights, trainable = measured(config, method, batch, seq)
    assert (planned.saved, planned.weights, planned.trainable_params) == (saved, weights, trainable)
    assert planned.gradients == 4 * trainable and planned.optimizer == 8 * trainable


@pytest.mark.parametrize("method", list(METHODS))
def test_autocast_plans_equal_a_real_autocast_step_to_the_byte(method):
    """dtype "autocast": the plan runs fake CPU tensors under torch's own CPU autocast; the real step runs the same
    model with random fp32 weights under it. Frozen fp32 weights are cast per call and the bf16 copies that a
    linear layer keeps for its input gradient are saved bytes, in both."""
    planned = plan(TINY, method, dtype="autocast", batch=2, seq=9, target="cpu")
    assert (planned.saved, planned.weights, planned.trainable_params) == measured(TINY, method, 2, 9, "autocast")
    assert planned.gradients == 4 * planned.trainable_params


def test_the_cuda_target_runs_cudas_float32_autocast_list():
    """CUDA autocast runs softmax (and the rest of its float32 list) in fp32 where CPU autocast leaves bf16; the
    cuda target's function mode does what CUDA does, and leaves fp32 inputs and other functions alone."""
    from peft_ctrl.planner.autocast import cuda_float32_ops

    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        h = torch.nn.functional.linear(x, torch.randn(8, 8))
        assert h.dtype == torch.bfloat16 and torch.softmax(h, -1).dtype == torch.bfloat16
        with cuda_float32_ops():
            assert torch.softmax(h, -1).dtype == torch.float32 and h.pow(2).dtype == torch.float32
            assert torch.relu(h).dtype == torch.bfloat16 and torch.softmax(x, -1).dtype == torch.float32
    with cuda_float32_ops():  # without autocast, nothing changes
        assert torch.softmax(h, -1).dtype == torch.bfloat16


def test_autocast_saves_one_bf16_copy_of_every_linear_weight():
    """Under autocast every fp32 linear weight is cast to bf16 and the copy is kept for the input gradient: bytes
    that do not grow with the sequence. The part of full fine-tuning's saved bytes that does not grow with the
    sequence (2 s(8) - s(16)) is exactly those copies more under autocast than in fp32: 2 layers of 36,864 weights
    and the 128 x 64 LM head, 2 bytes each."""

    def fixed(dtype: str) -> int:
        short, long = (plan(TINY, "full", dtype=dtype, seq=seq, target="cpu").saved for seq in (8, 16))
        return 2 * short - long

    assert fixed("autocast") - fixed("fp32") == 2 * (2 * 36_864 + 128 * 64)
    assert plan(TINY, "qlora", dtype="autocast", seq=16).weights < plan(TINY, "lora-all", dtype="autocast").weights


@pytest.mark.parametrize("method", ["qlora", "qcontrol"])
def test_quantised_methods_plan_to_the_byte_with_bf16_compute(method):
    """nf4 base computing in bf16; prepare_model_for_kbit_training leaves the rest of the model and the adapters in
    fp32, so the gradients are still 4 bytes per trainable parameter."""
    planned = plan(TINY, method, dtype="bf16", batch=2, seq=9, target="cpu")
    assert (planned.saved, planned.weights, planned.trainable_params) == measured(TINY, method, 2, 9, "bf16")
    assert planned.gradients == 4 * planned.trainable_params
    assert planned.weights < plan(TINY, "lora-all", dtype="bf16", seq=8, target="cpu").weights


def test_the_planners_nf4_base_is_the_one_transformers_loads(tmp_path):
    """quantize_nf4 holds the same modules in nf4, with the same bytes (packed weights and quantisation state), as
    from_pretrained with QLoRA's BitsAndBytesConfig; on the meta device it plans those bytes without weights."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(TINY).save_pretrained(tmp_path)
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant)
    ours = quantize_nf4(transformers.AutoModelForCausalLM.from_config(TINY), torch.bfloat16)
    with torch.device("meta"):
        meta = quantize_nf4(transformers.AutoModelForCausalLM.from_config(TINY), torch.bfloat16)

    def nf4(model):
        return sorted(n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit))

    assert len(nf4(loaded)) == 2 * 7 and nf4(ours) == nf4(loaded) == nf4(meta)
    assert weight_bytes(ours) == weight_bytes(loaded) == weight_bytes(meta)


def test_the_cuda_target_saves_bool_dropout_masks_and_flash_attention_tensors():
    """Against the CPU model of the same step: dropout masks shrink from 4 bytes to 1 per element, and attention
    saves the same tensors (both fused kernels keep q, k, v, the output and the log-sum-exp)."""
    cpu = plan(TINY, "lora-all", dtype="bf16", batch=2, seq=32, target="cpu")
    cuda = plan(TINY, "lora-all", dtype="bf16", batch=2, seq=32, target="cuda")
    assert cuda.saved < cpu.saved
    no_dropout_cpu = plan(TINY, "state-ctrl-mlp", dtype="bf16", batch=2, seq=32, target="cpu")
    no_dropout_cuda = plan(TINY, "state-ctrl-mlp", dtype="bf16", batch=2, seq=32, target="cuda")
    assert abs(no_dropout_cuda.saved - no_dropout_cpu.saved) <= 2 * 16 + 8  # the flash kernel's RNG seed and offset


def test_fp32_on_cuda_takes_the_memory_efficient_kernel_where_heads_are_not_grouped():
    """FlashAttention takes no fp32: CUDA runs the memory-efficient kernel, which saves what CPU's flash kernel
    saves plus its RNG seed and offset (16 bytes a layer; the log-sum-exp of 32 rows needs no padding), but only
    for equal head counts; grouped key/value heads in fp32 fall back to the math path, which keeps more."""
    mha = copy.deepcopy(TINY)
    mha.num_key_value_heads = mha.num_attention_heads
    cuda, cpu = (plan(mha, "full", dtype="fp32", seq=32, target=t).saved for t in ("cuda", "cpu"))
    assert cuda - cpu == 2 * 16
    gqa_cuda, gqa_cpu = (plan(TINY, "full", dtype="fp32", seq=32, target=t).saved for t in ("cuda", "cpu"))
    assert gqa_cuda > gqa_cpu + 2 * 4 * 32 * 32 * 4  # at least the fp32 attention probabilities of 2 layers


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
        ({"method": "qlora-int3"}, "method must be one of"),
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
