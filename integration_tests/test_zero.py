"""Every method under DeepSpeed ZeRO-2 and ZeRO-3 with 2 processes (CPU, gloo), through each launcher;
ODELoRA, which DeepSpeed cannot run, under plain data parallel.

Each run is a real multi-process launch of ``zero_worker.py`` (about 15 s); runs are shared between tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import build
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

from peft_ctrl.distributed import accelerate_config_path
from peft_ctrl.distributed.launch import free_port
from peft_ctrl.seal.keys import KEY_ENV

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "integration_tests" / "zero_worker.py"
sys.path.insert(0, str(WORKER.parent))
from zero_worker import SEAL_KEY, eval_batch, family  # noqa: E402

# stage None: plain data parallel (DDP over gloo), the multi-process setup ODELoRA supports and the one where
# SubLoRA's exact_svd runs
WORKING = [
    ("state-ctrl", 2),
    ("state-ctrl", 3),
    ("state-ctrl-bert", 3),
    ("seal", 2),
    ("seal", 3),
    ("sublora", 2),
    ("sublora", None),
    ("odelora", None),
]
REFUSED = [("odelora", 2), ("odelora", 3), ("sublora", 3)]
# The other configurations of the compatibility matrix (docs/compatibility.md): trained and reloaded, not resumed.
MATRIX = [(method, stage) for method in ("state-ctrl-both", "control-lora", "lean-lora") for stage in (2, 3)]


def launch(launcher: str, out: Path, *worker_args: str) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    port = str(free_port())
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    elif launcher == "deepspeed":
        command = [str(bin_dir / "deepspeed"), "--num_accelerators", "2", "--master_port", port]
    else:
        command = [str(bin_dir / "accelerate"), "launch", "--config_file", str(accelerate_config_path())]
        command += ["--main_process_port", port]
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))  # DeepSpeed's compiled ops
    env.pop("OMP_NUM_THREADS", None)  # the helper splits the cores between the processes
    command += [str(WORKER), "--out", str(out), *worker_args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


class Runs:
    """Launches on first use, keyed by their arguments, so tests share runs."""

    def __init__(self, root: Path) -> None:
        self.root, self.done = root, {}

    def __call__(
        self, method: str, stage: int, launcher: str = "torchrun", resume_of: Path | None = None, offload: bool = False
    ) -> Path:
        key = (method, stage, launcher, resume_of, offload)
        if key not in self.done:
            name = "-".join(str(k) for k in key[:3]) + ("-offload" if offload else "")
            out = self.root / name / ("resumed" if resume_of else "run")
            extra = ["--resume", str(resume_of / "checkpoint-6")] if resume_of else []
            extra += ["--offload"] if offload else []
            result = launch(launcher, out, "--method", method, "--stage", str(stage), *extra)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
            self.done[key] = out
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("zero"))


def ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize(
    ("method", "stage", "offload"), [(*pair, False) for pair in WORKING + MATRIX] + [("seal", 3, True)]
)
def test_trains_saves_and_matches_a_single_process_reload(runs, method, stage, offload, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SEAL_KEY)
    out = runs(method, stage, offload=offload)
    first, second = ranks(out)
    assert first["world_size"] == 2
    assert first["losses"] == second["losses"] and first["losses"][-1] < first["losses"][0] - 0.01
    assert first["logits"] == second["logits"]
    if method == "sublora":  # ranks agree between processes and meet the budget (2 per module, 4 modules)
        assert first["rank_pattern"] == second["rank_pattern"] and sum(first["rank_pattern"].values()) == 8
    final = load_file(out / "final" / "adapter_model.safetensors")
    helper = load_file(out / "save_adapter" / "adapter_model.safetensors")
    assert final.keys() == helper.keys() and all(torch.equal(final[k], helper[k]) for k in final)
    reloaded = PeftModel.from_pretrained(build(family(method)), out / "final").eval()
    # Not empty (ZeRO-3 shards would be): every tensor has the shape the single-process model gives it.
    assert {k: tuple(v.shape) for k, v in final.items()} == {
        k: tuple(v.shape) for k, v in get_peft_model_state_dict(reloaded).items()
    }
    assert sum(t.numel() for t in final.values()) > 0
    with torch.no_grad():
        logits = reloaded(input_ids=eval_batch(method)).logits
    torch.testing.assert_close(logits, torch.tensor(first["logits"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("method", "stage"), WORKING)
def test_resume_from_a_zero_checkpoint_continues_identically(runs, method, stage):
    full = runs(method, stage)
    resumed = runs(method, stage, resume_of=full)
    assert ranks(resumed)[0]["losses"] == ranks(full)[0]["losses"]
    a = load_file(full / "final" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_merge_under_zero3_is_refused_with_a_clear_error(runs):
    message = ranks(runs("seal", 3))[0]["merge"]
    assert "partitioned by DeepSpeed ZeRO-3" in message and "single process" in message


@pytest.mark.parametrize("launcher", ["deepspeed", "accelerate"])
def test_every_launcher_gives_the_torchrun_run(runs, launcher):
    reference = ranks(runs("state-ctrl", 2))[0]
    record = ranks(runs("state-ctrl", 2, launcher=launcher))[0]
    assert record["world_size"] == 2 and record["losses"] == reference["losses"]


@pytest.mark.parametrize(("method", "stage"), REFUSED)
def test_unsupported_method_and_stage_fail_at_start_up(tmp_path, method, stage):
    result = launch("torchrun", tmp_path, "--method", method, "--stage", str(stage))
    assert result.returncode != 0
    assert f"does not run under DeepSpeed ZeRO stage {stage}" in result.stderr
    assert "It runs under" in result.stderr and not (tmp_path / "checkpoint-6").exists()
