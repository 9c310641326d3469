"""ODELoRA on a matrix-sensing problem, then under transformers.Trainer with RK4.

    python examples/odelora_sensing.py        # about 20 s on a 2-core CPU

Part 1 recovers a rank-4, condition-number-100 matrix from 2000 random measurements with LoRA factors
starting from peft's default init (B = 0), with ODELoRA (Euler) and with AdamW, and prints how many
gradient evaluations each needs. Part 2 trains a small LLaMA's LoRA adapter with ODELoRATrainer (RK4).
"""

import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from peft_ctrl.optim import create_odelora_optimizer, imbalance
from peft_ctrl_app.sensing import SensingProblem
from trainer_callbacks import ODELoRATrainer


def sensing() -> None:
    problem = SensingProblem.make(100, 100, rank=4, kappa=100, measurements=2000)
    for name in ("ODELoRA euler", "AdamW"):
        model = problem.model(r=4)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = create_odelora_optimizer(model, lr=0.7) if name.startswith("ODE") else torch.optim.AdamW(params, lr=1e-2)
        evaluations = 0
        while evaluations < 600 and problem.error(model) >= 1e-6:
            opt.zero_grad()
            problem.loss(model).backward()
            opt.step()
            evaluations += 1
        layer = model.base_model.model.lin
        balance = imbalance(layer.lora_B["default"].weight, layer.lora_A["default"].weight)
        print(
            f"{name:14s} {evaluations:4d} evaluations, relative error {problem.error(model):.1e}, "
            f"imbalance {balance:.1e}"
        )


class Pattern(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = (torch.arange(16) * 3 + i % 4) % 120 + 2
        return {"input_ids": ids, "labels": ids}


def trainer() -> None:
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    )
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=30,
            per_device_train_batch_size=16,
            learning_rate=2.0,
            logging_steps=10,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            max_grad_norm=0.0,
        )
        ODELoRATrainer(model=model, args=args, train_dataset=Pattern(), scheme="rk4").train()


if __name__ == "__main__":
    sensing()
    trainer()
