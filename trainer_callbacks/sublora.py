from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from peft_ctrl.capabilities import check_stage, fsdp_limit
from peft_ctrl.distributed import deepspeed_stage
from peft_ctrl.distributed.fsdp import fsdp_requested
from peft_ctrl.sublora.runtime import LossFn, RankAllocator

logger = logging.getLogger(__name__)
STATE_FILE = "sublora_state.json"


class SubLoRACallback(TrainerCallback):
    """Runs SubLoRA's rank allocation inside ``transformers.Trainer``: no custom loop.

    - every ``delta_t`` steps (after the optimizer step and ``zero_grad``) it draws its own examples from the
      training set (``curvature_samples`` of them, chosen by a generator seeded with ``args.seed`` and the
      allocation count, collated by the Trainer's collator, so a resumed run draws the same ones), estimates
      the curvature and masks components down to the scheduled budget (with ``exact_svd``, after rewriting the
      components as exact singular triplets and restarting the Trainer optimizer's statistics of the modules
      that lose components);
    - before every optimizer step it adds the orthogonality regulariser's gradient, whatever the model returns;
    - ``sublora_budget`` and ``sublora_kept`` appear in the logs, each allocation in the ``logging`` output;
    - its state (the rank history) is written into every checkpoint and read back on resume (the masks
      themselves are saved with the adapter);
    - at the end of training it truncates the adapter to the kept components (``rank_pattern`` in the config),
      so ``trainer.save_model()`` writes a smaller adapter that loads back with identical outputs, and
      writes a PNG heatmap of ranks over training when ``heatmap_path`` is given.

    ``loss_fn(model, batch) -> loss`` is needed only when the model's output carries no ``loss``. A run resumed
    from a checkpoint outside ``output_dir`` names it with ``TrainingArguments(resume_from_checkpoint=...)`` or
    ``resume_from``; resuming without the saved state raises ``ValueError`` (under DeepSpeed the masks are
    restored only from it: DeepSpeed's checkpoints leave frozen parameters out).
    """

    def __init__(
        self,
        loss_fn: LossFn | None = None,
        heatmap_path: str | Path | None = None,
        adapter_name: str = "default",
        truncate_at_end: bool = True,
        resume_from: str | Path | None = None,
    ) -> None:
        self.loss_fn, self.heatmap_path, self.resume_from = loss_fn, heatmap_path, resume_from
        self.adapter_name, self.truncate_at_end = adapter_name, truncate_at_end
        self.allocator: RankAllocator | None = None
        self._dataloader = None
        self._seed = 0

    def _draw(self) -> Iterator:
        """Batches of examples drawn for the next allocation (deterministic in the allocation count)."""
        dataset, collate = self._dataloader.dataset, self._dataloader.collate_fn
        g = torch.Generator().manual_seed(self._seed * 1_000_003 + len(self.allocator.history))
        while True:
            order = torch.randperm(len(dataset), generator=g).tolist()
            yield collate([dataset[i] for i in order[: self.allocator.config.curvature_samples]])

    def on_init_end(self, args: TrainingArguments, state, control, model=None, **kwargs: Any) -> None:
        if fsdp_requested(args):
            raise ValueError(fsdp_limit("sublora"))
        stage = deepspeed_stage(args)
        check_stage("sublora", stage)
        config = getattr(model, "peft_config", {}).get(self.adapter_name)
        if stage is None or config is None:
            return
        if config.orth_reg_weight > 0:
            raise ValueError(
                "SubLoRA's orthogonality regulariser adds its gradient before the optimizer step, but under "
                "DeepSpeed the engine owns the gradients (callbacks see none). Set orth_reg_weight=0, or train "
                "without DeepSpeed (single process or torchrun data parallel)."
            )
        if config.exact_svd:
            raise ValueError(
                "SubLoRAConfig(exact_svd=True) rewrites the adapter factors at each allocation and restarts their "
                "optimizer statistics, which DeepSpeed's optimizer keeps in flat per-group buffers with one shared "
                "step count. Set exact_svd=False under DeepSpeed, or train without it (single process or torchrun "
                "data parallel)."
            )

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs: Any
    ) -> None:
        self.allocator = RankAllocator(model, self.adapter_name, total_step=state.max_steps, loss_fn=self.loss_fn)
        self._dataloader = kwargs.get("train_dataloader")
        if self._dataloader is None or not hasattr(self._dataloader.dataset, "__len__"):
            raise ValueError(
                "SubLoRACallback draws curvature examples from the Trainer's training set, which must be a "
                "map-style dataset (with __len__ and indexing)."
            )
        self._seed = args.seed
        if state.global_step > 0:  # resuming: the history and the masks come from the checkpoint
            candidates = [Path(p) / STATE_FILE for p in (self.resume_from, args.resume_from_checkpoint) if p]
            candidates.append(Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE)
            saved = next((c for c in candidates if c.is_file()), None)
            if saved is None:
                raise ValueError(
                    f"Resuming at step {state.global_step}, SubLoRACallback found no {STATE_FILE} in "
                    f"{', '.join(str(c.parent) for c in candidates)}. Resume from a checkpoint inside "
                    "output_dir, or name it with TrainingArguments(resume_from_checkpoint=...) or "
                    "SubLoRACallback(resume_from=...)."
                )
            self.allocator.load_state_dict(json.loads(saved.read_text()))

    def on_pre_optimizer_step(self, args, state, control, **kwargs: Any) -> None:
        self.allocator.add_orthogonality_gradient()

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        if self.allocator.due(state.global_step):
            device = next(self.allocator.model.parameters()).device
            batches = (_to(batch, device) for batch in self._draw())
            ranks = self.allocator.allocate(state.global_step, batches, optimizer=kwargs.get("optimizer"))
            logger.info(
                "SubLoRA step %d: kept %d of %d components: %s",
                state.global_step,
                sum(ranks.values()),
                self.allocator.initial,
                ranks,
            )

    def on_log(self, args, state, control, logs=None, **kwargs: Any) -> None:
        if logs is not None and self.allocator is not None:
            values = {
                "sublora_budget": self.allocator.budget_at(state.global_step),
                "sublora_kept": self.allocator.kept(),
            }
            logs.update(values)
            if state.log_history:  # the Trainer stored its copy of logs before calling the callbacks
                state.log_history[-1].update(values)

    def on_save(self, args, state, control, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            self.allocator.save(folder / STATE_FILE)

    def on_train_end(self, args, state, control, **kwargs: Any) -> None:
        if self.heatmap_path is not None and self.allocator.history:
            write_heatmap(self.allocator.history, self.heatmap_path)
        if self.truncate_at_end:
            self.allocator.tuner.truncate(self.adapter_name)


def _to(batch: Any, device) -> Any:
    if isinstance(batch, dict):
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    return type(batch)(v.to(device) if hasattr(v, "to") else v for v in batch)


def write_heatmap(history: list[dict], path: str | Path) -> Path:
    """PNG of the kept components per module (rows) at each allocation (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("No allocation has run yet, so there is no rank history to plot.")
    modules = list(history[0]["ranks"])
    data = [[event["ranks"][m] for event in history] for m in modules]
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * len(history) + 3), max(3, 0.25 * len(modules) + 1)))
    image = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(modules)), modules, fontsize=6)
    ax.set_xticks(range(len(history)), [str(e["step"]) for e in history], fontsize=6, rotation=90)
    ax.set_xlabel("step")
    fig.colorbar(image, ax=ax, label="kept components")
    ax.set_title("SubLoRA ranks per module")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
