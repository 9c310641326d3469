"""TRL's SFTTrainer with this package's configs passed as ``peft_config``, as a TRL user would: the trainer wraps
the model itself, trains, saves, and the adapter reloads with stock peft."""

import pytest
import torch
from models import VOCAB, build
from peft import PeftModel

from peft_ctrl import StateCtrlConfig

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def word_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary (64 words), built in memory: nothing downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def texts(n: int = 24) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [" ".join(f"w{i}" for i in torch.randint(2, VOCAB, (10,), generator=g).tolist()) for _ in range(n)]


def test_control_lora_trains_saves_and_reloads_under_sft_trainer(tmp_path):
    """TRL's defaults turn on gradient checkpointing (the bridges train through it); bf16 is off because accelerate
    wraps the trained model's forward in autocast, so its logits would differ from the reloaded fp32 model's."""
    config = StateCtrlConfig.control_lora(r=4, lora_r=2, task_type="CAUSAL_LM")
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_length=16,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        bf16=False,
    )
    trainer = trl.SFTTrainer(
        model=build("llama"),
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": texts()}),
        processing_class=word_tokenizer(),
        peft_config=config,
    )
    model = trainer.model
    assert trainer.args.gradient_checkpointing
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type.value == "STATE_CTRL"
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert any("state_ctrl_lora_B" in n for n in changed) and any(".mlp.state_ctrl_B" in n for n in changed)
    trainer.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(build("llama"), tmp_path / "adapter")
    ids = torch.tensor([[2, 5, 9, 11, 3]])
    model.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
