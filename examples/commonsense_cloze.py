"""State-ctrl on ARC-Easy in the cloze form, on the real SmolLM2-135M-Instruct: score, train, save, reload, score.

    python examples/commonsense_cloze.py        # about 3 minutes on a 2-core CPU

The cloze form (``peft-ctrl bench commonsense-cloze``, docs/commonsense.md#the-cloze-form) asks the question alone
and answers with the option's own words, so the model can use what it knows: SmolLM2-135M is above chance on ARC-Easy
in this form before any training, and at chance in the LLM-Adapters label form (``the correct answer is answer2``).
The example trains MLP bridges (r = 64) for 40 steps on ARC-Easy train questions, saves the adapter, reloads it with
stock ``PeftModel.from_pretrained`` and scores 100 test questions before and after.
"""

import tempfile

import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

import peft_ctrl  # noqa: F401  (registers STATE_CTRL with peft)
from peft_ctrl import StateCtrlConfig
from peft_ctrl.models import load_smollm2
from peft_ctrl_app.commonsense import read_items, shipped_file, subset
from peft_ctrl_app.lm_bench import option_choices, scored_item
from peft_ctrl_app.tasks import cloze
from peft_ctrl_app.trainer_setup import ChatCollator, ChatDataset
from peft_ctrl_app.training import chat_example

torch.manual_seed(0)
base, tokenizer = load_smollm2()
# the cloze form: the question alone, answered with the option's words (peft_ctrl_app.commonsense.in_words)
train = [chat_example(tokenizer, cloze(it)) for it in subset(read_items(shipped_file("ARC-Easy", "train")), 320)]
questions = [cloze(it) for it in subset(read_items(shipped_file("ARC-Easy", "test")), 100)]
test = [scored_item(tokenizer, it, end_of_turn=True) for it in questions]
answers = [s.item.options.index(s.item.answer) for s in test]
print("a test question:", test[0].item.instruction, "| options:", " / ".join(test[0].item.options))


def accuracy(model) -> float:
    choices = option_choices(model, test, tokenizer.pad_token_id, bf16=True)
    return 100 * sum(c == a for c, a in zip(choices, answers, strict=True)) / len(test)


print(f"before training: {accuracy(base):.0f}% of {len(test)} ARC-Easy test questions (chance 25%)")
model = get_peft_model(base, StateCtrlConfig(r=64, blocks="mlp", task_type="CAUSAL_LM"))
model.print_trainable_parameters()
# Plain transformers.Trainer: the collator's labels are -100 outside the response and logits_to_keep limits the
# vocabulary projection to the response, so the model's own loss is the response-only loss.
args = TrainingArguments(
    output_dir=tempfile.mkdtemp(),
    max_steps=len(train) // 8,
    per_device_train_batch_size=8,
    learning_rate=1e-3,
    lr_scheduler_type="linear",
    warmup_steps=4,
    weight_decay=0.0,
    bf16=True,
    remove_unused_columns=False,
    logging_steps=10,
    save_strategy="no",
    report_to="none",
)
collator = ChatCollator(tokenizer.pad_token_id)
Trainer(model=model, args=args, train_dataset=ChatDataset(train), data_collator=collator).train()
trained = accuracy(model)
print(f"after {args.max_steps} steps: {trained:.0f}%")

with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    reloaded = PeftModel.from_pretrained(load_smollm2()[0], folder)
    again = accuracy(reloaded)
print(f"reloaded with stock PeftModel.from_pretrained: {again:.0f}%")
assert again == trained
