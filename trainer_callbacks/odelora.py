from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer

from peft_ctrl.capabilities import check_stage, fsdp_limit
from peft_ctrl.distributed import deepspeed_stage
from peft_ctrl.distributed.fsdp import fsdp_requested
from peft_ctrl.optim import ODELoRA, create_odelora_optimizer


class ODELoRAMixin:
    """Trains LoRA factors with ODELoRA, for every scheme, inside any ``transformers.Trainer`` subclass.

    Put it first among the bases: ``class ODELoRASFTTrainer(ODELoRAMixin, trl.SFTTrainer): pass`` gives TRL's
    trainer (which wraps the model with its ``peft_config`` itself) the same optimizer; ``ODELoRATrainer`` is
    the mixin over ``transformers.Trainer``. The extra keyword arguments ``scheme``, ``eps`` and
    ``warmup_steps`` are those of ``create_odelora_optimizer``.

    It builds the optimizer from ``args.learning_rate`` (the lr schedule applies as usual) and, for Heun and
    RK4, hands the optimizer a closure that re-evaluates the loss and gradients on the current batch at
    the intermediate factors. Behaviour to know:

    - gradient accumulation: Euler accumulates as usual; Heun/RK4 need ``gradient_accumulation_steps=1``
      (their extra evaluations are on one batch), anything else raises ``ValueError`` at the first step;
    - gradient clipping (``max_grad_norm``) applies to the gradients of the first evaluation only;
    - fp16/bf16 autocast applies to every evaluation; the ODE itself runs in fp32;
    - the extra evaluations go through the trainer's own ``compute_loss``, so a trainer that records metrics
      there (TRL's token accuracy, for one) records them at every evaluation.
    """

    def __init__(self, *args: Any, scheme: str = "euler", eps: float = 1e-8, warmup_steps: int = 5, **kwargs: Any):
        self.odelora_options = {"scheme": scheme, "eps": eps, "warmup_steps": warmup_steps}
        super().__init__(*args, **kwargs)
        if fsdp_requested(self.args):
            raise ValueError(fsdp_limit("odelora"))
        if self.is_deepspeed_enabled:
            check_stage("odelora", deepspeed_stage(self.args) or 0)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            target = model if model is not None else self.model
            self.optimizer = create_odelora_optimizer(target, lr=self.args.learning_rate, **self.odelora_options)
        return self.optimizer

    def _odelora(self) -> ODELoRA:
        optimizer = self.optimizer
        while not isinstance(optimizer, ODELoRA):  # accelerate wraps the optimizer
            optimizer = optimizer.optimizer
        return optimizer

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.odelora_options["scheme"] != "euler":
            if self.args.gradient_accumulation_steps != 1:
                raise ValueError(
                    f"ODELoRA scheme {self.odelora_options['scheme']!r} re-evaluates gradients on one batch; set "
                    "gradient_accumulation_steps=1 (or use scheme='euler', which accumulates normally)."
                )
            prepared = self._prepare_inputs(inputs)

            def closure() -> torch.Tensor:
                with self.compute_loss_context_manager():
                    stage_loss = self.compute_loss(model, prepared, num_items_in_batch=num_items_in_batch)
                self.accelerator.backward(stage_loss)
                return stage_loss.detach()

            self._odelora().set_closure(closure)
        return loss


class ODELoRATrainer(ODELoRAMixin, Trainer):
    """``transformers.Trainer`` that trains LoRA factors with ODELoRA (see ``ODELoRAMixin``)."""
