"""Scale-out: shipped DeepSpeed ZeRO configs, a launcher-proof ``training_arguments`` and ZeRO-3-safe saving.

See docs/distributed.md for the launch recipes (``torchrun``, ``deepspeed``, ``accelerate launch``) on CPU
and GPUs, and for what each method supports under each ZeRO stage (``SUPPORTED_STAGES``).
"""

from .launch import init_distributed, strip_local_rank, training_arguments
from .zero import (
    SUPPORTED_STAGES,
    accelerate_config_path,
    check_stage,
    config_path,
    deepspeed_stage,
    gathered,
    is_partitioned,
    rank_and_world,
    require_gathered,
    save_adapter,
    zero_config,
)

__all__ = [
    "SUPPORTED_STAGES",
    "accelerate_config_path",
    "check_stage",
    "config_path",
    "deepspeed_stage",
    "gathered",
    "init_distributed",
    "is_partitioned",
    "rank_and_world",
    "require_gathered",
    "save_adapter",
    "strip_local_rank",
    "training_arguments",
    "zero_config",
]
