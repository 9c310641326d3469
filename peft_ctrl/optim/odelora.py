"""ODELoRA: integrate the projected full-fine-tuning gradient flow on LoRA factors (Gao & Tan, arXiv 2602.07479).

For a LoRA pair (B: m x r, A: r x n) with W = W0 + s B A and G = dL/dW (never formed: LoRA backprop gives
g_B = s G A^T and g_A = s B^T G), the direction

    dB/dt = -(1/s) [(I - 1/2 P_B) G A^T (A A^T)^-1 - B K]
    dA/dt = -(1/s) [(B^T B)^-1 B^T G (I - 1/2 P_A) + K A]

makes dW/dt = -P_T(G) = -(P_B G + G P_A - P_B G P_A), the gradient flow projected onto rank-r matrices,
for any r x r gauge K. With K = S / 2, where S solves the Lyapunov equation M S + S M = 1/2 (D M^-1 - M^-1 D)
(M = B^T B, N = B^T G A^T, D = N - N^T), the flow also keeps B^T B - A A^T constant at a balanced point.
Discrete steps lose the balance, so the factors are re-balanced exactly after every step (B A unchanged).
Euler, Heun (RK2) and classic RK4 integrate it with 1, 2 and 4 gradient evaluations per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..capabilities import check_stage, deepspeed_limit, fsdp_limit
from ..factors import balanced_split, product_svd, work_dtype
from ..sharding import is_dtensor, is_zero3

SCHEMES = {"euler": 1, "heun": 2, "rk4": 4}


@dataclass
class LoraPair:
    """One adapter's factors in one peft LoRA layer: ``W = W0 + scaling * B @ A``."""

    name: str
    A: nn.Parameter
    B: nn.Parameter
    scaling: float


def find_lora_pairs(model: nn.Module) -> list[LoraPair]:
    """Every trainable (A, B) pair of the peft LoRA layers in ``model``, per adapter."""
    from peft.tuners.lora import LoraLayer

    pairs = []
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter, lora_A in module.lora_A.items():
            A, B = lora_A.weight, module.lora_B[adapter].weight
            if A.requires_grad and B.requires_grad:
                pairs.append(LoraPair(f"{module_name}.{adapter}", A, B, float(module.scaling[adapter])))
    return pairs


def _work(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the dtype the r x r algebra runs in (``peft_ctrl.factors.work_dtype``)."""
    return t.to(work_dtype(t))


def damped_inverse(M: torch.Tensor, eps: float) -> torch.Tensor:
    """(M + eps I)^-1."""
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    return torch.linalg.inv(M + eps * eye)


def gauge(M: torch.Tensor, N: torch.Tensor, eps: float) -> torch.Tensor:
    """K = S / 2 with M S + S M = 1/2 (D M^-1 - M^-1 D), D = N - N^T, solved in M's eigenbasis."""
    sigma, U = torch.linalg.eigh(M)
    sigma = sigma.clamp_min(0.0) + eps
    D = N - N.T
    M_inv = (U / sigma) @ U.T
    C = 0.5 * (D @ M_inv - M_inv @ D)
    S = U @ ((U.T @ C @ U) / (sigma[:, None] + sigma[None, :])) @ U.T
    return 0.5 * S


def ode_direction(
    B: torch.Tensor, A: torch.Tensor, grad_B: torch.Tensor, grad_A: torch.Tensor, scaling: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dB/dt, dA/dt) from the LoRA gradients (module docstring), in fp32 with ``eps`` damping on r x r inverses."""
    B, A, grad_B, grad_A = (_work(t) for t in (B, A, grad_B, grad_A))
    MB, MA = B.T @ B, A @ A.T
    MB_inv, MA_inv = damped_inverse(MB, eps), damped_inverse(MA, eps)
    N = B.T @ grad_B  # = s B^T G A^T = grad_A A^T
    K = gauge(0.5 * (MB + MA), N, eps)
    half = 0.5 * (MB_inv @ N @ MA_inv)
    dB = -(grad_B @ MA_inv - B @ half) + B @ K
    dA = -(MB_inv @ grad_A - half @ A) - K @ A
    inv_s2 = 1.0 / (scaling * scaling)
    return dB * inv_s2, dA * inv_s2


@torch.no_grad()
def rebalance(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of the same product: B' = U S^1/2, A' = S^1/2 V^T from the SVD of B A
    (``peft_ctrl.factors``: QR of the thin factors and an r x r SVD); B' A' = B A and B'^T B' = A' A'^T."""
    new_B, new_A = balanced_split(*product_svd(B, A))
    return new_B.to(B.dtype), new_A.to(A.dtype)


@torch.no_grad()
def imbalance(B: torch.Tensor, A: torch.Tensor) -> float:
    """||B^T B - A A^T|| / ||B^T B|| (0 for a balanced pair)."""
    B, A = _work(B), _work(A)
    MB = B.T @ B
    norm = torch.linalg.matrix_norm(MB)
    if norm == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(MB - A @ A.T) / norm)


class ODELoRA(torch.optim.Optimizer):
    """Integrates the ODELoRA flow on every LoRA pair; other trainable parameters follow plain gradient flow.

    Build it with ``create_odelora_optimizer``. Like ``torch.optim`` optimizers, ``step(closure)`` evaluates
    ``closure()`` (forward and backward on one batch, returning the loss; it need not zero the gradients)
    before stepping, and ``step()`` uses the gradients already in ``.grad``. Heun and RK4 re-evaluate at
    intermediate points, so they need a closure.
    """

    def __init__(
        self,
        pairs: list[LoraPair],
        other_params: list[nn.Parameter],
        lr: float,
        scheme: str = "euler",
        eps: float = 1e-8,
        warmup_steps: int = 5,
        other_lr: float | None = None,
    ) -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"Unknown scheme {scheme!r}; choose one of {sorted(SCHEMES)}.")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}.")
        if eps <= 0 or warmup_steps < 0:
            raise ValueError("eps must be positive and warmup_steps non-negative.")
        if any(is_zero3(p) for pair in pairs for p in (pair.A, pair.B)):  # ZeRO-3 partitioned them
            check_stage("odelora", 3)
        self.pairs = pairs
        groups = [{"params": [p for pair in pairs for p in (pair.A, pair.B)], "lr": lr, "kind": "lora"}]
        if other_params:
            groups.append(
                {"params": list(other_params), "lr": other_lr if other_lr is not None else lr, "kind": "other"}
            )
        super().__init__(groups, {"lr": lr, "scheme": scheme, "eps": eps, "warmup_steps": warmup_steps})
        self.scheme, self.eps, self.warmup_steps = scheme, eps, warmup_steps
        self._pending_closure: Callable[[], torch.Tensor] | None = None

    def _check_not_repartitioned(self) -> None:
        """A wrapper that swaps our parameters for flat partitions (DeepSpeed ZeRO-1/2, fp16/bf16 optimizer
        wrappers) would make the steps below move the wrong tensors; refuse instead."""
        expected = [p for pair in self.pairs for p in (pair.A, pair.B)]
        stepped = self.param_groups[0]["params"]
        if len(stepped) != len(expected) or any(a is not b for a, b in zip(stepped, expected, strict=False)):
            raise RuntimeError(
                "ODELoRA's parameter groups were replaced (DeepSpeed's ZeRO or mixed-precision optimizer wraps "
                f"flatten and partition them), so it cannot see the LoRA factors it integrates: "
                f"{deepspeed_limit('odelora')}"
            )

    def set_closure(self, closure: Callable[[], torch.Tensor]) -> None:
        """Closure for the next ``step()`` called without one (how Trainer glue hands over the batch)."""
        self._pending_closure = closure

    @property
    def evaluations_per_step(self) -> int:
        return SCHEMES[self.scheme]

    def _step_count(self) -> int:
        first = self.pairs[0].A if self.pairs else self.param_groups[0]["params"][0]
        return self.state[first].get("step", 0)

    def _params(self) -> list[nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    def _directions(self) -> dict[nn.Parameter, torch.Tensor]:
        """d/dt of every parameter at the current point, from the gradients in ``.grad``."""
        out: dict[nn.Parameter, torch.Tensor] = {}
        for pair in self.pairs:
            gA = pair.A.grad if pair.A.grad is not None else torch.zeros_like(pair.A)
            gB = pair.B.grad if pair.B.grad is not None else torch.zeros_like(pair.B)
            dB, dA = ode_direction(pair.B, pair.A, gB, gA, pair.scaling, self.eps)
            out[pair.A], out[pair.B] = dA, dB
        for group in self.param_groups[1:]:
            for p in group["params"]:
                out[p] = -_work(p.grad if p.grad is not None else torch.zeros_like(p))
        return out

    def _evaluate(self, closure: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, dict[nn.Parameter, torch.Tensor]]:
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        return loss, self._directions()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One integration step; returns the loss of ``closure``'s first evaluation (``None`` without a closure).

        As in ``torch.optim``, ``step(closure)`` evaluates ``closure()`` (forward and backward) first, so no
        ``backward()`` is needed before it; ``step()`` uses the gradients already in ``.grad``. Heun and RK4
        re-evaluate the closure (or the one handed over by ``set_closure``) at their intermediate points.
        """
        stage_closure = closure
        if closure is None:
            stage_closure, self._pending_closure = self._pending_closure, None
        if self.scheme != "euler" and stage_closure is None:
            raise ValueError(
                f"scheme={self.scheme!r} evaluates gradients at intermediate points and needs step(closure); "
                "with transformers.Trainer use trainer_callbacks.ODELoRATrainer, which passes one."
            )
        self._check_not_repartitioned()
        t = self._step_count()
        loss = None
        if closure is not None:
            if t == 0:
                self._rebalance_all()
            loss, k1 = self._evaluate(closure)
        else:
            if all(p.grad is None for p in self._params()):
                raise ValueError(
                    "ODELoRA.step() found no gradient on any parameter: call loss.backward() before step(), or "
                    "pass step(closure) with a closure that runs the forward and backward pass and returns the "
                    "loss (torch.optim's convention). Nothing was changed."
                )
            if t == 0:
                self._rebalance_all(carry_gradients=True)
            k1 = self._directions()
        ramp = min(1.0, (t + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        h = {p: group["lr"] * ramp for group in self.param_groups for p in group["params"]}
        y0 = {p: _work(p.detach()).clone() for p in self._params()}
        try:
            if self.scheme == "euler":
                total = k1
            else:
                stages = [k1]
                # Butcher tableaux: Heun c = (1,), b = (1/2, 1/2); RK4 c = (1/2, 1/2, 1), b = (1/6, 1/3, 1/3, 1/6).
                if self.scheme == "heun":
                    offsets, weights = (1.0,), (0.5, 0.5)
                else:
                    offsets, weights = (0.5, 0.5, 1.0), (1 / 6, 1 / 3, 1 / 3, 1 / 6)
                for c in offsets:
                    self._assign({p: y0[p] + c * h[p] * stages[-1][p] for p in y0})
                    stages.append(self._evaluate(stage_closure)[1])
                total = {p: sum(w * k[p] for w, k in zip(weights, stages, strict=True)) for p in y0}
            self._assign({p: y0[p] + h[p] * total[p] for p in y0})
            self._rebalance_all()
        except FloatingPointError:
            self._assign(y0)
            raise
        for p in self._params():
            self.state[p]["step"] = t + 1
        return loss

    def _assign(self, values: dict[nn.Parameter, torch.Tensor]) -> None:
        for v in values.values():
            if not torch.isfinite(v).all():
                raise FloatingPointError(
                    "ODELoRA produced non-finite factors (the step size is too large for this problem, or a factor "
                    "collapsed); lower lr, lengthen warmup_steps or raise eps. The parameters were left unchanged."
                )
        for p, v in values.items():
            p.copy_(v.to(p.dtype))

    def _rebalance_all(self, carry_gradients: bool = False) -> None:
        """Re-balance every pair. With ``carry_gradients`` (the first step, whose gradients were computed at
        the old factors) the gradients are mapped to the new ones: with A' = T A and B' = B T^-1 (same W),
        g_B' = g_B T^T and g_A' = T^-T g_A."""
        for pair in self.pairs:
            if torch.count_nonzero(pair.B) == 0 or torch.count_nonzero(pair.A) == 0:
                continue  # B A = 0 (peft's init): nothing to balance yet
            B, A = rebalance(pair.B, pair.A)
            if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
                raise FloatingPointError(
                    f"ODELoRA could not re-balance {pair.name}: its factors overflow (the step size is too large; "
                    "lower lr or lengthen warmup_steps). The parameters were left unchanged."
                )
            if carry_gradients and pair.A.grad is not None and pair.B.grad is not None:
                A_old = _work(pair.A)
                T = _work(A) @ A_old.T @ torch.linalg.inv(A_old @ A_old.T)
                pair.B.grad.copy_(_work(pair.B.grad) @ T.T)
                pair.A.grad.copy_(torch.linalg.solve(T.T, _work(pair.A.grad)))
            pair.B.copy_(B)
            pair.A.copy_(A)


def create_odelora_optimizer(
    model: nn.Module,
    *,
    lr: float,
    scheme: str = "euler",
    eps: float = 1e-8,
    warmup_steps: int = 5,
    other_lr: float | None = None,
) -> ODELoRA:
    """An ``ODELoRA`` optimizer over every trainable LoRA pair of a peft model.

    ``lr`` is the step of the W flow (dW/dt = -P_T(G)), independent of peft's scaling s. Trainable
    parameters that are not LoRA factors (heads, ``modules_to_save``) take plain gradient steps with
    ``other_lr`` (default ``lr``), integrated by the same scheme. The first ``warmup_steps`` steps ramp
    the step size linearly from lr / warmup_steps.
    """
    pairs = find_lora_pairs(model)
    if not pairs:
        raise ValueError(
            "create_odelora_optimizer found no trainable LoRA layer; pass a model from get_peft_model(model, "
            "LoraConfig(...)) with its LoRA adapter active."
        )
    if any(is_dtensor(p) for pair in pairs for p in (pair.A, pair.B)):
        raise ValueError(fsdp_limit("odelora"))
    lora_ids = {id(p) for pair in pairs for p in (pair.A, pair.B)}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in lora_ids]
    return ODELoRA(pairs, others, lr=lr, scheme=scheme, eps=eps, warmup_steps=warmup_steps, other_lr=other_lr)
