"""state-ctrl under transformers.Trainer, with the memory callback (CPU, seconds)."""

import pytest
import torch
from models import Topics, build
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from peft_ctrl import StateCtrlConfig
from trainer_callbacks import MemoryReportCallback


def arguments(tmp_path, **overrides) -> TrainingArguments:
    """A short CPU run on a batch of 8 that writes nothing unless asked."""
    options = {"per_device_train_batch_size": 8, "learning_rate": 1e-2, "report_to": [], "use_cpu": True}
    return TrainingArguments(output_dir=str(tmp_path / "run"), save_strategy="no", **options | overrides)


def test_trainer_trains_saves_and_reports_memory(tmp_path):
    model = get_peft_model(build("bert"), StateCtrlConfig(r=4, task_type="SEQ_CLS"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    callback = MemoryReportCallback()
    args = arguments(tmp_path, max_steps=4, gradient_accumulation_steps=2, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=Topics(32), callbacks=[callback])
    trainer.train()
    assert callback.saved_bytes and callback.saved_bytes > 0
    assert any("saved_activation_bytes" in entry for entry in trainer.state.log_history)
    # The classifier head is in modules_to_save (task_type SEQ_CLS) and the bridges train.
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert any("state_ctrl_B" in n for n in changed) and any("classifier" in n for n in changed)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(build("bert"), tmp_path / "adapter")
    batch = Topics(32)[0]
    batch = {k: v[None] for k, v in batch.items() if k != "labels"}
    model.eval()
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_a_failed_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Trainer checkpoints go through save_pretrained, so they are written atomically too."""
    import peft.peft_model

    model = get_peft_model(build("bert"), StateCtrlConfig(r=4, task_type="SEQ_CLS"))
    args = arguments(tmp_path, max_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=Topics(32))
    trainer.train()
    target = tmp_path / "best"
    trainer.save_model(str(target))
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    trainer.train()  # the weights move on

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        trainer.save_model(str(target))
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before


def test_control_lora_under_the_trainer_with_a_causal_lm(tmp_path):
    """Control+LoRA (MLP bridges + LoRA on q,k,v in one adapter) trains a causal LM under Trainer and reloads."""
    model = get_peft_model(build("llama"), StateCtrlConfig.control_lora(r=4, lora_r=2, task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(0))
    ]
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=3), train_dataset=data)
    trainer.train()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert any("state_ctrl_lora_B" in n for n in changed) and any(".mlp.state_ctrl_B" in n for n in changed)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(build("llama"), tmp_path / "adapter")
    ids = data[0]["input_ids"][None]
    model.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
