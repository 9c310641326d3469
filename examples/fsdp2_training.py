"""FSDP2 (torch's fully_shard) training of a state-ctrl, Control+LoRA, SEAL or lean_lora adapter in a custom loop,
on CPU or GPUs.

    torchrun --nproc_per_node=2 examples/fsdp2_training.py --method state-ctrl    # 2 processes, sharded
    python examples/fsdp2_training.py --method state-ctrl                         # 1 process, unsharded
    torchrun --nproc_per_node=2 examples/fsdp2_training.py --method lean-lora     # peft LoRA through the fused op

Every process takes its share of each global batch of 8 sequences, so the 2-process losses are the
1-process losses (up to the order of floating-point sums); the adapter is gathered from the shards and saved
whole, and loads with stock ``PeftModel.from_pretrained``. gloo on CPU, nccl on GPUs. With the Trainer on GPUs,
``accelerate launch --config_file "$(peft-ctrl zero-config --fsdp)"`` shards the same way; accelerate has no
FSDP on CPU, hence this loop. Random init, no downloads; about 10 seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from peft_ctrl.distributed import save_adapter, shard_model
from peft_ctrl.ops import lean_lora

GLOBAL_BATCH = 8


def base_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    return LlamaForCausalLM(config)


def batch(step: int) -> torch.Tensor:
    """The global batch of ``step``: sequences of a repeating pattern (the same on every process)."""
    i = torch.arange(GLOBAL_BATCH) + step * GLOBAL_BATCH
    return (torch.arange(24) * (1 + i[:, None] % 3) + i[:, None] % 5) % 120 + 2


def peft_config(method: str, blocks: str, dropout: float):
    from peft import LoraConfig

    from peft_ctrl import SealConfig, StateCtrlConfig, SubLoRAConfig

    if method == "state-ctrl":
        return StateCtrlConfig(r=8, blocks=blocks, dropout=dropout)
    if method == "control-lora":  # MLP bridges plus LoRA on q, k, v
        return StateCtrlConfig.control_lora(r=8, lora_r=4, dropout=dropout)
    if method == "seal":  # a real run reads its key from PEFT_CTRL_SEAL_KEY (docs/seal.md)
        key = "example-key-0123456789abcdef"
        return SealConfig(r=8, key=key, lora_dropout=dropout, target_modules=["q_proj", "v_proj"])
    if method == "lean-lora":  # peft LoRA on every linear; main() routes it through the fused op (lean_lora)
        return LoraConfig(r=8, lora_dropout=dropout, target_modules="all-linear")
    return SubLoRAConfig(r=8, target_r=4, target_modules=["q_proj", "v_proj"])  # refused by shard_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    methods = ["state-ctrl", "control-lora", "seal", "lean-lora", "sublora"]
    parser.add_argument("--method", choices=methods, default="state-ctrl")
    parser.add_argument("--blocks", choices=["mlp", "attn", "both"], default="both", help="state-ctrl bridges")
    parser.add_argument("--dropout", type=float, default=0.0, help="adapter dropout (masks differ per process)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--output-dir", default=None)
    options = parser.parse_args()
    output_dir = options.output_dir or tempfile.mkdtemp(prefix="peft-ctrl-fsdp2-")

    from peft import get_peft_model

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if GLOBAL_BATCH % world:
        raise ValueError(f"The global batch of {GLOBAL_BATCH} does not split over {world} processes.")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    model = get_peft_model(base_model(), peft_config(options.method, options.blocks, options.dropout)).to(device)
    if options.method == "lean-lora":
        lean_lora(model)
    if distributed:
        shard_model(model)  # every decoder block, then the whole model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.lr)
    losses = []
    for step in range(options.steps):
        ids = batch(step)[rank::world].to(device)  # this process's share of the global batch
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()  # FSDP averages the gradients over the processes
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        if distributed:
            dist.all_reduce(mean)
        losses.append(mean.item() / world)
    save_adapter(model, f"{output_dir}/adapter")  # gathers the adapter's shards; rank 0 writes
    if rank == 0:
        Path(output_dir, "losses.json").write_text(json.dumps(losses))
        print(f"{options.method}, {world} process(es): losses {[round(x, 3) for x in losses[::5]]} ...")
        print(f"adapter saved to {output_dir}/adapter")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
