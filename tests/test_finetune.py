"""The main job's pieces: task, batching, atomic adapter saving, the CLI end to end (tiny model)."""

import json

import pytest
import torch

from peft_ctrl.atomic import atomic_directory
from peft_ctrl_app import cli
from peft_ctrl_app.datasets import _sentences, stdlib_topics
from peft_ctrl_app.finetune import FinetuneArgs, examples


@pytest.fixture(scope="module")
def task():
    return stdlib_topics()


def test_stdlib_topics_is_a_real_labelled_split(task):
    train, test = task
    assert len(train) > 1000 and len(test) > 200
    assert set(train.labels) == set(test.labels) == set(range(len(train.label_names)))
    assert not set(train.texts) & set(test.texts)
    # The documented module's own name is masked, so the label is not written in the sentence.
    assert _sentences("The Asyncio tasks module runs tasks for asyncio users.", "asyncio.tasks") == [
        "The [MOD] [MOD] module runs [MOD] for [MOD] users."
    ]


def test_examples_are_cut_to_their_own_tokens():
    """Each Trainer example keeps its sentence's tokens only; the collator pads a batch to its longest one."""
    data = {
        "input_ids": torch.arange(20).reshape(2, 10),
        "attention_mask": torch.tensor([[1] * 4 + [0] * 6, [1] * 6 + [0] * 4]),
        "labels": torch.tensor([0, 1]),
    }
    out = examples(data)
    assert [len(e["input_ids"]) for e in out] == [4, 6] and [e["labels"] for e in out] == [0, 1]
    assert out[1]["input_ids"].tolist() == list(range(10, 16)) and out[0]["attention_mask"].tolist() == [1] * 4


class _Saver:
    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def save_pretrained(self, path):
        (path / "adapter_config.json").write_text("{}")
        if self.fail:
            raise OSError("disk full")
        (path / "adapter_model.safetensors").write_text("weights")


def save(saver: _Saver, target) -> None:
    with atomic_directory(target) as folder:
        saver.save_pretrained(folder)


def test_atomic_directory_is_all_or_nothing(tmp_path):
    target = tmp_path / "adapter"
    save(_Saver(fail=False), target)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    (target / "adapter_model.safetensors").write_text("old weights")
    with pytest.raises(OSError, match="disk full"):
        save(_Saver(fail=True), target)
    assert (target / "adapter_model.safetensors").read_text() == "old weights"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left behind


@pytest.mark.parametrize(
    "kwargs", [{"model": "gpt-9"}, {"methods": ("dora",)}, {"steps": 0}, {"seeds": ()}, {"max_length": 4}]
)
def test_bad_finetune_arguments(kwargs):
    with pytest.raises(ValueError):
        FinetuneArgs(**kwargs)


def test_cli_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["finetune", "--steps", "0"])
    assert exit_info.value.code == 2 and "steps" in capsys.readouterr().err


def test_cli_finetune_end_to_end_on_the_tiny_llama(tmp_path, capsys):
    cli.main(
        [
            "finetune",
            "--model",
            "tiny-llama",
            "--steps",
            "3",
            "--seeds",
            "0",
            "--batch-size",
            "8",
            "--output-dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert "| state-ctrl |" in out and "| lora |" in out
    results = json.loads((tmp_path / "tiny-llama" / "results.json").read_text())
    assert {r["method"] for r in results["runs"]} == {"state-ctrl", "lora"}
    assert all(0 <= r["accuracy"] <= 1 and r["saved_activation_bytes"] > 0 for r in results["runs"])
    config = json.loads((tmp_path / "tiny-llama" / "state-ctrl" / "seed0" / "adapter_config.json").read_text())
    assert config["peft_type"] == "STATE_CTRL"
