"""The Triton kernels compile ahead of time for sm_80 and sm_90 without a GPU (Triton's own ptxas), and the report
reads registers, spills and shared memory. The whole sweep is benchmarks/triton_aot.py (docs/results/triton_aot.md).

The compiles run in a subprocess without TRITON_INTERPRET: the unit tests run the kernels in Triton's interpreter
(tests/conftest.py), which replaces the language's builtins in its process."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = """
import json, sys
from dataclasses import asdict
from peft_ctrl.ops.triton_aot import POINTERS, compile_kernel
try:
    compile_kernel("_dropout_matmul_kernel", 80, "fp64", 16)
except ValueError as err:
    refused = str(err)
out = [asdict(compile_kernel(k, a, "bf16", 16)) for k in sorted(POINTERS) for a in (80, 90)]
print(json.dumps({"compiled": out, "refused": refused}))
"""


def test_each_kernel_compiles_for_sm80_and_sm90_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert "no such variant" in result["refused"]
    kernels = ("_dropout_grad_a_kernel", "_dropout_grad_x_kernel", "_dropout_matmul_kernel")
    assert {(c["kernel"], c["arch"]) for c in result["compiled"]} == {(k, a) for k in kernels for a in (80, 90)}
    for c in result["compiled"]:
        assert c["registers"] > 0 and c["shared_bytes"] >= 0
        assert c["spill_stores"] == 0 and c["spill_loads"] == 0, c  # the smallest rank class never spills
