"""What each method can run under, and why not where it cannot: one table and one reason text per method and
engine (DeepSpeed ZeRO stages, FSDP), used by every check that enforces a limit (the methods' own checks, the
Trainer callbacks and ``peft_ctrl.distributed``). The bottom layer: imports nothing of peft_ctrl."""

from __future__ import annotations

# ZeRO stages each method supports under DeepSpeed (0 is DeepSpeed's plain data parallel), and why not others.
SUPPORTED_STAGES: dict[str, tuple[int, ...]] = {
    "state_ctrl": (0, 1, 2, 3),
    "seal": (0, 1, 2, 3),
    "sublora": (0, 1, 2),
    "odelora": (),
}
_WHY_NOT_ZERO = {
    "sublora": (
        "SubLoRA's allocation needs every rank to hold all of P, lambda, Q and the masks whole, and takes "
        "second derivatives through the model, which ZeRO-3's partitioned parameters do not allow"
    ),
    "odelora": (
        "ODELoRA integrates an r x r system per LoRA pair inside its own optimizer, while DeepSpeed replaces "
        "the optimizer and partitions its state (ZeRO-1/2) or the factors themselves (ZeRO-3); use torchrun or "
        "accelerate launch without DeepSpeed (plain data parallel)"
    ),
}

# Whether each method trains under FSDP, and why not where it does not.
FSDP_SUPPORTED: dict[str, bool] = {"state_ctrl": True, "seal": True, "sublora": False, "odelora": False}
_WHY_NOT_FSDP = {
    "sublora": (
        "SubLoRA's allocation reads P, lambda, Q and the masks whole on every rank and takes second derivatives "
        "through the model, while FSDP holds only a shard of each and gathers parameters inside each block's "
        "forward only (as DeepSpeed ZeRO-3 does, which SubLoRA refuses too). Train SubLoRA in a single process, "
        "with plain data parallel (torchrun, accelerate launch without FSDP) or under DeepSpeed ZeRO-2"
    ),
    "odelora": (
        "ODELoRA integrates an r x r system per LoRA pair from the whole factors, while FSDP hands the optimizer "
        "one shard of each. Train with ODELoRA in a single process or with plain data parallel (torchrun, "
        "accelerate launch without FSDP)"
    ),
}


def check_stage(method: str, stage: int | None) -> None:
    """Raise ``ValueError`` when ``method`` cannot run under ZeRO ``stage`` (``None``: no DeepSpeed, always fine)."""
    if method not in SUPPORTED_STAGES:
        raise ValueError(f"Unknown method {method!r}; known: {sorted(SUPPORTED_STAGES)}.")
    if stage is None or stage in SUPPORTED_STAGES[method]:
        return
    raise ValueError(f"{method} does not run under DeepSpeed ZeRO stage {stage}: {deepspeed_limit(method)}")


def deepspeed_limit(method: str) -> str:
    """Why ``method`` does not run under the ZeRO stages it does not support, and where it does run: the one
    statement of each limit, used by every check that enforces it."""
    supported = SUPPORTED_STAGES[method]
    where = f"ZeRO stages {', '.join(map(str, supported))}" if supported else "no DeepSpeed stage"
    return (
        f"{_WHY_NOT_ZERO[method]}. It runs under {where}, and without DeepSpeed in a single process or plain data "
        "parallel."
    )


def fsdp_limit(method: str) -> str:
    """Why ``method`` does not run under FSDP, and where it does run."""
    return f"{method} does not run under FSDP: {_WHY_NOT_FSDP[method]}."
