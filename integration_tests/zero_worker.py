"""One rank of a multi-process Trainer run under DeepSpeed ZeRO; launched by test_zero.py.

    torchrun --nproc_per_node=2 integration_tests/zero_worker.py --method seal --stage 3 --out DIR

Trains a tiny LLaMA with the method's adapter, saves it (``trainer.save_model`` and ``save_adapter``) and
writes ``DIR/rank{R}.json``: the logged losses, SubLoRA's ranks, the adapted model's logits on a fixed batch
(every rank takes part in that forward, as ZeRO-3 requires) and, under ZeRO-3, what merging said.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from peft_ctrl.distributed import save_adapter, strip_local_rank, training_arguments  # noqa: E402

SEAL_KEY = "zero-worker-owner-key-0123456789"
# lean-lora: peft LoRA on all linears with dropout, through the fused low-rank op (peft_ctrl.ops.lean_lora)
METHODS = [
    "state-ctrl",
    "state-ctrl-both",
    "control-lora",
    "state-ctrl-bert",
    "seal",
    "sublora",
    "odelora",
    "lean-lora",
]


def family(method: str) -> str:
    return "bert" if method == "state-ctrl-bert" else "llama"


def eval_batch(method: str):
    """A fixed batch of inputs for comparing outputs (the first examples of the training set)."""
    import torch

    data = dataset(method)
    return torch.stack([data[i]["input_ids"] for i in range(4)])


def dataset(method: str):
    from models import Pattern, Topics

    return Topics(32) if family(method) == "bert" else Pattern(32)


def adapter_config(method: str, stage: int | None):
    from peft_ctrl import SealConfig, StateCtrlConfig, SubLoRAConfig

    if method == "state-ctrl":
        return StateCtrlConfig(r=4)
    if method == "state-ctrl-both":
        return StateCtrlConfig(r=4, blocks="both")
    if method == "control-lora":
        return StateCtrlConfig.control_lora(r=4, lora_r=2)
    if method == "state-ctrl-bert":  # the classifier head trains too (modules_to_save), as users run BERTs
        return StateCtrlConfig(r=4, task_type="SEQ_CLS")
    if method == "seal":
        return SealConfig(r=4, key=SEAL_KEY, target_modules=["q_proj", "v_proj"])
    if method == "sublora":
        return SubLoRAConfig(
            r=4,
            target_r=2,
            target_modules=["q_proj", "v_proj"],
            t_init=2,
            t_final=3,
            delta_t=2,
            hessian="exact",
            exact_svd=stage is None,  # refused under DeepSpeed (its optimizer cannot restart statistics per parameter)
        )
    from peft import LoraConfig  # ODELoRA and lean_lora train plain LoRA factors

    if method == "lean-lora":
        return LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear")
    return LoraConfig(r=4, target_modules=["q_proj", "v_proj"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument(
        "--stage", type=lambda v: None if v.lower() == "none" else int(v), required=True, help="none: DDP"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--offload", action="store_true", help="ZeRO-3 with parameters and optimizer on the CPU")
    parser.add_argument("--resume")
    parser.add_argument("--max-steps", type=int, default=12)
    options = parser.parse_args(strip_local_rank(sys.argv[1:]))
    args = training_arguments(
        options.out,
        stage=options.stage,
        offload=options.offload,
        max_steps=options.max_steps,
        per_device_train_batch_size=4,
        learning_rate=0.1 if options.method == "odelora" else 2e-2,  # the flow's step size for ODELoRA
        warmup_steps=0,
        logging_steps=2,
        save_strategy="steps",
        save_steps=6,
        report_to=[],
        seed=0,
        disable_tqdm=True,
        resume_from_checkpoint=options.resume,
    )

    import torch
    from models import build
    from peft import get_peft_model
    from transformers import Trainer

    from trainer_callbacks import ODELoRATrainer, SubLoRACallback

    model = get_peft_model(build(family(options.method)), adapter_config(options.method, options.stage))
    if options.method == "lean-lora":
        from peft_ctrl.ops import lean_lora

        lean_lora(model)
    callbacks = [SubLoRACallback()] if options.method == "sublora" else []
    kwargs = {"model": model, "args": args, "train_dataset": dataset(options.method), "callbacks": callbacks}
    trainer = ODELoRATrainer(scheme="heun", **kwargs) if options.method == "odelora" else Trainer(**kwargs)
    trainer.train(resume_from_checkpoint=options.resume)
    out = Path(options.out)
    trainer.save_model(str(out / "final"))
    save_adapter(model, out / "save_adapter")

    record = {
        "world_size": args.world_size,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "rank_pattern": model.peft_config["default"].rank_pattern if options.method == "sublora" else None,
    }
    model.eval()
    with torch.no_grad():
        record["logits"] = model(input_ids=eval_batch(options.method)).logits.tolist()
    if options.method == "seal" and options.stage == 3:
        try:
            model.merge_adapter()
            record["merge"] = "merged"
        except ValueError as error:
            record["merge"] = str(error)
    (out / f"rank{args.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
