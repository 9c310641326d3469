"""SEAL under transformers.Trainer, then release and verification: no written file holds the key or a passport."""

import os

import torch
from models import Pattern, build
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from peft_ctrl import SealConfig
from peft_ctrl.seal.keys import KEY_ENV, passport
from peft_ctrl.seal.verify import Suspect, verify_owner
from peft_ctrl_app.cli import main as cli

KEY = "trainer-owner-key-0123456789abcdef"


def secrets_of(schedule: str, modules: list[str], r: int) -> dict[str, bytes]:
    """Byte patterns that must never be written: the key (raw and hex) and every passport as stored tensors."""
    found = {"key": KEY.encode(), "key hex": KEY.encode().hex().encode()}
    for module in modules:
        C = passport(KEY.encode(), schedule, module, r)
        found[f"passport {module} fp64"] = C.numpy().tobytes()
        found[f"passport {module} fp32"] = C.float().numpy().tobytes()
        found[f"passport {module} first row fp32"] = C[0].float().numpy().tobytes()
        found[f"passport {module} transposed fp32"] = C.T.contiguous().float().numpy().tobytes()
    return found


def leaks(root, patterns: dict[str, bytes]) -> list[str]:
    found = []
    for d, _, files in os.walk(root):
        for f in files:
            data = open(os.path.join(d, f), "rb").read()
            found += [f"{name} in {f}" for name, pattern in patterns.items() if pattern in data]
    return found


def test_trainer_release_verify_write_no_secret(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, KEY)
    # 2 layers x 3 modules x r 16 = 96 passport columns: enough for an owner verdict at p < 2^-64
    model = get_peft_model(build("llama"), SealConfig(r=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    modules = [n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "seal_passport")]
    args = TrainingArguments(
        output_dir=str(tmp_path / "train"),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_steps=6,
        logging_steps=1,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Pattern())
    losses = [log["loss"] for log in (trainer.train() and trainer.state.log_history) if "loss" in log]
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "adapter")
    proof = tmp_path / "private" / "proof.safetensors"
    assert cli(["seal", "release", str(tmp_path / "adapter"), str(tmp_path / "release"), "--proof", str(proof)]) == 0
    digest = next(line for line in capsys.readouterr().out.splitlines() if "claim digest" in line).split()[-1]
    assert cli(["seal", "verify", str(tmp_path / "release"), "--proof", str(proof), "--published", digest]) == 0
    assert verify_owner(Suspect.from_adapter(tmp_path / "release"), proof, digest).verified
    log = capsys.readouterr()

    schedule = model.peft_config["default"].schedule
    patterns = secrets_of(schedule, modules, 16)
    assert sum(len(files) for _, _, files in os.walk(tmp_path)) > 10
    assert leaks(tmp_path, patterns) == []
    for name in ("key", "key hex"):
        assert patterns[name].decode() not in log.out + log.err

    # The scan itself finds a passport saved the way torch saves tensors.
    control = tmp_path.parent / f"{tmp_path.name}-control"
    control.mkdir()
    torch.save({"c": passport(KEY.encode(), schedule, modules[0], 16).float()}, control / "leak.pt")
    assert leaks(control, patterns) == [
        f"passport {modules[0]} fp32 in leak.pt",
        f"passport {modules[0]} first row fp32 in leak.pt",
    ]
