"""Imported first by the package: keeps two upstream import-time warnings out of every command's output.

bitsandbytes, when installed, looks for its optional CPU kernels on the Hugging Face Hub at import. Without the
``kernels`` package it logs "Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels";
with it (transformers >= 5.25 depends on ``kernels``) and the Hub offline, ``kernels`` logs "Skipping publisher
trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in offline mode."
bitsandbytes' 4-bit CPU path works either way (tests/test_quantized.py), so both are noise. Only those two
messages are dropped; every other record of those loggers still reaches the user.
"""

import logging


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessages("Failed to load CPU gemm_4bit_forward"))
logging.getLogger("kernels._internals.hf_hub").addFilter(
    _DropMessages("Skipping publisher trust check for 'kernels-community/")
)
