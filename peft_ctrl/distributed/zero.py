"""The shipped DeepSpeed ZeRO configs and what each peft-ctrl method can do under each stage."""

from __future__ import annotations

import contextlib
import json
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from ..sharding import is_sharded, is_zero3, rank_and_world
from .fsdp import full_adapter_state

CONFIG_DIR = Path(__file__).parent / "configs"
_FILES = {(2, False): "zero2.json", (3, False): "zero3.json", (3, True): "zero3_offload.json"}


def config_path(stage: int, offload: bool = False) -> Path:
    """Path of the shipped JSON config for ``stage`` (2 or 3; ``offload`` only with 3)."""
    if (stage, offload) not in _FILES:
        shipped = ", ".join(f"stage={s}, offload={o}" for s, o in _FILES)
        raise ValueError(f"No shipped ZeRO config for stage={stage}, offload={offload}; shipped: {shipped}.")
    return CONFIG_DIR / _FILES[(stage, offload)]


def zero_config(stage: int, offload: bool = False) -> dict[str, Any]:
    """The shipped ZeRO config as a dict (Trainer "auto" values), ready for ``TrainingArguments(deepspeed=...)``.

    Without CUDA, offloaded tensors are not pinned (pinning needs a GPU driver); everything else is the file.
    """
    config = json.loads(config_path(stage, offload).read_text())
    if offload and not torch.cuda.is_available():
        for key in ("offload_optimizer", "offload_param"):
            config["zero_optimization"][key]["pin_memory"] = False
    return config


def accelerate_config_path() -> Path:
    """Path of the shipped ``accelerate launch --config_file`` YAML (DeepSpeed, 2 processes, one machine)."""
    return CONFIG_DIR / "accelerate_deepspeed.yaml"


def deepspeed_stage(args: Any) -> int | None:
    """The ZeRO stage a ``TrainingArguments`` runs under, or ``None`` without DeepSpeed."""
    config = getattr(args, "deepspeed", None)
    hf_config = getattr(args, "hf_deepspeed_config", None)
    if hf_config is not None:
        config = hf_config.config
    if config is None:
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
            return None
        return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    return int(config.get("zero_optimization", {}).get("stage", 0))


def gathered(params: list[torch.nn.Parameter]) -> AbstractContextManager:
    """Context that holds the full value of ZeRO-3 parameters on every rank (a no-op for whole tensors)."""
    partitioned = [p for p in params if is_zero3(p)]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def save_adapter(model: torch.nn.Module, output_dir: str | os.PathLike, **kwargs: Any) -> None:
    """``model.save_pretrained(output_dir, **kwargs)`` that also works under ZeRO-3 and FSDP; call it on every rank.

    Under ZeRO-3 and FSDP each rank holds a shard of every parameter, and a plain ``save_pretrained`` writes
    empty or sharded tensors (peft #2500). This gathers the adapter's parameters (trainable ones and the tuner's
    frozen ones, such as SubLoRA's masks), never the frozen base, lets rank 0 write, and waits for it. Outside
    DeepSpeed and FSDP it saves on rank 0.
    """
    unwrapped = getattr(model, "module", model)
    prefix = getattr(getattr(unwrapped, "base_model", None), "prefix", None)
    adapter = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad or (prefix and prefix in n)}
    rank, world = rank_and_world()
    if is_sharded(unwrapped):
        state = full_adapter_state(unwrapped, set(adapter))
        if rank == 0:
            unwrapped.save_pretrained(output_dir, state_dict=state, **kwargs)
    else:
        with gathered(list(adapter.values())):
            if rank == 0:
                unwrapped.save_pretrained(output_dir, **kwargs)
    if world > 1:
        torch.distributed.barrier()
