"""ODELoRA under transformers.Trainer with every scheme (CPU, seconds)."""

import pytest
import torch
from models import Pattern, build
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

from trainer_callbacks import ODELoRATrainer


def eval_loss(model) -> float:
    data = Pattern()
    batch = torch.stack([data[i]["input_ids"] for i in range(len(data))])
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=batch, labels=batch).loss)


@pytest.mark.parametrize("scheme", ["euler", "heun", "rk4"])
def test_trainer_reduces_the_loss_with_every_scheme(scheme, tmp_path):
    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    before = eval_loss(model)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=16,
        per_device_train_batch_size=8,
        learning_rate=2.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
    )
    ODELoRATrainer(model=model, args=args, train_dataset=Pattern(), scheme=scheme).train()
    assert eval_loss(model) < 0.97 * before


def test_rk_schemes_refuse_gradient_accumulation(tmp_path):
    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        ODELoRATrainer(model=model, args=args, train_dataset=Pattern(), scheme="rk4").train()
