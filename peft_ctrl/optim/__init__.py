"""Optimizers for LoRA factors."""

from .odelora import ODELoRA, create_odelora_optimizer, find_lora_pairs, imbalance, ode_direction, rebalance

__all__ = ["ODELoRA", "create_odelora_optimizer", "find_lora_pairs", "imbalance", "ode_direction", "rebalance"]
