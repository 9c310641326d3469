"""Control+LoRA on the real SmolLM2-135M-Instruct, on the shipped commonsense data: train, save, reload, score.

    python examples/control_lora_commonsense.py        # about 2 minutes on a 2-core CPU

One adapter holds an MLP bridge per layer (state-ctrl, r = 64) and LoRA r = 32 on q, k, v (the authors'
Control+LoRA recipe, ``StateCtrlConfig.control_lora()``). The bridges train with depth-scaled learning rates (each
at lr / RMS of the residual state it reads, ``peft_ctrl.optim.depth_scaled_param_groups``), the LoRA part at lr.
The adapter saves as one ``adapter_config.json`` and loads with stock ``PeftModel.from_pretrained``; the reloaded
model scores OpenBookQA test questions exactly as the trained one does.
"""

import tempfile

import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

import peft_ctrl  # noqa: F401  (registers STATE_CTRL with peft)
from peft_ctrl import StateCtrlConfig
from peft_ctrl.models import load_smollm2
from peft_ctrl.optim import bridge_input_rms, depth_scaled_param_groups
from peft_ctrl_app.commonsense import read_items, shipped_file, subset
from peft_ctrl_app.lm_bench import option_choices, scored_item
from peft_ctrl_app.trainer_setup import ChatCollator, ChatDataset
from peft_ctrl_app.training import chat_example

torch.manual_seed(0)
base, tokenizer = load_smollm2()
model = get_peft_model(base, StateCtrlConfig.control_lora(task_type="CAUSAL_LM"))
model.print_trainable_parameters()

train = [chat_example(tokenizer, it) for it in subset(read_items(shipped_file("openbookqa", "train")), 160)]
test = [scored_item(tokenizer, it) for it in subset(read_items(shipped_file("openbookqa", "test")), 40)]
collator = ChatCollator(tokenizer.pad_token_id)
first = {k: v for k, v in collator([{"example": e} for e in train[:8]]).items() if k != "labels"}
rms = bridge_input_rms(model, lambda: model(**first))
print(f"RMS of the state each MLP bridge reads: layer 0 {min(rms.values()):.2f} ... up to {max(rms.values()):.2f}")
optimizer = torch.optim.AdamW(depth_scaled_param_groups(model, 1e-3, rms))

# transformers.Trainer with the depth-scaled optimizer (its schedule scales every group alike): the collator's labels
# are -100 outside the response, so the model's own loss is the response-only loss.
args = TrainingArguments(
    output_dir=tempfile.mkdtemp(),
    max_steps=len(train) // 8,
    per_device_train_batch_size=8,
    lr_scheduler_type="constant",
    bf16=True,
    remove_unused_columns=False,
    logging_steps=5,
    save_strategy="no",
    report_to="none",
)
trainer = Trainer(
    model=model, args=args, train_dataset=ChatDataset(train), data_collator=collator, optimizers=(optimizer, None)
)
trainer.train()

choices = option_choices(model, test, tokenizer.pad_token_id, bf16=True)
accuracy = sum(s.item.options[c] == s.item.answer for s, c in zip(test, choices, strict=True)) / len(test)
print(f"OpenBookQA, {len(test)} test questions after {args.max_steps} steps: {100 * accuracy:.1f}% (chance 25%)")

with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    reloaded = PeftModel.from_pretrained(load_smollm2()[0], folder)
    assert option_choices(reloaded, test, tokenizer.pad_token_id, bf16=True) == choices
print("saved, reloaded with stock PeftModel.from_pretrained: the same answers")
