"""Will Llama-3.1-8B fit on a 24 GiB card? The memory planner, without a GPU and without weights (about a minute on
2 CPU cores).

    python examples/plan_memory.py

Plans one training step (batch 1 x 2048 tokens, CUDA kernels) of PEFT LoRA, state-ctrl and QLoRA, in bf16 and, for
QLoRA, under bf16 autocast as the Trainer's bf16=True runs it; prints each breakdown and the longest sequence that
fits on 24 GiB. docs/planner.md says what is counted and how it is checked against the CPU meter.
"""

from peft_ctrl.planner import GIB, breakdown, longest_sequence, plan


def main() -> None:
    for method, dtype in (("lora-all", "bf16"), ("state-ctrl-mlp", "bf16"), ("qlora-ckpt", "autocast")):
        step = plan("llama-3.1-8b", method, dtype=dtype, seq=2048)
        print(breakdown(step))
        print(f"  fits on 24 GiB: {step.fits(24 * GIB)}")
        print(f"  longest sequence on 24 GiB: {longest_sequence('llama-3.1-8b', method, 24 * GIB, dtype=dtype)}\n")


if __name__ == "__main__":
    main()
