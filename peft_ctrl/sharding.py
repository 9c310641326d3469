"""How a tensor is sharded, tested once for the whole library (the bottom layer: imports nothing of peft_ctrl).

Methods ask these questions before reading whole weights (merging, integrating ODELoRA's flow); the
``peft_ctrl.distributed`` launchers and savers ask them too. DeepSpeed ZeRO-3 marks its parameters with
``ds_numel`` (the full size) and keeps a shard, or nothing, on each rank; FSDP2 turns parameters into DTensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def is_zero3(tensor: torch.Tensor) -> bool:
    """True for a parameter DeepSpeed ZeRO-3 manages, gathered right now or not (DeepSpeed gives each one a
    ``ds_id`` and its full size ``ds_numel``)."""
    return getattr(tensor, "ds_id", None) is not None or getattr(tensor, "ds_numel", None) is not None


def is_partitioned(tensor: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter whose full value is not on this rank right now."""
    full = getattr(tensor, "ds_numel", None)
    return full is not None and tensor.numel() != full


def is_dtensor(tensor: torch.Tensor) -> bool:
    """True for an FSDP2 shard (a ``torch.distributed.tensor.DTensor``)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """True when ``model``'s parameters are FSDP2 shards (DTensors)."""
    return any(is_dtensor(p) for p in model.parameters())


def require_gathered(tensors: Iterable[torch.Tensor], action: str) -> None:
    """Raise ``ValueError`` before ``action`` reads ZeRO-3-partitioned tensors (it would see empty shards)."""
    if any(is_partitioned(t) for t in tensors):
        raise ValueError(
            f"Cannot {action}: the weights are partitioned by DeepSpeed ZeRO-3, so this rank holds only a shard. "
            "Save the adapter (trainer.save_model() or peft_ctrl.distributed.save_adapter) and "
            f"{action} after loading it in a single process, or inside deepspeed.zero.GatheredParameters."
        )


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) outside torch.distributed."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
