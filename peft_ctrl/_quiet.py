"""Imported first by the package: keeps one upstream import-time warning out of every command's output.

bitsandbytes, when installed, logs at import on machines without its optional CPU kernels package ("Failed to
load CPU gemm_4bit_forward from kernels-community ... pip install kernels"). Its 4-bit CPU path works without
that package (tests/test_quantized.py), so the message is noise; only that one logger is raised to ERROR.
"""

import logging

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
