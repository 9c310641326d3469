from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


class AdaLoRACallback(TrainerCallback):
    """Runs upstream peft AdaLoRA's rank allocation inside ``transformers.Trainer``.

    AdaLoRA scores its singular values from the gradients, so ``update_and_allocate(step)`` has to run after each
    optimizer step and before the gradients are zeroed; peft leaves that call to the training loop. This callback
    makes it at ``on_optimizer_step``, the one Trainer event between the two. Set ``AdaLoraConfig(total_step=...)``
    to the Trainer's ``max_steps``.
    """

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        tuner = getattr(model, "base_model", None)
        if not hasattr(tuner, "update_and_allocate"):
            raise ValueError(
                "AdaLoRACallback needs a peft AdaLoRA model (get_peft_model(model, AdaLoraConfig(...))); the "
                f"Trainer's model is {type(model).__name__}."
            )
        tuner.update_and_allocate(state.global_step)
