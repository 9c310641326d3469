"""FSDP2 (torch's ``fully_shard``) for peft-ctrl adapters: which methods run sharded, sharding a PEFT model for a
custom training loop, and the accelerate launch config shipped for the Trainer on GPUs.

Under FSDP every rank holds a shard of every parameter and each wrapped block gathers its parameters for its
own forward and backward. State-ctrl bridges live inside the decoder blocks they bridge and SEAL's factors and
passports inside the linear layers they adapt, so both are gathered with their block and train unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..capabilities import fsdp_limit
from ..sharding import is_dtensor

_CPU_FSDP = (
    "accelerate runs FSDP only on GPUs and other accelerators: on CPU it ignores the FSDP settings and trains "
    "plain data parallel instead, without the sharding you asked for. On CPU, shard a custom training loop with "
    "peft_ctrl.distributed.shard_model (torch's fully_shard over gloo; examples/fsdp2_training.py), or shard "
    "with DeepSpeed ZeRO-3 (peft_ctrl.distributed.training_arguments(stage=3))"
)


def check_fsdp(model: nn.Module) -> None:
    """Raise ``ValueError`` when ``model`` holds an adapter of a method that cannot train under FSDP."""
    configs = [
        c for m in model.modules() if isinstance(getattr(m, "peft_config", None), dict) for c in m.peft_config.values()
    ]
    if any(str(getattr(c, "peft_type", "")).rpartition(".")[2].upper() == "SUBLORA" for c in configs):
        raise ValueError(fsdp_limit("sublora"))


def refuse_cpu_fsdp() -> None:
    """Raise ``ValueError`` when an accelerate launch config turned FSDP on in a process without CUDA."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available():
        raise ValueError(f"This process was launched with FSDP on (ACCELERATE_USE_FSDP=true), but {_CPU_FSDP}.")


def cpu_fsdp_error() -> str:
    """The message for ``TrainingArguments(fsdp=...)`` without CUDA."""
    return f"TrainingArguments(fsdp=...) was given without CUDA, but {_CPU_FSDP}."


def fsdp_requested(args: Any) -> bool:
    """Whether the Trainer will run FSDP: ``TrainingArguments(fsdp=...)`` or an accelerate launch config."""
    return bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The transformer block classes of the wrapped transformers model (its ``_no_split_modules``)."""
    from transformers import PreTrainedModel

    names = {n for m in model.modules() if isinstance(m, PreTrainedModel) for n in (m._no_split_modules or [])}
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def shard_model(model: nn.Module, **fully_shard_kwargs: Any) -> nn.Module:
    """Shard a PEFT model with FSDP2 for a custom training loop: ``fully_shard`` on every transformer block, then
    on the whole model (the layout accelerate's FSDP2 ``TRANSFORMER_BASED_WRAP`` gives the Trainer on GPUs).

    Call it after ``get_peft_model`` and before building the optimizer, in every process of an initialised
    process group (gloo on CPU, nccl on GPUs). Keyword arguments go to ``torch.distributed.fsdp.fully_shard``
    (``mesh``, ``reshard_after_forward``, ``mp_policy``, ...). Save with ``peft_ctrl.distributed.save_adapter``,
    which gathers the adapter's shards. Raises ``ValueError`` for a method that cannot train sharded
    (``FSDP_SUPPORTED``) or a model without transformer blocks to wrap.
    """
    from torch.distributed.fsdp import fully_shard

    check_fsdp(model)
    classes = block_classes(model)
    if not classes:
        raise ValueError(
            "shard_model found no transformer blocks to wrap: the base model must be a transformers model whose "
            "_no_split_modules names its block class (LlamaDecoderLayer, BertLayer, ...)."
        )
    for module in [m for m in model.modules() if type(m) in classes]:
        fully_shard(module, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


def full_adapter_state(model: nn.Module, keep: set[str]) -> dict[str, torch.Tensor]:
    """The model's state dict with the FSDP2 shards named in ``keep`` gathered whole; every rank must call it.
    Other shards (the frozen base) are left out and unsharded tensors (buffers) kept as they are."""
    state = {}
    for name, tensor in model.state_dict().items():
        if is_dtensor(tensor):
            if name in keep:
                state[name] = tensor.full_tensor().cpu()
        else:
            state[name] = tensor
    return state


def accelerate_fsdp_config_path() -> Path:
    """Path of the shipped ``accelerate launch --config_file`` YAML for FSDP2 (GPUs, 2 processes, one machine)."""
    return Path(__file__).parent / "configs" / "accelerate_fsdp2.yaml"
