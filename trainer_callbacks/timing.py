from __future__ import annotations

import logging
import statistics
import time

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)


class StepTimeCallback(TrainerCallback):
    """Wall-clock time of every optimizer step: forward, backward, clipping and the optimizer step, not the data
    loading. Callbacks run in the order they were added, so the work other callbacks do at ``on_step_end``
    counts when they were added before this one and not when added after it.

    ``seconds`` holds one figure per step; ``median(skip)`` is the median after the first ``skip`` steps (the
    first steps pay one-off costs: allocator warm-up, a memory meter, lazy initialisation). At the end of training
    it appends ``{"median_step_seconds": ..., "step": ...}`` to ``state.log_history``.
    """

    def __init__(self, skip: int = 2) -> None:
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}.")
        self.skip = skip
        self.seconds: list[float] = []
        self._start: float | None = None

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None

    def median(self, skip: int | None = None) -> float:
        """Median step time in seconds, leaving out the first ``skip`` steps (default: the constructor's) when
        more than twice that many ran."""
        if not self.seconds:
            raise ValueError("No training step has been timed yet.")
        skip = self.skip if skip is None else skip
        steady = self.seconds[skip:] if len(self.seconds) > 2 * skip else self.seconds
        return statistics.median(steady)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.seconds:
            state.log_history.append({"median_step_seconds": self.median(), "step": state.global_step})
            logger.info("median step time: %.3f s over %d steps", self.median(), len(self.seconds))
