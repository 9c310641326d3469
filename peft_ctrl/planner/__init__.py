"""Memory planner: the memory of one training step of every method, computed on the meta device (no weights, no
GPU) from the real model's forward and backward. ``peft-ctrl plan`` is its command line."""

from .configs import SHIPPED, load_config
from .fit import GIB, breakdown, largest_batch, longest_sequence
from .plan import METHODS, Plan, plan

__all__ = [
    "GIB",
    "METHODS",
    "SHIPPED",
    "Plan",
    "breakdown",
    "largest_batch",
    "load_config",
    "longest_sequence",
    "plan",
]
