"""The SmolLM2 main job's pieces on a tiny LLaMA: batches, the answer-only loss, the one-pass greedy score, settings,
flags and the report. The job itself on the real model is in test_smollm2.py (slow tier)."""

import json

import pytest
import torch
import torch.nn.functional as F
from models import VOCAB, build

from peft_ctrl import cli
from peft_ctrl.chat_finetune import (
    CHAT_METHODS,
    ChatExample,
    ChatFinetuneArgs,
    answer_logits,
    answer_loss,
    balanced_subset,
    collate,
    greedy_hits,
    peft_config,
    summary_rows,
    write_report,
)
from peft_ctrl.lm_bench import BenchArgs

PAD = 0


def example(prompt: list[int], answer: list[int], text: str = "s", label: str = "a") -> ChatExample:
    return ChatExample(sentence=text, answer=label, prompt_ids=prompt, answer_ids=answer)


def test_collate_left_pads_and_aligns_answers_at_the_end():
    batch = collate([example([5, 6, 7], [8, 9]), example([5], [10, 11, 12])], PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [0, 5, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]
    assert batch["targets"].tolist() == [[-100, 8, 9], [10, 11, 12]]
    prompts = collate([example([5, 6, 7], [8, 9]), example([5], [10])], PAD, with_answers=False)
    assert prompts["input_ids"].tolist() == [[5, 6, 7], [0, 0, 5]] and "targets" not in prompts


def test_answer_loss_is_the_full_model_loss_on_the_answer_tokens():
    """logits_to_keep (only the answer positions get vocabulary logits) gives the loss of the full computation."""
    model = build("llama")
    batch = collate([example([5, 6, 7, 3], [8, 9]), example([5, 4], [10, 11, 12])], PAD)
    full = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).logits
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -3:] = batch["targets"]
    expected = F.cross_entropy(full[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(answer_loss(model, batch), expected)
    assert answer_logits(model, batch).shape == (2, 3, VOCAB)


def test_left_padding_with_position_ids_gives_each_row_its_unpadded_logits():
    model = build("llama")
    rows = [example([5, 6, 7, 3], [8, 9]), example([5, 4], [10, 11, 12])]
    batched = answer_logits(model, collate(rows, PAD))
    for i, row in enumerate(rows):
        alone = answer_logits(model, collate([row], PAD))
        k = len(row.answer_ids)
        torch.testing.assert_close(batched[i, -k:], alone[0], atol=1e-5, rtol=1e-4)


def test_one_pass_score_agrees_with_generate():
    """The reference answer is the model's own greedy continuation (hit) or one token off it (miss), for prompts
    of different lengths in one batch: greedy_hits must say exactly which, as generate + exact match does."""
    model = build("llama").eval()
    g = torch.Generator().manual_seed(0)
    examples, expected = [], []
    for i in range(12):
        prompt = torch.randint(2, VOCAB, (3 + i % 5,), generator=g).tolist()
        out = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=3, do_sample=False, pad_token_id=PAD, eos_token_id=None
        )
        continuation = out[0, len(prompt) :].tolist()
        hit = i % 2 == 0
        if not hit:
            continuation[i % 3] = 2 + (continuation[i % 3] - 1) % (VOCAB - 2)  # any other token
        examples.append(example(prompt, continuation))
        expected.append(hit)
    assert greedy_hits(model, examples, PAD, batch_size=5) == expected


def test_balanced_subset_is_balanced_and_the_same_every_time():
    examples = [example([1], [2], text=f"sentence {i}", label="ab"[i % 3 == 0]) for i in range(30)]
    subset = balanced_subset(examples, 4)
    assert [e.answer for e in subset] == ["b"] * 4 + ["a"] * 4
    # The pick depends on the sentences only, not on their order.
    shuffled = balanced_subset(list(reversed(examples)), 4)
    assert {e.sentence for e in shuffled} == {e.sentence for e in subset}


def test_every_method_builds_its_adapter():
    args = ChatFinetuneArgs()
    assert set(CHAT_METHODS) == {
        "state-ctrl-mlp",
        "state-ctrl-both",
        "lora-qv",
        "lora-all",
        "dora",
        "lora-all-ckpt",
        "state-ctrl-mlp-ckpt",
    }
    assert peft_config("state-ctrl-both", args).r == args.rank_state_ctrl // 2
    assert peft_config("state-ctrl-mlp-ckpt", args).blocks == "mlp"
    assert peft_config("dora", args).use_dora and not peft_config("lora-all", args).use_dora
    assert set(peft_config("lora-qv", args).target_modules) == {"q_proj", "v_proj"}
    assert len(peft_config("lora-all-ckpt", args).target_modules) == 7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"methods": ("gpt",)}, "method must be one of"),
        ({"methods": ()}, "methods is empty"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"seeds": ()}, "at least one seed"),
        ({"rank_state_ctrl": 1}, "rank_state_ctrl"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lr": {"lora": 1e-3}}, "needs a learning rate for 'state-ctrl'"),
        ({"lr": {"lora": 1e-3, "state-ctrl": -1.0}}, "finite number > 0"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChatFinetuneArgs(**kwargs)


def test_quick_settings():
    quick = ChatFinetuneArgs.quick(methods=("lora-all",))
    assert quick.seeds == (0,) and quick.steps < ChatFinetuneArgs().steps and quick.methods == ("lora-all",)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--blocks", "mlp"], "--blocks applies to --model minilm / tiny-llama only"),
        (["--model", "minilm", "--eval-per-class", "3"], "--eval-per-class applies to --model smollm2 only"),
        (["--task", "stdlib", "--methods", "seal"], "method must be one of 'state-ctrl-mlp'"),
        (["--methods", "seal"], "method must be one of 'base', 'lora-all'"),
        (["--lr-lora", "1e-3"], "--lr-lora applies to --task stdlib only"),
        (["--model", "minilm", "--task", "stdlib"], "--task applies to --model smollm2 only"),
        (["--model", "minilm", "--methods", "dora"], "method must be one of 'state-ctrl', 'lora', 'seal'"),
        (["--quick", "--steps", "0"], "--steps: must be an integer >= 1"),
    ],
)
def test_finetune_flags_are_checked_before_anything_runs(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["finetune", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_flags_left_out_keep_each_models_defaults():
    parser = cli.Parser(prog="peft-ctrl")
    cli._finetune_parser(parser.add_subparsers(dest="command"))
    chat = cli._finetune_settings(parser.parse_args(["finetune", "--task", "stdlib", "--lr-lora", "3e-4", "--quick"]))
    assert isinstance(chat, ChatFinetuneArgs) and chat.lr["lora"] == 3e-4 and chat.seeds == (0,)
    assert chat.lr["state-ctrl"] == ChatFinetuneArgs().lr["state-ctrl"]
    minilm = cli._finetune_settings(parser.parse_args(["finetune", "--model", "minilm", "--methods", "lora"]))
    assert minilm.model == "minilm" and minilm.methods == ("lora",) and minilm.steps == 200
    commonsense = cli._finetune_settings(parser.parse_args(["finetune", "--steps", "7"]))
    assert isinstance(commonsense, BenchArgs) and commonsense.steps == 7
    assert commonsense.methods == BenchArgs.main_job().methods and commonsense.seeds == (0,)
    quick = cli._finetune_settings(parser.parse_args(["finetune", "--quick", "--no-save"]))
    assert quick.steps == 20 and quick.save_adapters is None


def fake_report() -> dict:
    runs = []
    for seed in (0, 1):
        for method, acc, saved, step in [("lora-all", 0.5, 1000, 2.0), ("state-ctrl-mlp", 0.6, 400, 1.0)]:
            runs.append(
                {
                    "method": method,
                    "seed": seed,
                    "trainable_params": 10,
                    "accuracy": acc + 0.1 * seed,
                    "saved_activation_bytes": saved,
                    "measured_tokens": 64,
                    "step_seconds": step * (1 + seed),
                    "final_loss": 0.1,
                    "answers": ["numbers", "text | x"],
                    "shown_hits": [True, False],
                }
            )
    return {
        "command": "peft-ctrl finetune",
        "args": {"steps": 3, "batch_size": 2, "seeds": [0, 1]},
        "machine": "test",
        "date": "2026-12-02",
        "wall_seconds": 60.0,
        "task": {"train": 10, "test": 4, "system": "?"},
        "shown": [{"sentence": "a", "reference": "numbers"}, {"sentence": "b", "reference": "text"}],
        "before": {"accuracy": 0.0, "answers": ["The", "The"]},
        "runs": runs,
        "generate_disagreements": [],
    }


def test_summary_ratios_are_against_lora_all_linear_in_the_same_run():
    rows = {r["method"]: r for r in summary_rows(fake_report())}
    assert rows["state-ctrl-mlp"]["bytes_x_lora"] == pytest.approx(0.4)
    assert rows["state-ctrl-mlp"]["time_x_lora"] == pytest.approx(0.5)
    assert rows["state-ctrl-mlp"]["accuracy_mean"] == pytest.approx(65.0)
    assert "time_x_lora_ckpt" not in rows["lora-all"]  # its reference did not run


def test_report_files(tmp_path):
    pytest.importorskip("matplotlib")
    written = write_report(fake_report(), tmp_path)
    assert sorted(p.name for p in written) == ["finetune_smollm2.json", "finetune_smollm2.md", "finetune_smollm2.png"]
    markdown = (tmp_path / "finetune_smollm2.md").read_text()
    assert "| state-ctrl mlp | 10 | 65.0 ± 7.1 (60.0, 70.0) | 0.0 |" in markdown
    assert "text \\| x" in markdown  # a | in a generated answer does not break the table
    assert json.loads((tmp_path / "finetune_smollm2.json").read_text())["runs"][0]["method"] == "lora-all"
