import os

# Triton's interpreter runs the kernels on CPU tensors; it must be chosen before the kernels are compiled.
os.environ.setdefault("TRITON_INTERPRET", "1")
