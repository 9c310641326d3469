"""What peft-ctrl guarantees around a training run, shown on a small LLaMA (random init, built from a config).

    python examples/safe_training_run.py        # about 20 s on a 2-core CPU

1. Activation memory with and without gradient checkpointing (both modes), state-ctrl against PEFT LoRA:
   the meter reports the peak bytes saved for backward, also inside checkpointed layers.
2. A save that fails midway (here: a simulated full disk) leaves the adapter already on disk intact.
3. An adapter that does not fit the model (trained on a 4-layer model, loaded onto a 3-layer one) is refused
   with the tensors named, instead of loading half of it.
"""

import tempfile
from pathlib import Path

import peft.peft_model
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_ctrl import StateCtrlConfig, saved_activation_bytes


def base_model(layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return LlamaForCausalLM(config)


def step_bytes(config, checkpointing: str | None, data: torch.Tensor) -> int:
    model = get_peft_model(base_model(), config)
    model.train()
    if checkpointing is not None:
        reentrant = checkpointing == "reentrant"
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()
    return saved_activation_bytes(lambda: model(input_ids=data, labels=data).loss.backward(), exclude=model)


def main() -> None:
    data = torch.arange(10, 26).repeat(8, 4)  # 8 sequences of 64 tokens
    configs = {
        "state-ctrl mlp r=16": StateCtrlConfig(r=16),
        "PEFT LoRA all-linear r=8": LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.05),
    }
    print("1. MiB saved for backward in one step (peak)")
    print(f"{'':28s}{'no checkpointing':>18s}{'reentrant':>12s}{'non-reentrant':>15s}")
    for name, config in configs.items():
        figures = [step_bytes(config, mode, data) / 2**20 for mode in (None, "reentrant", "non-reentrant")]
        print(f"{name:28s}{figures[0]:18.2f}{figures[1]:12.2f}{figures[2]:15.2f}")

    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "adapter"
        model = get_peft_model(base_model(), StateCtrlConfig(r=16, init_weights=False))
        model.save_pretrained(target)
        good = (target / "adapter_model.safetensors").read_bytes()

        def disk_full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        original, peft.peft_model.safe_save_file = peft.peft_model.safe_save_file, disk_full
        try:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).add_(1.0)
            model.save_pretrained(target)
        except OSError as err:
            print(
                f"2. the second save failed ({err.strerror}); adapter on disk unchanged:",
                (target / "adapter_model.safetensors").read_bytes() == good,
            )
        finally:
            peft.peft_model.safe_save_file = original

        smaller = base_model(layers=3)
        try:
            PeftModel.from_pretrained(smaller, target)
        except ValueError as err:
            print("3. refused:", str(err).splitlines()[0])
            print("  ", str(err).splitlines()[1])


if __name__ == "__main__":
    main()
