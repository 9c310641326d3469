"""TRL's SFTTrainer with each peft-ctrl method as its ``peft_config``, on SmolLM2 (optionally a quantised base).

    python examples/trl_sft.py                               # state-ctrl on the MLP blocks, fp32 base
    python examples/trl_sft.py --method control-lora --quantize nf4
    python examples/trl_sft.py --method sublora              # SubLoRA's rank allocation as a Trainer callback
    python examples/trl_sft.py --method odelora              # peft LoRA trained by ODELoRA (Heun) in SFTTrainer
    python examples/trl_sft.py --method lean-lora            # peft LoRA through the fused op (lean_lora)

It trains SmolLM2-135M-Instruct on ARC-Easy questions in TRL's conversational prompt-completion format (the
loss is on the answer only), saves the adapter, reloads it with stock ``PeftModel.from_pretrained`` onto a
freshly loaded base and checks that the reloaded model gives the trained model's logits. Offline (the model and
the data ship with the package); 30 to 75 seconds on 2 CPU cores, depending on the method.
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile

import torch

METHODS = ["state-ctrl", "control-lora", "seal", "sublora", "odelora", "lean-lora"]


def peft_config(method: str):
    from peft import LoraConfig

    from peft_ctrl import SealConfig, StateCtrlConfig, SubLoRAConfig

    if method == "state-ctrl":
        return StateCtrlConfig(r=16, blocks="mlp", task_type="CAUSAL_LM")
    if method == "control-lora":
        return StateCtrlConfig.control_lora(r=16, lora_r=8, task_type="CAUSAL_LM")
    if method == "seal":  # SEAL reads the owner's key from PEFT_CTRL_SEAL_KEY (set in main for this demo)
        return SealConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if method == "sublora":  # allocations at steps 2, 4, ... down to 4 of 8 components per module
        return SubLoRAConfig(
            r=8,
            target_r=4,
            target_modules=["q_proj", "v_proj"],
            t_init=2,
            t_final=2,
            delta_t=2,
            hessian="fisher",  # the cheapest curvature estimate: seconds per allocation on SmolLM2 on a CPU
            task_type="CAUSAL_LM",
        )
    if method == "lean-lora":  # main() routes the LoRA layers SFTTrainer creates through the fused op
        return LoraConfig(r=8, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    return LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def load(quantize: str):
    from transformers import BitsAndBytesConfig

    from peft_ctrl.models import load_smollm2

    quant = None
    if quantize == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    elif quantize == "int8":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    model, tokenizer = load_smollm2(quantization_config=quant)
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=METHODS, default="state-ctrl")
    parser.add_argument("--quantize", choices=["none", "nf4", "int8"], default="none", help="bitsandbytes base")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--output-dir", default=None)
    options = parser.parse_args()
    output_dir = options.output_dir or tempfile.mkdtemp(prefix="peft-ctrl-trl-")
    if options.method == "seal":
        from peft_ctrl.seal.keys import KEY_ENV

        os.environ.setdefault(KEY_ENV, secrets.token_hex(32))  # a real owner keeps one key (docs/seal.md)

    import datasets
    import trl
    from peft import PeftModel

    from peft_ctrl import set_adapter_dtype
    from peft_ctrl_app.commonsense import read_items, shipped_file
    from trainer_callbacks import ODELoRAMixin, SubLoRACallback

    items = read_items(shipped_file("ARC-Easy", "train"))[: 4 * options.steps]
    data = datasets.Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": item.instruction}],
                "completion": [{"role": "assistant", "content": item.output}],
            }
            for item in items
        ]
    )
    args = trl.SFTConfig(
        output_dir=output_dir,
        max_steps=options.steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2 if options.method == "odelora" else 1e-3,  # ODELoRA's lr is the step of its W flow
        max_length=192,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    model, tokenizer = load(options.quantize)
    trainer_cls, extra = trl.SFTTrainer, {}
    if options.method == "odelora":

        class ODELoRASFTTrainer(ODELoRAMixin, trl.SFTTrainer):
            pass

        trainer_cls, extra = ODELoRASFTTrainer, {"scheme": "heun"}
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft_config(options.method),
        callbacks=[SubLoRACallback()] if options.method == "sublora" else [],
        **extra,
    )
    if options.method == "lean-lora":
        from peft_ctrl.ops import lean_lora

        print(f"{lean_lora(trainer.model)} LoRA layers through the fused low-rank op")
    trainer.model.print_trainable_parameters()
    trainer.train()
    losses = [round(e["loss"], 3) for e in trainer.state.log_history if "loss" in e]
    trainer.save_model(f"{output_dir}/adapter")

    reloaded = PeftModel.from_pretrained(load(options.quantize)[0], f"{output_dir}/adapter")
    if options.quantize != "none":  # over a quantised base TRL trains the adapter in bf16; peft loads it as float32
        set_adapter_dtype(reloaded, torch.bfloat16)
    ids = tokenizer("Which gas do plants take in?", return_tensors="pt").input_ids
    trainer.model.eval()
    with torch.no_grad():
        gap = (reloaded(input_ids=ids).logits - trainer.model(input_ids=ids).logits).abs().max().item()
    print(f"{options.method}, base {options.quantize}: losses {losses}")
    print(f"adapter saved to {output_dir}/adapter; reloaded with stock peft, max logit difference {gap:.2e}")


if __name__ == "__main__":
    main()
