"""The allocation schedule and the curvature estimates that feed the allocator; used by
``trainer_callbacks.SubLoRACallback`` and usable from a plain training loop."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..atomic import atomic_file
from ..sharding import rank_and_world
from .allocator import curvature_model, greedy_select, project_submodular
from .config import SubLoRAConfig
from .layer import SubLoRALayer
from .model import SubLoRAModel

Batch = Any
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(*batch)
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            "The model output carries no loss, so SubLoRA cannot estimate curvature; pass "
            "loss_fn=lambda model, batch: ... to SubLoRACallback / RankAllocator."
        )
    return loss


def select_examples(batch: Batch, index: slice) -> Batch:
    """The examples ``index`` of a batch (dict, tuple or list of tensors with the batch first)."""
    if isinstance(batch, dict):
        return {k: v[index] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}
    return type(batch)(v[index] if torch.is_tensor(v) and v.dim() > 0 else v for v in batch)


def batch_size(batch: Batch) -> int:
    values = batch.values() if isinstance(batch, dict) else batch
    return next(len(v) for v in values if torch.is_tensor(v) and v.dim() > 0)


class RankAllocator:
    """Runs SubLoRA's schedule on a model with SubLoRA layers.

    Budget: ``r`` per module until ``t_init``, then AdaLoRA's cubic decay to the target budget, reached at
    ``total_step - t_final`` and frozen after. Every ``delta_t`` steps (and once at the end of the decay) the
    components are re-selected: the curvature of the loss in the effective singular values is estimated on
    batches drawn by the caller, projected to make the selection objective submodular, and the greedy set of
    the scheduled size is kept. Removed components never return (their lambda is masked to zero, where the
    model gives them no gain).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter_name: str = "default",
        total_step: int | None = None,
        loss_fn: LossFn | None = None,
    ) -> None:
        tuner = getattr(model, "base_model", model)
        if not isinstance(tuner, SubLoRAModel):
            raise ValueError("RankAllocator needs a model from get_peft_model(model, SubLoRAConfig(...)).")
        self.model, self.tuner, self.adapter = model, tuner, adapter_name
        self.config: SubLoRAConfig = tuner.peft_config[adapter_name]
        self.layers: dict[str, SubLoRALayer] = tuner.sublora_layers(adapter_name)
        if not self.layers:
            raise ValueError(f"The model has no SubLoRA layers for adapter {adapter_name!r}.")
        total = self.config.total_step or total_step
        if not total:
            raise ValueError("Give total_step (SubLoRAConfig.total_step, or the Trainer's max_steps).")
        self.config.check_schedule(total)
        self.total_step = total
        self.initial = sum(layer.sublora_mask[adapter_name].numel() for layer in self.layers.values())
        self.target = self.config.total_budget(len(self.layers))
        self.loss_fn = loss_fn or default_loss
        self.history: list[dict] = []

    # schedule -------------------------------------------------------------------------------------------
    @property
    def end_of_decay(self) -> int:
        return self.total_step - self.config.t_final

    def budget_at(self, step: int) -> int:
        c = self.config
        if step < c.t_init:
            return self.initial
        if step >= self.end_of_decay:
            return self.target
        progress = (step - c.t_init) / (self.end_of_decay - c.t_init)
        return self.target + math.ceil((self.initial - self.target) * (1 - progress) ** 3)

    def kept(self) -> int:
        return sum(layer.rank(self.adapter) for layer in self.layers.values())

    def ranks(self) -> dict[str, int]:
        return {name: layer.rank(self.adapter) for name, layer in self.layers.items()}

    def due(self, step: int) -> bool:
        c = self.config
        if step < c.t_init or step > self.end_of_decay or self.budget_at(step) >= self.kept():
            return False
        return step == self.end_of_decay or (step - c.t_init) % c.delta_t == 0

    # curvature ------------------------------------------------------------------------------------------
    def _lambdas(self) -> list[torch.Tensor]:
        return [layer.sublora_lambda[self.adapter] for layer in self.layers.values()]

    def _loss(self, batch: Batch) -> torch.Tensor:
        return self.loss_fn(self.model, batch)

    def curvature(self, batches: Iterator[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """(dL/dlambda, d2L/dlambda2) over all components, on ``curvature_samples`` examples drawn from
        ``batches``, with the estimator chosen by ``config.hessian``."""
        lams = self._lambdas()
        d = sum(lam.numel() for lam in lams)
        need, parts = self.config.curvature_samples, []
        while need > 0:
            batch = next(batches)
            n = min(need, batch_size(batch))
            parts.append(select_examples(batch, slice(0, n)))
            need -= n
        grad, hess = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
        total = self.config.curvature_samples
        rank, world = rank_and_world()
        was_training = self.model.training
        self.model.eval()  # no dropout in the curvature estimate
        try:
            for part in parts:  # in a multi-process run each rank takes its share of every part's examples
                n = batch_size(part)
                lo, hi = rank * n // world, (rank + 1) * n // world
                if hi > lo:
                    g, h = self._estimate(select_examples(part, slice(lo, hi)), lams)
                    grad += (hi - lo) / total * g
                    hess += (hi - lo) / total * h
        finally:
            self.model.train(was_training)
        if world > 1:
            grad, hess = _sum_across_ranks(grad), _sum_across_ranks(hess)
        return grad, hess

    def _estimate(self, batch: Batch, lams: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        kind = self.config.hessian
        if kind in ("fisher", "diag"):
            rows = []
            n = batch_size(batch)
            for i in range(n):
                loss = self._loss(select_examples(batch, slice(i, i + 1)))
                rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, lams)]).double())
            G = torch.stack(rows)
            fisher = G.T @ G / n
            return G.mean(0), torch.diag(fisher.diagonal()) if kind == "diag" else fisher
        # Second derivatives need double backward, which the fused attention kernels lack: use the math one.
        with sdpa_kernel(SDPBackend.MATH):
            loss = self._loss(batch)
            grads = torch.autograd.grad(loss, lams, create_graph=True)
            flat = torch.cat([g.reshape(-1) for g in grads])
            return flat.detach().double(), self._second_order(flat, lams, kind)

    def _second_order(self, flat: torch.Tensor, lams: list[torch.Tensor], kind: str) -> torch.Tensor:
        d = flat.numel()
        if kind == "exact":
            return _hvp_rows(flat, lams, torch.eye(d, dtype=flat.dtype, device=flat.device)).double()
        # block: one probe per component index k with independent random signs per layer, two draws;
        # (H v)_(l,i) s_l estimates H_(l,i),(l,k) without bias (cross-layer terms cancel in expectation).
        sizes = [lam.numel() for lam in lams]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        gen = torch.Generator().manual_seed(len(self.history))
        draws, probes, signs = 2, [], []
        for _ in range(draws):
            s = torch.randint(0, 2, (len(lams),), generator=gen).float() * 2 - 1
            for k in range(max(sizes)):
                v = torch.zeros(d)
                for layer, (off, size) in enumerate(zip(offsets, sizes, strict=True)):
                    if k < size:
                        v[off + k] = s[layer]
                probes.append(v)
                signs.append((k, s))
        rows = _hvp_rows(flat, lams, torch.stack(probes).to(flat)).double()
        H = torch.zeros(d, d, dtype=torch.float64)
        for (k, s), hv in zip(signs, rows, strict=True):
            for layer, (off, size) in enumerate(zip(offsets, sizes, strict=True)):
                if k < size:
                    H[off : off + size, off + k] += s[layer].item() * hv[off : off + size] / draws
        return (H + H.T) / 2

    # allocation ----------------------------------------------------------------------------------------
    def allocate(
        self, step: int, batches: Iterator[Batch], optimizer: torch.optim.Optimizer | None = None
    ) -> dict[str, int]:
        """Select the components to keep at ``step`` and mask the others; returns the ranks per module.

        With ``config.exact_svd`` (the default) each module's kept components are first rewritten as the
        singular triplets of its delta W, so the selection chooses among orthogonal components. Modules that
        lose components keep that form and their statistics in ``optimizer`` are cleared (they describe
        coordinates that no longer exist); the other modules get their parameters back unchanged.
        """
        if self.config.exact_svd and optimizer is None:
            raise ValueError(
                "SubLoRAConfig(exact_svd=True) rewrites the adapter factors at each allocation and must restart "
                "their optimizer statistics: pass optimizer= to allocate(), or set exact_svd=False."
            )
        budget = self.budget_at(step)
        saved = self._to_svd_form() if self.config.exact_svd else {}
        try:
            grad, hess = self.curvature(batches)
            lam = torch.cat([layer.effective_lambda(self.adapter).detach().double() for layer in self.layers.values()])
            alive = torch.cat([layer.sublora_mask[self.adapter] > 0 for layer in self.layers.values()])
            g, H = curvature_model(lam, grad, hess)
            keep = greedy_select(g, project_submodular(H), budget, alive)  # raises on NaN before any change
        except BaseException:
            self._restore(saved)  # the model as it was before the call
            raise
        keep = _agree_across_ranks(keep)
        offset, unchanged = 0, []
        with torch.no_grad():
            for name, layer in self.layers.items():
                mask = layer.sublora_mask[self.adapter]
                new = keep[offset : offset + mask.numel()].to(mask.dtype)
                offset += mask.numel()
                if torch.equal(new, mask):
                    unchanged.append(name)
                    continue
                mask.copy_(new)
                if self.config.exact_svd:
                    for factor in layer.components(self.adapter)[:3]:
                        optimizer.state.pop(factor, None)
        self._restore({name: saved[name] for name in unchanged if name in saved})
        self.model.zero_grad(set_to_none=True)
        ranks = self.ranks()
        self.history.append({"step": step, "budget": budget, "ranks": ranks})
        return ranks

    def _to_svd_form(self) -> dict[str, list[torch.Tensor]]:
        """Rewrite every module in SVD form; returns copies of the factors and masks as they were."""
        saved = {}
        for name, layer in self.layers.items():
            saved[name] = [t.detach().clone() for t in layer.components(self.adapter)]
            layer.to_svd_form(self.adapter)
            _broadcast_from_rank0(layer.components(self.adapter)[:3])  # the masks already agree
        return saved

    @torch.no_grad()
    def _restore(self, saved: dict[str, list[torch.Tensor]]) -> None:
        for name, values in saved.items():
            for t, value in zip(self.layers[name].components(self.adapter), values, strict=True):
                t.copy_(value)

    def orthogonality_penalty(self) -> torch.Tensor:
        """AdaLoRA's regulariser: the mean over all P and Q of |P^T P - I|_F and |Q Q^T - I|_F."""
        terms = []
        for layer in self.layers.values():
            P, Q = layer.sublora_P[self.adapter], layer.sublora_Q[self.adapter]
            eye = torch.eye(P.shape[1], device=P.device, dtype=P.dtype)
            terms += [torch.linalg.matrix_norm(P.T @ P - eye), torch.linalg.matrix_norm(Q @ Q.T - eye)]
        return torch.stack(terms).mean()

    def add_orthogonality_gradient(self) -> None:
        """Add the gradient of ``orth_reg_weight * penalty`` to the adapter gradients (before a step)."""
        weight = self.config.orth_reg_weight
        if weight > 0:
            with torch.enable_grad():
                (weight * self.orthogonality_penalty()).backward()

    def state_dict(self) -> dict:
        """The rank history and the masks (a DeepSpeed checkpoint leaves frozen parameters such as the masks
        out, so a resumed run takes them from here)."""
        masks = {name: layer.sublora_mask[self.adapter].tolist() for name, layer in self.layers.items()}
        return {"history": self.history, "total_step": self.total_step, "masks": masks}

    def load_state_dict(self, state: dict) -> None:
        masks = state.get("masks", {})
        if masks.keys() - self.layers.keys():
            raise ValueError(
                f"Saved SubLoRA state names modules this model lacks: {sorted(masks.keys() - self.layers.keys())}."
            )
        for name, values in masks.items():  # check everything before changing anything
            size = self.layers[name].sublora_mask[self.adapter].numel()
            if size != len(values):
                raise ValueError(f"Saved SubLoRA mask for {name} has {len(values)} entries, the model {size}.")
        with torch.no_grad():
            for name, values in masks.items():
                mask = self.layers[name].sublora_mask[self.adapter]
                mask.copy_(torch.tensor(values, dtype=mask.dtype))
        self.history = list(state["history"])

    def save(self, path: str | Path) -> None:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.state_dict()))


def _comm_device(t: torch.Tensor) -> torch.device:
    """Where a collective on ``t`` runs: the current GPU for nccl, the tensor's own device otherwise."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def _sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    moved = t.to(_comm_device(t))
    torch.distributed.all_reduce(moved)
    return moved.to(t.device)


def _agree_across_ranks(keep: torch.Tensor) -> torch.Tensor:
    """Rank 0's selection on every rank of a multi-process run (every rank selects from the same summed
    curvature, but the masks must not depend on floating-point details)."""
    flags = keep.to(torch.uint8)
    _broadcast_from_rank0([flags])
    return flags.bool()


@torch.no_grad()
def _broadcast_from_rank0(tensors: Iterable[torch.Tensor]) -> None:
    """Rank 0's values on every rank of a multi-process run (each rank rewrites the same factors, but the
    replicas must not depend on floating-point details of the factorisations)."""
    if rank_and_world()[1] == 1:
        return
    for t in tensors:
        moved = t.detach().to(_comm_device(t))
        torch.distributed.broadcast(moved, src=0)
        t.copy_(moved.to(t.device))


# A batched backward holds one copy of the double-backward graph's intermediates per probe: on SmolLM2-135M with
# 8 examples, 24 probes at once took more than 24 GiB. Probes go through in chunks of this many.
PROBES_PER_BACKWARD = 4


def _hvp_rows(
    flat_grad: torch.Tensor, params: list[torch.Tensor], probes: torch.Tensor, chunk: int = PROBES_PER_BACKWARD
) -> torch.Tensor:
    """Rows H v for each probe v: one batched backward through the graph of ``flat_grad`` per ``chunk`` probes."""
    out = []
    for start in range(0, len(probes), chunk):
        part = probes[start : start + chunk]
        try:
            rows = torch.autograd.grad(flat_grad, params, grad_outputs=part, is_grads_batched=True, retain_graph=True)
            out.append(torch.cat([r.reshape(len(part), -1) for r in rows], dim=1))
        except RuntimeError:  # an op without a batching rule: one backward per probe
            for v in part:
                rows = torch.autograd.grad(flat_grad, params, grad_outputs=v, retain_graph=True)
                out.append(torch.cat([r.reshape(-1) for r in rows])[None])
    return torch.cat(out)
