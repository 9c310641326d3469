from __future__ import annotations

import logging

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from peft_ctrl.metrics import SavedTensorMeter

logger = logging.getLogger(__name__)


class MemoryReportCallback(TrainerCallback):
    """Measures the bytes saved for backward during the first micro-batch of training, once per run.

    The figure (see ``peft_ctrl.metrics``) is logged, appended to ``state.log_history`` as
    ``{"saved_activation_bytes": ..., "step": ...}`` and kept in ``self.saved_bytes``. Model parameters and
    buffers are never counted.
    """

    def __init__(self) -> None:
        self.saved_bytes: int | None = None
        self._meter: SavedTensorMeter | None = None

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.saved_bytes is None and self._meter is None:
            self._meter = SavedTensorMeter(exclude=kwargs.get("model"))
            self._meter.__enter__()

    def _finish(self, state: TrainerState) -> None:
        if self._meter is None:
            return
        self._meter.__exit__(None, None, None)
        self.saved_bytes = self._meter.total_bytes
        self._meter = None
        state.log_history.append({"saved_activation_bytes": self.saved_bytes, "step": state.global_step})
        logger.warning("saved-for-backward activations in one micro-batch: %.2f MiB", self.saved_bytes / 2**20)

    def on_substep_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._finish(state)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._finish(state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._finish(state)
