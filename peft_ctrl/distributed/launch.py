"""One call that prepares a process for multi-process training, on CPU (gloo) or GPUs.

``training_arguments`` hides what a 2-process CPU run otherwise needs by hand: the launcher's variables
checked, a single process given its own rendezvous, threads split between the processes, accelerate's state
configured for gloo (``PartialState(backend="gloo")`` and ``use_configured_state``), DeepSpeed's config
filled in and ``average_tokens_across_devices=False`` (BERT-style heads return a mean loss).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import torch
from transformers import TrainingArguments

from .fsdp import cpu_fsdp_error, refuse_cpu_fsdp
from .zero import zero_config

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_FOREIGN_LAUNCHERS = {
    "OMPI_COMM_WORLD_SIZE": "mpirun (Open MPI)",
    "PMI_SIZE": "mpirun (MPICH / Intel MPI)",
    "SLURM_NTASKS": "srun (SLURM)",
}
_RECIPES = (
    "launch with `torchrun --nproc_per_node=N script.py`, `deepspeed --num_gpus N script.py` (on CPU: "
    "`--num_accelerators N`) or `accelerate launch --config_file <peft_ctrl.distributed.accelerate_config_path()> "
    "--num_processes N script.py`; under SLURM run one of those inside `srun`"
)


def strip_local_rank(argv: list[str]) -> list[str]:
    """``argv`` without the ``--local_rank``/``--local-rank`` argument the ``deepspeed`` launcher appends.

    The value must agree with ``LOCAL_RANK`` (which every launcher sets); it is exported when missing.
    """
    out, value, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        name, _, inline = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if inline == "" and i + 1 >= len(argv):
                raise ValueError(f"{name} needs a value (the launcher passes --local_rank=N).")
            value = inline if inline else argv[i + 1]
            i += 1 if inline else 2
            continue
        out.append(arg)
        i += 1
    if value is not None:
        env = os.environ.setdefault("LOCAL_RANK", value)
        if env != value:
            raise ValueError(f"--local_rank={value} disagrees with LOCAL_RANK={env} in the environment.")
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a private rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_environment() -> int:
    """Validate the launcher's variables (or give a single process its own); returns the local world size."""
    present = [v for v in _LAUNCH_VARS if v in os.environ]
    if not present:
        for var, launcher in _FOREIGN_LAUNCHERS.items():
            if int(os.environ.get(var, "1")) > 1:
                raise RuntimeError(
                    f"This process was started by {launcher} ({var}={os.environ[var]}), which does not set "
                    f"torch's RANK/WORLD_SIZE/MASTER_ADDR variables: {_RECIPES}."
                )
        # a single process: a private rendezvous on a free port
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
        return 1
    missing = [v for v in _LAUNCH_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"The launch environment is incomplete: {', '.join(present)} set but {', '.join(missing)} missing. "
            f"Do not set these by hand; {_RECIPES}."
        )
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if not 0 <= rank < world:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world}; {_RECIPES}.")
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


def init_distributed(deepspeed: bool = True) -> None:
    """Prepare this process for the Trainer under any launcher, or alone; idempotent.

    On CPU it splits the cores between the local processes (unless ``OMP_NUM_THREADS`` is set) and
    configures accelerate's state for gloo, DeepSpeed's engine included when ``deepspeed``. On GPUs the
    Trainer's own set-up is already right, so only the launcher's variables are checked.
    """
    from accelerate import PartialState

    if sys.argv[1:]:
        sys.argv[1:] = strip_local_rank(sys.argv[1:])
    refuse_cpu_fsdp()
    local_world = _check_environment()
    if torch.cuda.is_available() or PartialState._shared_state:
        return
    if "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // local_world)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    if deepspeed:
        previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # accelerate reads this to start DeepSpeed's comm
        try:
            PartialState(backend="gloo")
        finally:
            if previous is None:
                del os.environ["ACCELERATE_USE_DEEPSPEED"]
    else:
        PartialState(backend="gloo", cpu=True)


def training_arguments(
    output_dir: str, *, stage: int | None = 2, offload: bool = False, **kwargs: Any
) -> TrainingArguments:
    """``TrainingArguments`` for a run under DeepSpeed ZeRO ``stage`` (``None``: plain data parallel).

    Call it first in the training script, before building the model. It works the same under ``torchrun``,
    ``deepspeed``, ``accelerate launch`` and plain ``python`` (one process). The shipped config for
    ``stage``/``offload`` is used unless ``deepspeed=`` is given; other keyword arguments go to
    ``TrainingArguments`` unchanged.
    """
    if stage is not None or "deepspeed" in kwargs:
        kwargs.setdefault("deepspeed", zero_config(stage, offload) if stage is not None else None)
    use_deepspeed = kwargs.get("deepspeed") is not None
    if kwargs.get("fsdp") and not torch.cuda.is_available():
        raise ValueError(cpu_fsdp_error())
    if offload and not use_deepspeed:
        raise ValueError("offload=True needs a DeepSpeed stage (stage=3).")
    init_distributed(deepspeed=use_deepspeed)
    kwargs.setdefault("average_tokens_across_devices", False)
    if not torch.cuda.is_available():
        kwargs.setdefault("ddp_backend", "gloo")
        accelerator_config = dict(kwargs.pop("accelerator_config", None) or {})
        accelerator_config.setdefault("use_configured_state", True)
        kwargs["accelerator_config"] = accelerator_config
        if not use_deepspeed:
            kwargs.setdefault("use_cpu", True)
    return TrainingArguments(output_dir=output_dir, **kwargs)
