"""The jobs' Trainer path (peft_ctrl_app.trainer_setup) and the callbacks it uses (StepTimeCallback,
AdaLoRACallback), on a tiny LLaMA: the collator's labels give the old hand-written loop's loss, the step timer and
AdaLoRA's allocation run inside Trainer."""

import statistics

import pytest
import torch
from models import build
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from transformers import Trainer

from peft_ctrl_app.trainer_setup import ChatCollator, ChatDataset, in_batch_order, job_arguments, step_losses
from peft_ctrl_app.training import ChatExample, answer_loss, collate, length_bucketed_batches
from trainer_callbacks import AdaLoRACallback, StepTimeCallback

PAD = 0


def examples(n: int = 16) -> list[ChatExample]:
    return [
        ChatExample(f"s{i}", "a", [5 + i % 7, 6, 7 + i % 3][: 1 + i % 3], [8 + i % 5, 9, 1][: 1 + i % 3])
        for i in range(n)
    ]


def test_the_collators_labels_give_the_answer_only_loss():
    """The model's own loss on the collator's batch (labels -100 outside the response, logits_to_keep) equals
    answer_loss, the loss every job trained with before it moved to Trainer."""
    model = build("llama")
    rows = examples(6)
    batch = ChatCollator(PAD)([{"example": e} for e in rows])
    assert batch["logits_to_keep"] == batch["labels"].shape[1] and (batch["labels"][:, 0] == -100).all()
    torch.testing.assert_close(model(**batch).loss, answer_loss(model, collate(rows, PAD)))


def test_in_batch_order_lays_out_the_loops_batches():
    data, lengths = [f"item{i}" for i in range(10)], [1, 5, 2, 8, 3, 9, 4, 7, 6, 0]
    order = in_batch_order(data, lengths, 2, 7, seed=0)
    batches = length_bucketed_batches(torch.tensor(lengths), 2, 7, 0)
    assert [order[i : i + 2] for i in range(0, 14, 2)] == [[data[i] for i in b.tolist()] for b in batches]


def _trainer(model, tmp_path, steps: int, callbacks: list) -> Trainer:
    args = job_arguments(str(tmp_path), steps=steps, batch_size=4, lr=1e-3, seed=0, bf16=False, disable_tqdm=True)
    return Trainer(
        model=model,
        args=args,
        train_dataset=ChatDataset(examples()),
        data_collator=ChatCollator(PAD),
        callbacks=callbacks,
    )


def test_the_step_timer_times_every_step(tmp_path):
    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    timer = StepTimeCallback(skip=1)
    trainer = _trainer(model, tmp_path, 5, [timer])
    trainer.train()
    assert len(timer.seconds) == 5 and all(s > 0 for s in timer.seconds)
    assert timer.median() == statistics.median(timer.seconds[1:]) and timer.median(skip=0) > 0
    assert any("median_step_seconds" in entry for entry in trainer.state.log_history)
    assert len(step_losses(trainer.state.log_history)) == 5
    with pytest.raises(ValueError, match="skip must be >= 0"):
        StepTimeCallback(skip=-1)
    with pytest.raises(ValueError, match="No training step"):
        StepTimeCallback().median()


def test_the_jobs_schedule_warms_up_for_a_tenth_then_decays_to_zero(tmp_path):
    """Trainer's linear schedule with job_arguments' warm-up: 0 at the first step, the peak at step steps // 10,
    then a straight line that would reach 0 at step ``steps``."""
    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    trainer = _trainer(model, tmp_path, 20, [])
    trainer.train()
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "loss" in entry]
    assert rates[:3] == pytest.approx([0.0, 0.5e-3, 1e-3])
    assert rates[2:] == pytest.approx([1e-3 * (20 - step) / 18 for step in range(2, 20)])


def _adalora(steps: int):
    config = AdaLoraConfig(
        init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=steps, target_modules=["q_proj", "v_proj"]
    )
    return get_peft_model(build("llama"), config)


def test_adalora_allocates_inside_trainer_with_its_callback(tmp_path):
    """Without the callback nothing allocates (peft leaves update_and_allocate to the loop); with it, the ranks are
    cut to the budget and fixed in the config's rank_pattern at the end, as in a hand-written loop."""
    plain = _adalora(6)
    _trainer(plain, tmp_path / "plain", 6, []).train()
    assert plain.peft_config["default"].rank_pattern is None
    model = _adalora(6)
    _trainer(model, tmp_path / "callback", 6, [AdaLoRACallback()]).train()
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None and sum(sum(mask) for mask in pattern.values()) <= 2 * len(pattern)


def test_the_adalora_callback_refuses_another_model(tmp_path):
    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="AdaLoRACallback needs a peft AdaLoRA model"):
        _trainer(model, tmp_path, 2, [AdaLoRACallback()]).train()


class _Recording(ChatCollator):
    def __init__(self, pad_id: int) -> None:
        super().__init__(pad_id)
        self.batches: list[list[list[int]]] = []

    def __call__(self, features):
        self.batches.append([f["example"].prompt_ids + f["example"].answer_ids for f in features])
        return super().__call__(features)


def test_every_method_of_a_seed_sees_the_loops_batches_in_the_same_order(tmp_path):
    """The comparison's premise: rows differ in the adapter only, not in the data they step on. Trainer reads the
    examples in in_batch_order's layout, so every method of a seed steps on exactly length_bucketed_batches'
    batches (the hand-written loop's), in its order (no length curriculum: the batch order is shuffled)."""
    from peft_ctrl import StateCtrlConfig

    data = examples(64)
    lengths = [len(e.prompt_ids) + len(e.answer_ids) for e in data]
    expected = [[data[i].prompt_ids + data[i].answer_ids for i in b.tolist()] for b in length_bucketed_batches(
        torch.tensor(lengths), 4, 16, 3)]  # fmt: skip
    seen = []
    for i, config in enumerate(
        [LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), StateCtrlConfig(r=4, blocks="mlp"), None]
    ):
        model = get_peft_model(build("llama"), config) if config else _adalora(16)
        collator = _Recording(PAD)
        args = job_arguments(str(tmp_path / str(i)), steps=16, batch_size=4, lr=1e-3, seed=3, bf16=False)
        ordered = ChatDataset(in_batch_order(data, lengths, 4, 16, 3))
        Trainer(model=model, args=args, train_dataset=ordered, data_collator=collator).train()
        seen.append(collator.batches)
    assert seen[0] == seen[1] == seen[2] == expected
