"""FSDP2 with 2 processes on CPU (gloo): state-ctrl (mlp, both), Control+LoRA, SEAL and peft LoRA under lean_lora
train sharded with the 1-process losses, the saved adapter is whole and loads with stock peft; SubLoRA and
ODELoRA are refused with the reason; an FSDP launch through accelerate, which has no FSDP on CPU, is refused
instead of silently training plain data parallel.

The runs are examples/fsdp2_training.py itself (about 10 s each), launched as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from peft_ctrl.distributed import accelerate_fsdp_config_path
from peft_ctrl.distributed.launch import free_port
from peft_ctrl.seal.keys import KEY_ENV

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fsdp2_training.py"
sys.path.insert(0, str(EXAMPLE.parent))
from fsdp2_training import base_model, batch  # noqa: E402

SEAL_KEY = "example-key-0123456789abcdef"  # the example's key


def run(out: Path, *args: str, processes: int = 1) -> subprocess.CompletedProcess:
    command = [sys.executable]
    if processes > 1:
        command += ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_FSDP", None)
    command += [str(EXAMPLE), "--output-dir", str(out), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


# The example's arguments for each configuration of the compatibility matrix (docs/compatibility.md).
SHARDED = {
    "state-ctrl-both": ["--method", "state-ctrl", "--blocks", "both"],
    "state-ctrl-mlp": ["--method", "state-ctrl", "--blocks", "mlp"],
    # at the example's 2e-2 its loss oscillates from step 12 on, and rounding differences grow from there
    "control-lora": ["--method", "control-lora", "--lr", "1e-2"],
    "seal": ["--method", "seal"],
    "lean-lora": ["--method", "lean-lora"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(1-process, 2-process) output folders of each method that trains under FSDP."""
    done = {}
    for method in SHARDED:
        folders = []
        for processes in (1, 2):
            out = tmp_path_factory.mktemp(f"{method}-{processes}")
            result = run(out, *SHARDED[method], processes=processes)
            assert result.returncode == 0, result.stderr[-3000:]
            folders.append(out)
        done[method] = folders
    return done


@pytest.mark.parametrize("method", list(SHARDED))
def test_sharded_run_matches_one_process_and_saves_the_whole_adapter(runs, method, monkeypatch):
    single, sharded = runs[method]
    losses = [json.loads((folder / "losses.json").read_text()) for folder in (single, sharded)]
    assert losses[0][-1] < losses[0][0] - 0.3  # it learns
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-5)
    tensors = [load_file(folder / "adapter" / "adapter_model.safetensors") for folder in (single, sharded)]
    assert sorted(tensors[1]) == sorted(tensors[0]) and tensors[0]  # complete: every tensor, none sharded
    for name, value in tensors[0].items():
        assert tensors[1][name].shape == value.shape
        # Adam's normalised steps turn rounding differences in small gradients into weight differences: up to
        # 2e-5 after 20 steps of 2e-2 (lean-lora), 0.1% of one step, with the losses equal to 1e-6.
        torch.testing.assert_close(tensors[1][name], value, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv(KEY_ENV, SEAL_KEY)
    ids = batch(0)[:2]
    logits = []
    for folder in (single, sharded):
        loaded = PeftModel.from_pretrained(base_model(), folder / "adapter").eval()
        with torch.no_grad():
            logits.append(loaded(input_ids=ids).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    for d, _, files in os.walk(sharded):
        for f in files:
            assert SEAL_KEY.encode() not in Path(d, f).read_bytes()


def test_lean_lora_with_dropout_trains_sharded(tmp_path):
    """With dropout each process draws its own masks, so the losses are not the 1-process ones; the fused op's
    regenerated masks still train under FSDP and the gathered adapter is whole."""
    result = run(tmp_path, "--method", "lean-lora", "--dropout", "0.1", processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert losses[-1] < losses[0] - 0.3
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == 2 * 14 and all(t.numel() > 0 for t in saved.values())  # A and B of 7 linears x 2 layers
    PeftModel.from_pretrained(base_model(), tmp_path / "adapter")


@pytest.mark.parametrize(
    ("method", "reason"),
    [("sublora", "sublora does not run under FSDP: SubLoRA's allocation"), ("odelora", "odelora does not run under")],
)
def test_methods_that_cannot_run_sharded_are_refused(tmp_path, method, reason):
    if method == "odelora":
        worker = tmp_path / "odelora_fsdp.py"
        worker.write_text(
            "import torch.distributed as dist\n"
            "from peft import LoraConfig, get_peft_model\n"
            f"import sys; sys.path.insert(0, {str(EXAMPLE.parent)!r})\n"
            "from fsdp2_training import base_model\n"
            "from peft_ctrl.distributed import shard_model\n"
            "from peft_ctrl.optim import create_odelora_optimizer\n"
            "dist.init_process_group('gloo')\n"
            "model = shard_model(get_peft_model(base_model(), LoraConfig(r=4, target_modules=['q_proj'])))\n"
            "create_odelora_optimizer(model, lr=1e-2)\n"
        )
        port = f"--master_port={free_port()}"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", port, str(worker)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    else:
        result = run(tmp_path, "--method", method, processes=2)
    assert result.returncode != 0 and reason in result.stderr
    assert not (tmp_path / "adapter").exists()


def test_accelerate_fsdp_launch_on_cpu_is_refused_with_the_alternatives(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("on GPUs accelerate runs FSDP")
    script = tmp_path / "train.py"
    script.write_text(
        "import os\n"
        "print('FSDP_VERSION', os.environ.get('FSDP_VERSION'), os.environ.get('FSDP_STATE_DICT_TYPE'), flush=True)\n"
        "from peft_ctrl.distributed import training_arguments\n"
        f"training_arguments({str(tmp_path / 'out')!r}, stage=None)\n"
        "print('trained without FSDP')\n"
    )
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--config_file", str(accelerate_fsdp_config_path())]
    command += ["--main_process_port", str(free_port()), str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.stdout.count("FSDP_VERSION 2 FULL_STATE_DICT") == 2  # accelerate read the shipped config
    assert result.returncode != 0 and "trained without FSDP" not in result.stdout
    assert "accelerate runs FSDP only on GPUs" in result.stderr and "shard_model" in result.stderr
