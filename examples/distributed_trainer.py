"""One training script for every launcher: state-ctrl, SEAL or SubLoRA under DeepSpeed ZeRO on a tiny LLaMA.

    python examples/distributed_trainer.py                                   # one process (still DeepSpeed)
    torchrun --nproc_per_node=2 examples/distributed_trainer.py --stage 3
    deepspeed --num_gpus 2 examples/distributed_trainer.py --stage 3        # on CPU: --num_accelerators 2
    accelerate launch --config_file "$(peft-ctrl zero-config --accelerate)" examples/distributed_trainer.py

The same lines work on GPUs (nccl) and on a CPU machine (gloo); nothing in the script depends on which.
Random init, no downloads; about 20 seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
from torch.utils.data import Dataset

from peft_ctrl.distributed import save_adapter, strip_local_rank, training_arguments


class Patterns(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i):
        ids = (torch.arange(24) * (1 + i % 3) + i % 5) % 120 + 2
        return {"input_ids": ids, "labels": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=["state-ctrl", "seal", "sublora"], default="state-ctrl")
    parser.add_argument("--stage", type=int, choices=[0, 1, 2, 3], default=2, help="ZeRO stage")
    parser.add_argument("--output-dir", default=None)
    options = parser.parse_args(strip_local_rank(sys.argv[1:]))  # the deepspeed launcher adds --local_rank
    output_dir = options.output_dir or tempfile.mkdtemp(prefix="peft-ctrl-zero-")

    # First: prepares the process for whichever launcher started it, then builds the Trainer's arguments.
    args = training_arguments(
        output_dir,
        stage=options.stage,
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
    )

    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer

    from peft_ctrl import SealConfig, StateCtrlConfig, SubLoRAConfig
    from trainer_callbacks import SubLoRACallback

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    )
    if options.method == "state-ctrl":
        config, callbacks = StateCtrlConfig(r=8), []
    elif options.method == "seal":  # a real run reads its key from PEFT_CTRL_SEAL_KEY (docs/seal.md)
        config, callbacks = (
            SealConfig(r=8, key="example-key-0123456789abcdef", target_modules=["q_proj", "v_proj"]),
            [],
        )
    else:
        # this script always runs DeepSpeed, whose optimizer cannot restart statistics per parameter (exact_svd)
        config = SubLoRAConfig(
            r=8,
            target_r=4,
            target_modules=["q_proj", "v_proj"],
            t_init=5,
            t_final=10,
            delta_t=5,
            exact_svd=False,
        )
        callbacks = [SubLoRACallback()]
    model = get_peft_model(base, config)
    trainer = Trainer(model=model, args=args, train_dataset=Patterns(), callbacks=callbacks)
    trainer.train()
    save_adapter(model, f"{output_dir}/adapter")  # gathers ZeRO-3 shards: the adapter is never empty
    if args.process_index == 0:
        losses = [round(e["loss"], 3) for e in trainer.state.log_history if "loss" in e]
        print(f"{options.method}, ZeRO-{options.stage}, {args.world_size} process(es): losses {losses}")
        print(f"adapter saved to {output_dir}/adapter")


if __name__ == "__main__":
    main()
