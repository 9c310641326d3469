"""``y = base + scale * dropout(x) A^T B^T`` as one autograd Function that keeps only what it needs.

The unfused expression keeps, for its backward, the dropped copy of x (for dA), the dropout mask and
``z = dropout(x) A^T``. This Function keeps x *by reference* (the caller's tensor, usually already kept
by a norm for its own backward), the r-wide z, and an integer seed; the backward regenerates the
dropout mask from the seed. With dropout off it keeps x (by reference) and z, like the unfused code.

RNG scheme (documented so that forward and backward agree and results are reproducible):
    seed = one draw from torch's default generator (``torch.randint``), so ``torch.manual_seed`` fixes it;
    torch path:  the mask ``torch.native_dropout`` (what ``F.dropout`` uses) draws from the device's default
                 generator right after it is seeded with ``seed`` (its state is restored afterwards), so the
                 result equals ``F.dropout`` run after ``torch.manual_seed(seed)``;
    Triton path: keep = ``tl.rand(seed, i) >= p`` (Philox) for the flat index i of the element in x.
Kept elements are scaled by 1 / (1 - p), like ``torch.nn.functional.dropout``.

Under ``torch.compile`` (``torch.compiler.is_compiling()``) the dropout case is traced as the plain expression
``base + scale * F.linear(F.linear(F.dropout(x, p), A), B)``: reseeding a generator and reading a seed back with
``.item()`` cannot be traced, and would break the graph at every adapted layer. The compiler then decides what
its backward keeps, and the mask comes from the compiled graph's own random stream (the eager stream when
``torch._inductor.config.fallback_random`` is set), not from the seed scheme above.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..dtypes import autocast_state
from . import _dispatch


def _check(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, base: torch.Tensor | None, dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(
            f"A and B must be matrices (r x d_in, d_out x r), got shapes {tuple(A.shape)}, {tuple(B.shape)}."
        )
    if x.shape[-1] != A.shape[1] or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"Shapes do not chain: x (..., {x.shape[-1]}), A {tuple(A.shape)}, B {tuple(B.shape)}; "
            "need x (..., d_in), A (r, d_in), B (d_out, r)."
        )
    if base is not None and base.shape != (*x.shape[:-1], B.shape[0]):
        raise ValueError(f"base has shape {tuple(base.shape)}, expected {(*x.shape[:-1], B.shape[0])}.")
    tensors = [t for t in (x, A, B, base) if t is not None]
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"x, A, B and base must be on one device, got {[str(t.device) for t in tensors]}.")
    if not autocast_state(x.device.type)[0] and len({t.dtype for t in tensors}) > 1:
        raise ValueError(
            f"x, A, B and base must share a dtype outside autocast, got {[str(t.dtype) for t in tensors]}; "
            "cast them or run under torch.autocast."
        )


def dropout_probability(module: torch.nn.Module) -> float:
    """The p of a dropout module as adapters hold it (``nn.Dropout``, or ``nn.Identity`` for none)."""
    return module.p if isinstance(module, torch.nn.Dropout) else 0.0


# Looked up through this name so that a test can run the traced expression eagerly, as its reference.
_compiling = torch.compiler.is_compiling


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.random.default_generator


def seeded_dropout(x: torch.Tensor, seed: int, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.native_dropout(x, p)`` drawn right after seeding the device's default generator with ``seed``.

    Returns (dropped x, keep mask). The generator's state is restored afterwards, so the caller's random
    stream is untouched and calling this twice gives the same mask.
    """
    gen = _default_generator(x.device)
    state = gen.get_state()
    try:
        gen.manual_seed(seed)
        return torch.native_dropout(x, p, True)
    finally:
        gen.set_state(state)


def keep_mask(seed: int, shape: torch.Size, p: float, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """The torch-path dropout mask (bool, True = kept) for an x of this shape and dtype; see the module docstring."""
    return seeded_dropout(torch.zeros(shape, device=device, dtype=dtype), seed, p)[1]


class _LowRank(torch.autograd.Function):
    """The dropout case (p > 0) of ``lowrank``: keeps x, A, B, z and the seed; regenerates the mask."""

    @staticmethod
    def forward(ctx, x, A, B, base, scale, p, seed):  # noqa: D401 - autograd signature
        x2 = x.reshape(-1, x.shape[-1])
        # Decided once here: the backward must regenerate the mask with the scheme the forward used.
        ctx.triton = _dispatch.use_triton(x, A.shape[0])
        if ctx.triton:
            z = _dispatch.triton_ops().dropout_matmul(x2, A, seed, p)
        else:
            z = seeded_dropout(x2, seed, p)[0] @ A.t().to(x2.dtype)
        out = z @ B.t().to(z.dtype)
        if scale != 1.0:
            out = out * scale
        out = out.reshape(*x.shape[:-1], B.shape[0])
        if base is not None:
            out = base + out.to(base.dtype)
        ctx.save_for_backward(x, A, B, z)
        ctx.scale, ctx.p, ctx.seed, ctx.has_base = scale, p, seed, base is not None
        ctx.autocast = autocast_state(x.device.type)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, z = ctx.saved_tensors
        scale, p, seed = ctx.scale, ctx.p, ctx.seed
        enabled, dtype = ctx.autocast
        # The forward's autocast state (none on the meta device, where autocast does not exist).
        with torch.autocast(x.device.type, dtype=dtype, enabled=enabled) if dtype else contextlib.nullcontext():
            # Same operation order as autograd on the unfused expression (bitwise equal with the same mask).
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(z.dtype)
            if scale != 1.0:
                g = g * scale
            grad_B = g.t() @ z if ctx.needs_input_grad[2] else None
            gz = g @ B.to(z.dtype)
            x2 = x.reshape(-1, x.shape[-1])
            grad_A = grad_x = None
            if ctx.triton:
                ops = _dispatch.triton_ops()
                if ctx.needs_input_grad[1]:
                    grad_A = ops.dropout_grad_a(gz, x2, seed, p)
                if ctx.needs_input_grad[0]:
                    grad_x = ops.dropout_grad_x(gz, A.to(gz.dtype), seed, p)
            else:
                xd, keep = seeded_dropout(x2, seed, p)
                if ctx.needs_input_grad[1]:
                    grad_A = gz.t() @ xd.to(gz.dtype)
                if ctx.needs_input_grad[0]:
                    grad_x = torch.ops.aten.native_dropout_backward(gz @ A.to(gz.dtype), keep, 1.0 / (1.0 - p))
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        grad_base = grad_out if ctx.has_base and ctx.needs_input_grad[3] else None
        grad_A = grad_A.to(A.dtype) if grad_A is not None else None
        grad_B = grad_B.to(B.dtype) if grad_B is not None else None
        return grad_x, grad_A, grad_B, grad_base, None, None, None


def _plain(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, p: float, base: torch.Tensor | None
) -> torch.Tensor:
    """The op as plain differentiable ops. Without dropout this already keeps only x (by reference) and z, with
    no Python autograd overhead (the Function below would compute exactly the same); with dropout it is what
    ``torch.compile`` traces (see the module docstring)."""
    if p > 0.0:
        x = F.dropout(x, p, True)
    out = F.linear(F.linear(x, A), B)
    if scale != 1.0:
        out = out * scale
    return out if base is None else base + out.to(base.dtype)


def lowrank(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float = 1.0,
    dropout: float = 0.0,
    base: torch.Tensor | None = None,
    training: bool = True,
) -> torch.Tensor:
    """``base + scale * dropout(x) A^T B^T`` with x: (..., d_in), A: (r, d_in), B: (d_out, r).

    Keeps x by reference, z = dropout(x) A^T and an RNG seed for the backward (no mask, no dropped copy).
    Dropout applies only when ``training`` is True. Uses Triton kernels for CUDA tensors when Triton is
    installed (falling back to the torch path with a one-time warning otherwise), the torch path elsewhere.
    """
    _check(x, A, B, base, dropout)
    p = float(dropout) if training else 0.0
    if p == 0.0 or _compiling():
        return _plain(x, A, B, scale, p, base)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    return _LowRank.apply(x, A, B, base, float(scale), p, seed)
