"""State-ctrl with transformers.Trainer on the pretrained all-MiniLM-L6-v2 (offline), with the memory callback.

    HF_HUB_OFFLINE=1 python examples/state_ctrl_trainer.py    # about a minute on a 2-core CPU

Nothing changes in a Trainer script except the peft config; MemoryReportCallback logs the bytes saved
for backward in the first step.
"""

import tempfile

import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from peft_ctrl import StateCtrlConfig
from peft_ctrl_app.datasets import stdlib_topics
from peft_ctrl_app.finetune import accuracy, build_model, encode
from trainer_callbacks import MemoryReportCallback


class Encoded(torch.utils.data.Dataset):
    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.data.items()}


def main() -> None:
    train_data, test_data = stdlib_topics()
    train, test = encode(train_data, 40), encode(test_data, 40)
    model = build_model("minilm", num_labels=len(train_data.label_names), seed=0)
    model = get_peft_model(model, StateCtrlConfig(r=16, blocks="mlp", task_type="SEQ_CLS"))
    model.print_trainable_parameters()
    memory = MemoryReportCallback()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=60,
            per_device_train_batch_size=32,
            learning_rate=3e-3,
            warmup_steps=6,
            logging_steps=20,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
        )
        Trainer(model=model, args=args, train_dataset=Encoded(train), callbacks=[memory]).train()
    print(f"saved for backward in one step: {memory.saved_bytes / 2**20:.1f} MiB")
    print(f"test accuracy after 60 steps: {100 * accuracy(model, test):.1f}%")


if __name__ == "__main__":
    main()
