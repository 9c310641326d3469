"""TRL's SFTTrainer with this package's configs passed as ``peft_config``, as a TRL user would: the trainer wraps
the model itself, trains, saves, and the adapter reloads with stock peft."""

import os

import pytest
import torch
from models import VOCAB, build, quantised_base, save_quantisable_llama
from peft import LoraConfig, PeftModel, PeftType

from peft_ctrl import SealConfig, StateCtrlConfig, SubLoRAConfig, set_adapter_dtype
from peft_ctrl.optim import ODELoRA
from peft_ctrl.seal.keys import KEY_ENV
from trainer_callbacks import ODELoRAMixin, SubLoRACallback

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


def sft_args(tmp_path, **kw) -> "trl.SFTConfig":
    """bf16 is off because accelerate wraps the trained model's forward in autocast, so its logits would differ
    from the reloaded fp32 model's; everything else is TRL's default (gradient checkpointing on, among others)."""
    options = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "max_length": 16}
    options |= {"report_to": [], "save_strategy": "no", "use_cpu": True, "dataloader_num_workers": 0, "bf16": False}
    return trl.SFTConfig(output_dir=str(tmp_path / "out"), **{**options, **kw})


def train_save_reload(tmp_path, config, trainer_cls=None, callbacks=(), base=lambda: build("llama"), **kw):
    """Trains ``base()`` through SFTTrainer(peft_config=config), saves, reloads onto a fresh ``base()`` with stock
    peft (the adapter in the dtype it trained in): the trainer and the changed trainable parameter names."""
    trainer = (trainer_cls or trl.SFTTrainer)(
        model=base(),
        args=sft_args(tmp_path, **kw),
        train_dataset=datasets.Dataset.from_dict({"text": texts()}),
        processing_class=word_tokenizer(),
        peft_config=config,
        callbacks=list(callbacks),
    )
    model = trainer.model
    assert trainer.args.gradient_checkpointing
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type == config.peft_type
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    trainer.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(base(), tmp_path / "adapter")
    set_adapter_dtype(loaded, next(iter(before.values())).dtype)  # peft loads adapters as float32
    ids = torch.tensor([[2, 5, 9, 11, 3]])
    model.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    return trainer, changed


def test_control_lora_trains_saves_and_reloads_under_sft_trainer(tmp_path):
    config = StateCtrlConfig.control_lora(r=4, lora_r=2, task_type="CAUSAL_LM")
    _, changed = train_save_reload(tmp_path, config)
    assert any("state_ctrl_lora_B" in n for n in changed) and any(".mlp.state_ctrl_B" in n for n in changed)


@pytest.mark.parametrize("blocks", ["mlp", "both"])
def test_state_ctrl_trains_saves_and_reloads_under_sft_trainer(tmp_path, blocks):
    _, changed = train_save_reload(tmp_path, StateCtrlConfig(r=4, blocks=blocks, task_type="CAUSAL_LM"))
    assert any(".mlp.state_ctrl_B" in n for n in changed)
    assert any(".self_attn.state_ctrl_B" in n for n in changed) == (blocks == "both")


def test_seal_trains_saves_and_reloads_under_sft_trainer_and_writes_no_key(tmp_path, monkeypatch):
    key = "trl-owner-key-0123456789abcdef"
    monkeypatch.setenv(KEY_ENV, key)
    config = SealConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer, changed = train_save_reload(tmp_path, config, save_strategy="steps", save_steps=2)
    assert any("seal_B" in n for n in changed)
    assert trainer.model.peft_config["default"].commitment
    written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
    assert any(f.endswith("checkpoint-2/adapter_model.safetensors") for f in written)
    for secret in (key.encode(), key.encode().hex().encode()):
        assert [f for f in written if secret in open(f, "rb").read()] == []


def test_sublora_callback_allocates_and_truncates_under_sft_trainer(tmp_path):
    config = SubLoRAConfig(
        r=4,
        target_r=2,
        target_modules=["q_proj", "v_proj", "down_proj"],
        t_init=2,
        t_final=4,
        delta_t=3,
        hessian="exact",
        task_type="CAUSAL_LM",
    )
    trainer, changed = train_save_reload(tmp_path, config, callbacks=[SubLoRACallback()], max_steps=12)
    assert changed
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SubLoRACallback))
    # every delta_t steps after t_init, the last at the end of the decay (max_steps - t_final)
    assert [entry["step"] for entry in callback.allocator.history] == [5, 8]
    pattern = trainer.model.peft_config["default"].rank_pattern
    assert sum(pattern.values()) == 12  # 2 layers x 3 modules x target_r 2, kept in the saved adapter


class ODELoRASFTTrainer(ODELoRAMixin, trl.SFTTrainer):
    """What docs/odelora.md tells a TRL user to write."""


@pytest.mark.parametrize("scheme", ["euler", "heun"])
def test_odelora_optimizer_trains_lora_under_sft_trainer(tmp_path, scheme):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    assert config.peft_type == PeftType.LORA
    trainer, changed = train_save_reload(
        tmp_path, config, trainer_cls=lambda **kw: ODELoRASFTTrainer(scheme=scheme, **kw), logging_steps=1
    )
    assert isinstance(trainer.optimizer.optimizer, ODELoRA)  # accelerate wraps the optimizer
    assert any("lora_B" in n for n in changed)


def test_lean_lora_trains_saves_and_reloads_under_sft_trainer(tmp_path):
    """lean_lora is applied to the model SFTTrainer wrapped, before training: peft's LoRA through the fused op."""
    from peft_ctrl.ops import lean_lora

    class LeanSFTTrainer(trl.SFTTrainer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.switched = lean_lora(self.model)

    config = LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer, changed = train_save_reload(tmp_path, config, trainer_cls=LeanSFTTrainer)
    assert trainer.switched == 14  # 7 linears x 2 layers
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


QUANTISED_CONFIGS = {
    "state-ctrl": lambda: StateCtrlConfig(r=4, blocks="both", task_type="CAUSAL_LM"),
    "control-lora": lambda: StateCtrlConfig.control_lora(r=4, lora_r=2, task_type="CAUSAL_LM"),
    "seal": lambda: SealConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    "sublora": lambda: SubLoRAConfig(
        r=4, target_r=2, target_modules=["q_proj", "v_proj"], t_init=2, t_final=2, delta_t=2, hessian="fisher"
    ),
}


@pytest.mark.parametrize("method", list(QUANTISED_CONFIGS))
def test_methods_train_over_a_4bit_base_under_sft_trainer(tmp_path, monkeypatch, method):
    """QLoRA through TRL: over a quantised base SFTTrainer casts the trainable adapter to bf16 (the QLoRA paper's
    recipe); every method trains there, saves, and reloads onto a fresh 4-bit base with the trained logits."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv(KEY_ENV, "trl-owner-key-0123456789abcdef")
    save_quantisable_llama(tmp_path / "base")
    callbacks = [SubLoRACallback()] if method == "sublora" else []
    trainer, changed = train_save_reload(
        tmp_path,
        QUANTISED_CONFIGS[method](),
        callbacks=callbacks,
        base=lambda: quantised_base(tmp_path / "base", "nf4-fp32"),
        max_steps=8,
    )
    assert changed
    adapter = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    assert adapter == {torch.bfloat16}
