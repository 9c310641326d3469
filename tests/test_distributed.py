"""peft_ctrl.distributed without launching processes: configs, the method/stage table, launcher checks,
ZeRO-3 guards. The multi-process runs are in integration_tests/test_zero.py."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
import yaml
from models import build
from peft import get_peft_model

from peft_ctrl import SealConfig, SubLoRAConfig
from peft_ctrl.distributed import (
    FSDP_SUPPORTED,
    SUPPORTED_STAGES,
    accelerate_config_path,
    accelerate_fsdp_config_path,
    check_stage,
    config_path,
    deepspeed_stage,
    require_gathered,
    shard_model,
    strip_local_rank,
    training_arguments,
    zero_config,
)
from peft_ctrl.distributed.launch import _check_environment, init_distributed
from trainer_callbacks import ODELoRATrainer, SubLoRACallback

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


@pytest.mark.parametrize(("stage", "offload"), [(2, False), (3, False), (3, True)])
def test_shipped_configs_use_trainer_auto_values(stage, offload):
    config = zero_config(stage, offload)
    assert config == json.loads(config_path(stage, offload).read_text()) or offload
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto"
    assert config["optimizer"]["params"]["lr"] == "auto"
    if stage == 3:  # without this, saving under ZeRO-3 writes empty adapters
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
        # DeepSpeed's replacement linear saves inputs of frozen linears too (benchmarks/zero_memory.py)
        assert zero["memory_efficient_linear"] is False
    assert ("offload_param" in zero) == offload and ("offload_optimizer" in zero) == offload
    if offload and not torch.cuda.is_available():
        assert zero["offload_param"] == {"device": "cpu", "pin_memory": False}


def test_unshipped_config_names_the_shipped_ones():
    with pytest.raises(ValueError, match="shipped: stage=2, offload=False"):
        zero_config(2, offload=True)
    with pytest.raises(ValueError, match="No shipped ZeRO config for stage=1"):
        config_path(1)


def test_accelerate_config_launches_deepspeed_without_overriding_the_zero_config():
    config = yaml.safe_load(accelerate_config_path().read_text())
    assert config["distributed_type"] == "DEEPSPEED" and config["num_processes"] == 2
    # accelerate refuses a launch config that sets what TrainingArguments(deepspeed=...) also sets
    assert set(config["deepspeed_config"]) == {"zero3_init_flag"} and "mixed_precision" not in config


def test_stage_table_and_messages():
    for method, stages in SUPPORTED_STAGES.items():
        check_stage(method, None)  # no DeepSpeed: every method runs
        for stage in stages:
            check_stage(method, stage)
    with pytest.raises(ValueError, match=r"sublora does not run under DeepSpeed ZeRO stage 3.*ZeRO stages 0, 1, 2"):
        check_stage("sublora", 3)
    with pytest.raises(ValueError, match=r"odelora .* stage 2.*use torchrun.*runs under no DeepSpeed stage"):
        check_stage("odelora", 2)
    with pytest.raises(ValueError, match="Unknown method"):
        check_stage("dora", 2)


def test_deepspeed_stage_reads_dicts_files_and_the_accelerate_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert deepspeed_stage(SimpleNamespace(deepspeed=None)) is None
    assert deepspeed_stage(SimpleNamespace(deepspeed=zero_config(3))) == 3
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert deepspeed_stage(SimpleNamespace(deepspeed=str(path))) == 1
    assert deepspeed_stage(SimpleNamespace(deepspeed={})) == 0
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert deepspeed_stage(SimpleNamespace(deepspeed=None)) == 3


def test_strip_local_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_local_rank(["--local_rank=1", "--x", "2"]) == ["--x", "2"] and os.environ["LOCAL_RANK"] == "1"
    assert strip_local_rank(["--local-rank", "1", "--y"]) == ["--y"]
    with pytest.raises(ValueError, match="disagrees with LOCAL_RANK=1"):
        strip_local_rank(["--local_rank=0"])
    with pytest.raises(ValueError, match="needs a value"):
        strip_local_rank(["--local_rank"])


@pytest.fixture
def clean_env(monkeypatch):
    for var in (*LAUNCH_VARS, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_single_process_gets_its_own_rendezvous(clean_env):
    assert _check_environment() == 1
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["RANK"] == "0" and int(os.environ["MASTER_PORT"]) > 0


def test_incomplete_or_foreign_launch_environments_are_refused(clean_env):
    clean_env.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match="WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing.*torchrun"):
        _check_environment()
    clean_env.delenv("RANK")
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"mpirun \(Open MPI\).*torchrun --nproc_per_node"):
        _check_environment()
    clean_env.delenv("OMPI_COMM_WORLD_SIZE")
    clean_env.setenv("SLURM_NTASKS", "4")
    with pytest.raises(RuntimeError, match="inside `srun`"):
        _check_environment()
    clean_env.delenv("SLURM_NTASKS")
    clean_env.setenv("RANK", "2")
    for var, value in (("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "x"), ("MASTER_PORT", "1")):
        clean_env.setenv(var, value)
    with pytest.raises(RuntimeError, match="RANK=2 is outside WORLD_SIZE=2"):
        _check_environment()


def partition_like_zero3(param: torch.nn.Parameter) -> None:
    """What ZeRO-3 leaves on a rank between forwards: an empty tensor and the full size in ``ds_numel``."""
    param.ds_numel = param.numel()
    param.data = torch.empty(0)


def test_merge_of_partitioned_weights_is_refused_and_changes_nothing():
    model = get_peft_model(build("llama"), SealConfig(r=2, key="k" * 16, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    partition_like_zero3(layer.base_layer.weight)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="partitioned by DeepSpeed ZeRO-3.*single process"):
        model.merge_adapter()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()) and not layer.merged
    require_gathered([torch.zeros(3)], "merge")  # whole tensors pass


def test_sublora_callback_refuses_zero3_the_regulariser_and_exact_svd_under_deepspeed():
    config = SubLoRAConfig(r=2, target_r=1, target_modules=["q_proj"], total_step=20)
    model = get_peft_model(build("llama"), config)
    callback = SubLoRACallback()
    with pytest.raises(ValueError, match="Set exact_svd=False under DeepSpeed"):
        callback.on_init_end(SimpleNamespace(deepspeed=zero_config(2)), None, None, model=model)
    model.peft_config["default"].exact_svd = False
    with pytest.raises(ValueError, match="ZeRO stage 3.*ZeRO stages 0, 1, 2"):
        callback.on_init_end(SimpleNamespace(deepspeed=zero_config(3)), None, None, model=model)
    callback.on_init_end(SimpleNamespace(deepspeed=zero_config(2)), None, None, model=model)
    model.peft_config["default"].orth_reg_weight = 0.1
    with pytest.raises(ValueError, match="orth_reg_weight=0"):
        callback.on_init_end(SimpleNamespace(deepspeed=zero_config(2)), None, None, model=model)
    callback.on_init_end(SimpleNamespace(deepspeed=None), None, None, model=model)


def test_cli_prints_config_paths(capsys):
    from peft_ctrl_app.cli import main

    assert main(["zero-config", "--stage", "3", "--offload"]) == 0
    assert capsys.readouterr().out.strip() == str(config_path(3, True))
    assert main(["zero-config", "--accelerate"]) == 0
    assert capsys.readouterr().out.strip() == str(accelerate_config_path())
    assert main(["zero-config", "--fsdp"]) == 0
    assert capsys.readouterr().out.strip() == str(accelerate_fsdp_config_path())
    assert main(["zero-config", "--stage", "1"]) == 2
    assert "No shipped ZeRO config for stage=1" in capsys.readouterr().err


def test_fsdp2_accelerate_config_shards_every_block_and_gathers_the_full_state_dict():
    config = yaml.safe_load(accelerate_fsdp_config_path().read_text())
    assert config["distributed_type"] == "FSDP" and config["num_processes"] == 2
    fsdp = config["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_fsdp_without_cuda_is_refused_not_run_as_plain_data_parallel(tmp_path, monkeypatch):
    """accelerate turns FSDP on only for GPUs and other accelerators; on CPU it trains plain DDP silently."""
    if torch.cuda.is_available():
        pytest.skip("FSDP runs under accelerate on GPUs")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    with pytest.raises(ValueError, match=r"fsdp=\.\.\.\) was given without CUDA.*plain data parallel.*shard_model"):
        training_arguments(str(tmp_path), stage=None, fsdp=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets from an FSDP config
    with pytest.raises(ValueError, match="launched with FSDP on.*ZeRO-3"):
        init_distributed(deepspeed=False)


def test_sublora_and_odelora_refuse_fsdp_with_the_reason(monkeypatch):
    assert FSDP_SUPPORTED == {"state_ctrl": True, "seal": True, "sublora": False, "odelora": False}
    model = get_peft_model(build("llama"), SubLoRAConfig(r=2, target_r=1, target_modules=["q_proj"], total_step=20))
    with pytest.raises(ValueError, match="sublora does not run under FSDP.*second derivatives.*ZeRO-2"):
        shard_model(model)  # refused before any sharding: no process group needed
    callback = SubLoRACallback()
    with pytest.raises(ValueError, match="sublora does not run under FSDP"):
        callback.on_init_end(SimpleNamespace(deepspeed=None, fsdp=True), None, None, model=model)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="sublora does not run under FSDP"):
        callback.on_init_end(SimpleNamespace(deepspeed=None), None, None, model=model)
    from peft import LoraConfig
    from transformers import TrainingArguments

    lora = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="odelora does not run under FSDP.*r x r system"):
        ODELoRATrainer(model=lora, args=args)


def test_shard_model_needs_transformer_blocks():
    from peft_ctrl import StateCtrlConfig

    model = get_peft_model(build("llama"), StateCtrlConfig(r=2))
    for module in (model.base_model.model, model.base_model.model.model):  # LlamaForCausalLM, LlamaModel
        module._no_split_modules = None
    with pytest.raises(ValueError, match="no transformer blocks to wrap"):
        shard_model(model)
