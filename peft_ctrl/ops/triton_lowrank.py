"""Triton kernels for ``peft_ctrl.ops.lowrank``: the three products that touch dropout(x).

The dropout mask is never stored: each kernel regenerates ``keep = tl.rand(seed, m * K + k) >= p`` for the
elements it reads, where (m, k) indexes x flattened to (M, K). The other products (z B^T, g B, g^T z)
do not involve the mask and use torch's matmul. Ranks up to ``MAX_RANK`` run here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_RANK = 256  # a whole rank-r row stays in one block; the dispatcher sends larger ranks to the torch path


@triton.jit
def _dropout_matmul_kernel(
    x_ptr,
    a_ptr,
    z_ptr,
    M,
    K,
    R,
    sxm,
    sxk,
    sar,
    sak,
    szm,
    szr,
    seed,
    p,
    inv,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """z[m, :] = sum_k dropout(x)[m, k] * A[:, k]"""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        in_x = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=in_x, other=0.0)
        keep = tl.rand(seed, rm[:, None] * K + rk[None, :]) >= p
        x = tl.where(keep & in_x, x * inv, 0.0)
        a_t = tl.load(
            a_ptr + rk[:, None] * sak + rr[None, :] * sar, mask=(rk[:, None] < K) & (rr[None, :] < R), other=0.0
        )
        if IEEE:
            acc += tl.dot(x, a_t, input_precision="ieee")
        else:
            acc += tl.dot(x.to(a_t.dtype), a_t)
    tl.store(
        z_ptr + rm[:, None] * szm + rr[None, :] * szr,
        acc.to(z_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rr[None, :] < R),
    )


@triton.jit
def _dropout_grad_x_kernel(
    gz_ptr,
    a_ptr,
    gx_ptr,
    M,
    K,
    R,
    sgm,
    sgr,
    sar,
    sak,
    sxm,
    sxk,
    seed,
    p,
    inv,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """grad_x[m, k] = keep(m, k) * inv * sum_j gz[m, j] A[j, k]"""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    gz = tl.load(gz_ptr + rm[:, None] * sgm + rr[None, :] * sgr, mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    a = tl.load(a_ptr + rr[:, None] * sar + rk[None, :] * sak, mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
    if IEEE:
        gx = tl.dot(gz, a, input_precision="ieee")
    else:
        gx = tl.dot(gz, a)
    keep = tl.rand(seed, rm[:, None] * K + rk[None, :]) >= p
    gx = tl.where(keep, gx * inv, 0.0)
    tl.store(
        gx_ptr + rm[:, None] * sxm + rk[None, :] * sxk,
        gx.to(gx_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rk[None, :] < K),
    )


@triton.jit
def _dropout_grad_a_kernel(
    gz_ptr,
    x_ptr,
    ga_ptr,
    M,
    K,
    R,
    sgm,
    sgr,
    sxm,
    sxk,
    sar,
    sak,
    seed,
    p,
    inv,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """grad_A[j, k] = sum_m gz[m, j] * dropout(x)[m, k]"""
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        gz_t = tl.load(
            gz_ptr + rm[None, :] * sgm + rr[:, None] * sgr, mask=(rm[None, :] < M) & (rr[:, None] < R), other=0.0
        )
        in_x = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=in_x, other=0.0)
        keep = tl.rand(seed, rm[:, None] * K + rk[None, :]) >= p
        x = tl.where(keep & in_x, x * inv, 0.0)
        if IEEE:
            acc += tl.dot(gz_t, x, input_precision="ieee")
        else:
            acc += tl.dot(gz_t, x.to(gz_t.dtype))
    tl.store(
        ga_ptr + rr[:, None] * sar + rk[None, :] * sak,
        acc.to(ga_ptr.dtype.element_ty),
        mask=(rr[:, None] < R) & (rk[None, :] < K),
    )


@triton.jit
def _keep_mask_kernel(out_ptr, M, K, seed, p, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(seed, offs) >= p
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=offs < M * K)


def _blocks(R: int, fp32: bool) -> tuple[int, int, int]:
    if R > MAX_RANK:
        raise ValueError(f"The Triton low-rank kernels support ranks up to {MAX_RANK}, got {R}.")
    block_r = max(16, triton.next_power_of_2(R))
    # Above rank 64 a 32 x 32 tile with a whole rank row spills registers in fp32 (and in grad_a at 256) on sm_80
    # and sm_90; 16 x 16 tiles do not, but for one: fp32 at rank 256 on sm_90, which 16 x 8 tiles fix (the
    # fp32 products run on FMA units, which take an 8-wide K; bf16/fp16 tensor-core products need 16)
    # (benchmarks/triton_aot.py, docs/ops.md).
    if block_r > 128 and fp32:
        return (16, 8, block_r)
    return (16, 16, block_r) if block_r > 64 else (32, 32, block_r)


def _check_size(M: int, K: int) -> None:
    if M * K >= 2**31:
        raise ValueError(f"x has {M * K} elements; the Triton dropout index is 32-bit (fewer than 2**31 needed).")


def _launch(
    kernel, grid, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, M: int, K: int, R: int, seed: int, p: float
) -> torch.Tensor:
    """Run one of the three kernels above: they all take (a, b, out, M, K, R, the strides of a, b and out, seed,
    p, 1 / (1 - p)) and the same block sizes; ``grid(BLOCK_M, BLOCK_K)`` gives the launch grid."""
    _check_size(M, K)
    BM, BK, BR = _blocks(R, a.dtype == torch.float32)
    kernel[grid(BM, BK)](
        a, b, out, M, K, R, *a.stride(), *b.stride(), *out.stride(), seed, p, 1.0 / (1.0 - p),
        IEEE=a.dtype == torch.float32, BLOCK_M=BM, BLOCK_K=BK, BLOCK_R=BR,
    )  # fmt: skip
    return out


def dropout_matmul(x: torch.Tensor, A: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """dropout(x) @ A^T for x: (M, K), A: (R, K)."""
    (M, K), R = x.shape, A.shape[0]
    z = torch.empty(M, R, device=x.device, dtype=x.dtype)
    return _launch(_dropout_matmul_kernel, lambda bm, bk: (triton.cdiv(M, bm),), x, A.to(x.dtype), z, M, K, R, seed, p)


def dropout_grad_x(gz: torch.Tensor, A: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """keep * (gz @ A) / (1 - p) for gz: (M, R), A: (R, K)."""
    (M, R), K = gz.shape, A.shape[1]
    gx = torch.empty(M, K, device=gz.device, dtype=gz.dtype)
    grid = lambda bm, bk: (triton.cdiv(M, bm), triton.cdiv(K, bk))  # noqa: E731
    return _launch(_dropout_grad_x_kernel, grid, gz, A, gx, M, K, R, seed, p)


def dropout_grad_a(gz: torch.Tensor, x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """gz^T @ dropout(x) for gz: (M, R), x: (M, K); the result is float32 (R, K)."""
    (M, R), K = gz.shape, x.shape[1]
    ga = torch.empty(R, K, device=gz.device, dtype=torch.float32)
    return _launch(_dropout_grad_a_kernel, lambda bm, bk: (triton.cdiv(K, bk),), gz, x, ga, M, K, R, seed, p)


def philox_keep_mask(seed: int, M: int, K: int, p: float, device: torch.device) -> torch.Tensor:
    """The Triton-path dropout mask (bool, True = kept) for x of shape (M, K)."""
    _check_size(M, K)
    out = torch.empty(M * K, dtype=torch.int8, device=device)
    _keep_mask_kernel[(triton.cdiv(M * K, 1024),)](out, M, K, seed, p, BLOCK=1024)
    return out.view(M, K).bool()
