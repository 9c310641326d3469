"""Scale-out: shipped DeepSpeed ZeRO and FSDP2 configs, a launcher-proof ``training_arguments``, FSDP2 sharding
for custom loops and saving that gathers ZeRO-3 and FSDP shards.

See docs/distributed.md for the launch recipes (``torchrun``, ``deepspeed``, ``accelerate launch``) on CPU
and GPUs, and for what each method supports under each ZeRO stage (``SUPPORTED_STAGES``).
"""

from ..capabilities import FSDP_SUPPORTED, SUPPORTED_STAGES, check_stage
from ..sharding import is_partitioned, is_sharded, rank_and_world, require_gathered
from .fsdp import accelerate_fsdp_config_path, check_fsdp, shard_model
from .launch import init_distributed, strip_local_rank, training_arguments
from .zero import (
    accelerate_config_path,
    config_path,
    deepspeed_stage,
    gathered,
    save_adapter,
    zero_config,
)

__all__ = [
    "FSDP_SUPPORTED",
    "SUPPORTED_STAGES",
    "accelerate_config_path",
    "accelerate_fsdp_config_path",
    "check_fsdp",
    "check_stage",
    "config_path",
    "deepspeed_stage",
    "gathered",
    "init_distributed",
    "is_partitioned",
    "is_sharded",
    "rank_and_world",
    "require_gathered",
    "save_adapter",
    "shard_model",
    "strip_local_rank",
    "training_arguments",
    "zero_config",
]
