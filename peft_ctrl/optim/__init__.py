"""Optimizers for LoRA factors, and depth-scaled learning rates for state-ctrl bridges."""

from .depth_lr import bridge_input_rms, depth_scaled_param_groups
from .odelora import ODELoRA, create_odelora_optimizer, find_lora_pairs, imbalance, ode_direction, rebalance

__all__ = [
    "ODELoRA",
    "bridge_input_rms",
    "create_odelora_optimizer",
    "depth_scaled_param_groups",
    "find_lora_pairs",
    "imbalance",
    "ode_direction",
    "rebalance",
]
