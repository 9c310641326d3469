"""SubLoRA under transformers.Trainer: allocation without a custom loop, logs, heatmap, truncation, resume."""

import json

import torch
from models import Pattern, build
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from peft_ctrl import SubLoRAConfig
from trainer_callbacks import SubLoRACallback


def config(**kw):
    options = {"r": 4, "target_r": 2, "target_modules": ["q_proj", "v_proj", "down_proj"], "t_init": 2}
    return SubLoRAConfig(**{**options, "t_final": 4, "delta_t": 3, "hessian": "exact", **kw})


def arguments(tmp_path, **kw):
    options = {"max_steps": 24, "per_device_train_batch_size": 8, "learning_rate": 2e-2, "report_to": []}
    options |= {"use_cpu": True, "logging_steps": 4, "save_strategy": "no", "seed": 0}
    return TrainingArguments(output_dir=str(tmp_path), **{**options, **kw})


def eval_out(model):
    batch = torch.stack([Pattern(32)[i]["input_ids"] for i in range(8)])
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch).logits


def test_trainer_allocates_logs_truncates_and_saves(tmp_path):
    model = get_peft_model(build("llama"), config())
    callback = SubLoRACallback(heatmap_path=tmp_path / "ranks.png")
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=Pattern(32), callbacks=[callback])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert logs[0]["sublora_kept"] == 24 and logs[-1]["sublora_kept"] == logs[-1]["sublora_budget"] == 12
    assert [e["step"] for e in callback.allocator.history][-1] == 20  # the end of the decay: 24 - t_final
    pattern = model.peft_config["default"].rank_pattern
    assert sum(pattern.values()) == 12 and (tmp_path / "ranks.png").stat().st_size > 1000
    before = eval_out(model)
    trainer.save_model(str(tmp_path / "final"))
    saved = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == pattern
    torch.testing.assert_close(eval_out(PeftModel.from_pretrained(build("llama"), tmp_path / "final")), before)


def test_resume_continues_identically(tmp_path):
    def run(out, resume=None, max_steps=24, save=False):
        model = get_peft_model(build("llama"), config())
        kw = {"save_strategy": "steps", "save_steps": 12} if save else {}
        trainer = Trainer(
            model=model,
            args=arguments(out, max_steps=max_steps, **kw),
            train_dataset=Pattern(32),
            callbacks=[SubLoRACallback()],
        )
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    full, full_trainer = run(tmp_path / "full", save=True)
    assert (tmp_path / "full" / "checkpoint-12" / "sublora_state.json").is_file()
    resumed, resumed_trainer = run(tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-12"))
    history = [cb for cb in resumed_trainer.callback_handler.callbacks if isinstance(cb, SubLoRACallback)][0]
    full_cb = [cb for cb in full_trainer.callback_handler.callbacks if isinstance(cb, SubLoRACallback)][0]
    assert history.allocator.history == full_cb.allocator.history
    assert resumed.peft_config["default"].rank_pattern == full.peft_config["default"].rank_pattern
    torch.testing.assert_close(eval_out(resumed), eval_out(full))
