"""The Triton kernels compiled ahead of time for a CUDA architecture, without a GPU.

Triton ships its own ptxas, so ``compile_kernel`` lowers a kernel to PTX and a cubin for ``sm_80`` or ``sm_90`` on
any machine, and ``ptxas -v`` reports what the GPU would see: registers per thread, spill stores and loads, and the
shared memory Triton allocates. ``every_variant()`` lists the variants the dispatcher can launch: each kernel in
fp32, bf16 and fp16 (the input dtypes ``lowrank`` sends to Triton), at each rank class (``BLOCK_R``, the rank
rounded up to a power of two, 16 to ``MAX_RANK``).
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from . import triton_lowrank as kernels

ARCHS = (80, 90)
DTYPES = ("fp32", "bf16", "fp16")
RANK_CLASSES = tuple(2**i for i in range(4, kernels.MAX_RANK.bit_length()) if 2**i <= kernels.MAX_RANK)
# kernel -> the dtypes of its three pointers, given the input dtype D ("out-fp32": the output is always fp32)
POINTERS = {
    "_dropout_matmul_kernel": ("D", "D", "D"),
    "_dropout_grad_x_kernel": ("D", "D", "D"),
    "_dropout_grad_a_kernel": ("D", "D", "fp32"),
}
_CONSTEXPRS = ("IEEE", "BLOCK_M", "BLOCK_K", "BLOCK_R")


@dataclass(frozen=True)
class Compiled:
    kernel: str
    arch: int
    dtype: str
    block_r: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself compiles with (its newest bundled one; the older one rejects Triton's PTX for sm_90)."""
    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise RuntimeError(f"Triton's bundled ptxas is missing from {folder}.")


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` on ``ptx``."""
    ptxas = _ptxas(arch)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)  # sm_80, or sm_90a for Hopper
        run = subprocess.run(
            [ptxas, "-v", f"--gpu-name={target}", path, "-o", os.devnull], capture_output=True, text=True
        )
        if run.returncode != 0:
            raise RuntimeError(f"ptxas failed for sm_{arch}: {run.stderr.strip()[-400:]}")
        out = run.stderr
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out).groups())
    return registers, stores, loads


def compile_kernel(kernel: str, arch: int, dtype: str, block_r: int) -> Compiled:
    """Compile one variant for ``sm_{arch}`` and report its resources."""
    if arch not in ARCHS or dtype not in DTYPES or block_r not in RANK_CLASSES or kernel not in POINTERS:
        raise ValueError(f"no such variant: {kernel} sm_{arch} {dtype} BLOCK_R={block_r}.")
    fn = getattr(kernels, kernel)
    if not isinstance(fn, JITFunction):  # under TRITON_INTERPRET=1 (the CPU tests) the module holds interpreted ones
        fn = JITFunction(fn.fn)
    names = list(inspect.signature(fn.fn).parameters)
    pointers = iter(dtype if d == "D" else d for d in POINTERS[kernel])
    signature = {}
    for name in names:
        if name.endswith("_ptr"):
            signature[name] = "*" + next(pointers)
        elif name in _CONSTEXPRS:
            signature[name] = "constexpr"
        else:
            signature[name] = "fp32" if name in ("p", "inv") else "i32"
    block_m, block_k, _ = kernels._blocks(block_r, dtype == "fp32")
    values = {"IEEE": dtype == "fp32", "BLOCK_M": block_m, "BLOCK_K": block_k, "BLOCK_R": block_r}
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in values.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    registers, stores, loads = _ptxas_report(compiled.asm["ptx"], arch)
    return Compiled(kernel, arch, dtype, block_r, registers, stores, loads, compiled.metadata.shared)


def every_variant() -> list[tuple[str, int, str, int]]:
    return [(k, a, d, r) for k in POINTERS for a in ARCHS for d in DTYPES for r in RANK_CLASSES]
