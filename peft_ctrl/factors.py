"""Algebra of low-rank factor pairs, shared by ODELoRA (re-balancing), SubLoRA (SVD form) and SEAL (release,
verification, attacks). Each formula lives here once."""

from __future__ import annotations

import torch


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype factor algebra runs in: fp32 at least (bf16/fp16 are upcast, fp64 stays fp64)."""
    return torch.promote_types(t.dtype, torch.float32)


def product_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``B A = U diag(S) Vh`` of a product of thin factors (B: m x r, A: r x n), never forming B A.

    With B = Q_B R_B and A^T = Q_A R_A (thin QRs), B A = Q_B (R_B R_A^T) Q_A^T, so the SVD of the r x r core
    R_B R_A^T = u diag(S) vh gives U = Q_B u and Vh = vh Q_A^T. Cost O((m + n) r^2 + r^3). Computed in
    ``work_dtype``; U is m x r, S has r entries (descending), Vh is r x n.
    """
    dtype = torch.promote_types(work_dtype(B), work_dtype(A))
    QB, RB = torch.linalg.qr(B.to(dtype))
    QA, RA = torch.linalg.qr(A.to(dtype).T)
    u, S, vh = torch.linalg.svd(RB @ RA.T)
    return QB @ u, S, vh @ QA.T


def balanced_split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The balanced factors of ``U diag(S) Vh``: ``U S^1/2`` and ``S^1/2 Vh``, whose Gram matrices are equal
    (``(U S^1/2)^T U S^1/2 = S = S^1/2 Vh (S^1/2 Vh)^T``) and whose product is unchanged."""
    root = S.sqrt()
    return U * root, root[:, None] * Vh


def seeded_svd_lowrank(x: torch.Tensor, q: int, niter: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.svd_lowrank`` with its random projection drawn from a fixed seed, so the same matrix always gives
    the same factors (a verification must not change between runs), and without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.svd_lowrank(x, q=q, niter=niter)


def haar_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """An n x n Haar-random orthogonal matrix (fp64) drawn from ``generator``: the QR factor of a Gaussian matrix,
    its columns signed by R's diagonal (without that, Q is not Haar-distributed)."""
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))
