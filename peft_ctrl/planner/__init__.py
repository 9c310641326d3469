"""Memory planner: the memory of one training step of every method, computed on the meta device (no weights, no
GPU) from the real model's forward and backward. ``peft-ctrl plan`` is its command line."""

from .configs import SHIPPED, load_config
from .plan import METHODS, Plan, plan

__all__ = ["METHODS", "SHIPPED", "Plan", "load_config", "plan"]
