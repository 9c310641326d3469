"""SubLoRA rank allocation inside transformers.Trainer, on a tiny LLaMA (random init, CPU, about 30 seconds).

    python examples/sublora_trainer.py

Prints the allocation as it happens, writes the rank heatmap, saves the truncated adapter and reloads it.
"""

import logging
import tempfile
from pathlib import Path

import torch
import transformers
from peft import PeftModel, get_peft_model
from torch.utils.data import Dataset

from peft_ctrl import SubLoRAConfig
from trainer_callbacks import SubLoRACallback


class Patterns(Dataset):
    """Token sequences with a few repeating patterns: easy to learn, so the loss visibly falls."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i):
        ids = (torch.arange(24) * (1 + i % 3) + i % 5) % 120 + 2
        return {"input_ids": ids, "labels": ids}


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4
    )
    return transformers.LlamaForCausalLM(config)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.WARNING)
    config = SubLoRAConfig(
        r=8, target_r=4, target_modules=["q_proj", "v_proj", "down_proj"], t_init=20, t_final=20, delta_t=10
    )
    model = get_peft_model(tiny_llama(), config)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        args = transformers.TrainingArguments(
            output_dir=str(out),
            max_steps=120,
            per_device_train_batch_size=16,
            learning_rate=1e-2,
            logging_steps=20,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
        )
        callback = SubLoRACallback(heatmap_path=out / "ranks.png")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Patterns(), callbacks=[callback])
        trainer.train()
        print("ranks per module:", model.peft_config["default"].rank_pattern)
        trainer.save_model(str(out / "adapter"))
        size = (out / "adapter" / "adapter_model.safetensors").stat().st_size
        reloaded = PeftModel.from_pretrained(tiny_llama(), out / "adapter")
        ids = torch.stack([Patterns()[i]["input_ids"] for i in range(4)])
        model.eval()
        same = torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
        print(
            f"saved adapter: {size} bytes; reloaded outputs identical: {same}; heatmap: {(out / 'ranks.png').exists()}"
        )


if __name__ == "__main__":
    main()
