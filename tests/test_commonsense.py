"""The commonsense benchmark: the shipped data and its reader, option scoring, the paired interval, depth-scaled
learning rates and the resumable runner (the SmolLM2 run itself is in the slow tier at the end)."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from models import FAST_BF16, VOCAB, build
from peft import get_peft_model

from peft_ctrl import StateCtrlConfig, models
from peft_ctrl.optim import bridge_input_rms, depth_scaled_param_groups
from peft_ctrl_app import cli, job_commands, lm_bench
from peft_ctrl_app.commonsense import (
    DATA_DIR,
    TASKS,
    Item,
    in_words,
    read_items,
    shipped_file,
    split_validation,
    subset,
)
from peft_ctrl_app.tasks import STDLIB_MAX_TOKENS, STDLIB_SYSTEM, stdlib_items
from peft_ctrl_app.training import chat_example, prompt_ids

SIZES = {
    ("boolq", "train"): 9427,
    ("boolq", "test"): 3270,
    ("ARC-Easy", "train"): 2251,
    ("ARC-Easy", "test"): 2376,
    ("ARC-Challenge", "train"): 1119,
    ("ARC-Challenge", "test"): 1172,
    ("openbookqa", "train"): 4957,
    ("openbookqa", "test"): 500,
}


@pytest.mark.parametrize(("task", "split"), SIZES)
def test_the_shipped_splits_read_completely(task, split):
    items = read_items(shipped_file(task, split))
    assert len(items) == SIZES[(task, split)] and {it.task for it in items} == {task}
    assert all(it.answer in it.options and it.response(it.answer) == it.output for it in items)
    expected = ("true", "false") if task == "boolq" else None
    assert expected is None or all(it.options == expected for it in items)


def test_the_data_ships_with_its_sources_and_licences():
    readme = (DATA_DIR / "README.md").read_text()
    for words in ("LLM-Adapters", "Apache-2.0", "CC BY-SA 3.0", "CC BY-SA 4.0", *TASKS):
        assert words in readme


def write(path, items, gz=False):
    text = json.dumps(items)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def piqa(goal: str, answer: str) -> dict:
    return {
        "instruction": f"Please choose the correct solution to the question: {goal}\n\nSolution1: a\n\nSolution2: b"
        "\n\nAnswer format: solution1/solution2",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


def test_any_file_in_the_format_reads(tmp_path):
    """Other tasks of the suite (PIQA here), plain JSON or gzipped; the task name comes from the file name."""
    items = read_items(write(tmp_path / "piqa_test.json", [piqa("x", "solution2"), piqa("y", "solution1")]))
    assert [it.options for it in items] == [("solution1", "solution2")] * 2 and items[0].task == "piqa"
    gz = read_items(write(tmp_path / "piqa_train.json.gz", [piqa("x", "solution1")], gz=True))
    assert gz[0].answer == "solution1" and gz[0].task == "piqa"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([{"instruction": "no format line", "output": "the correct answer is a", "answer": "a"}], "Answer format"),
        ([piqa("x", "solution3")], "is not one of the options"),
        ([{**piqa("x", "solution1"), "output": "solution2 it is"}], "does not end with the answer"),
        ([{"instruction": 3}], "needs string fields"),
        ({"not": "a list"}, "non-empty JSON list"),
        ([], "non-empty JSON list"),
    ],
)
def test_bad_files_name_the_item_and_the_problem(tmp_path, content, message):
    with pytest.raises(ValueError, match=message):
        read_items(write(tmp_path / "bad.json", content))


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="not a JSON list"):
        read_items(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError):
        read_items(tmp_path / "absent.json")
    with pytest.raises(ValueError, match="Shipped commonsense files"):
        shipped_file("piqa", "train")


def test_items_in_words_answer_with_the_options_text(tmp_path):
    """ARC's ``Answer1: text`` options become the responses; BoolQ's words stay; the cloze form drops the list."""
    arc = read_items(shipped_file("ARC-Easy", "test"))[0]
    words = in_words(arc)
    assert words.options == (
        "Sunlight is the source of energy for nearly all ecosystems.",
        "Most ecosystems are found on land instead of in water.",
        "Carbon dioxide is more available than other gases.",
        "The producers in all ecosystems are plants.",
    )
    assert words.answer == words.output == words.options[0] and words.response(words.options[2]) == words.options[2]
    assert "Answer format" not in words.instruction and words.instruction.endswith("Answer4: " + words.options[3])
    cloze = in_words(arc, show_options=False)
    assert cloze.options == words.options and cloze.instruction == (
        "Please choose the correct answer to the question: Which statement best explains why photosynthesis is the "
        "foundation of most food webs?"
    )
    boolq = in_words(read_items(shipped_file("boolq", "test"))[0])
    assert boolq.options == ("true", "false") and boolq.output == boolq.answer == "false"
    assert "Answer format" not in boolq.instruction and boolq.instruction.startswith("Please answer")
    piqa_item = in_words(read_items(write(tmp_path / "piqa_test.json", [piqa("x", "solution2")]))[0])
    assert piqa_item.options == ("a", "b") and piqa_item.answer == "b"


def test_items_whose_options_cannot_be_told_apart_in_words():
    same = in_words(item(("answer1", "answer2"), "answer1", "q\n\nAnswer1: yes Answer2: yes"))
    assert same.output == "yes" and same.options == ("yes", "yes")  # it trains ...
    with pytest.raises(ValueError, match="two options are the same"):
        lm_bench.scored_item(WordTokenizer(), same)  # ... but cannot be scored
    with pytest.raises(ValueError, match="does not list the options"):
        in_words(item(("answer1", "answer2"), "answer1", "q with no listed options"))
    with pytest.raises(ValueError, match="has no text"):
        in_words(item(("answer1", "answer2"), "answer1", "q Answer1: Answer2: b"))
    for task in TASKS:  # every shipped test item has distinct option texts
        words = map(in_words, read_items(shipped_file(task, "test")))
        assert all(len(set(w.options)) == len(w.options) for w in words)
    obqa = [in_words(it) for it in read_items(shipped_file("openbookqa", "train"))]
    assert sum(len(set(w.options)) < len(w.options) for w in obqa) == 3


def test_validation_is_a_fixed_disjoint_part_of_train_and_subsets_are_fixed():
    items = read_items(shipped_file("ARC-Challenge", "train"))
    train, held = split_validation(items, 50)
    again_train, again_held = split_validation(list(reversed(items)), 50)
    assert len(held) == 50 and len(train) == len(items) - 50
    assert {it.instruction for it in held} == {it.instruction for it in again_held}
    assert not {it.instruction for it in held} & {it.instruction for it in train}
    assert [it.instruction for it in subset(items, 20)] == [it.instruction for it in subset(items, 20)]
    assert len(subset(items, None)) == len(items)


# ---------------------------------------------------------------- option scoring


class WordTokenizer:
    """A word-level tokenizer over the tiny models' vocabulary, with a chat template like SmolLM2's."""

    eos_token_id = 1
    pad_token_id = 0

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.words: dict[int, str] = {}

    def _id(self, word: str) -> int:
        token = self.ids.setdefault(word, 2 + len(self.ids) % (VOCAB - 2))
        self.words.setdefault(token, word)
        return token

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return " ".join(f"<{m['role']}> {m['content']}" for m in messages) + " <assistant>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self._id(w) for w in text.split()]}

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


def item(options: tuple[str, ...], answer: str, question: str = "which one") -> Item:
    return Item(
        "t", f"{question} Answer format: {'/'.join(options)}", f"the correct answer is {answer}", answer, options
    )


def brute_force_choice(model, tokenizer, it: Item, end_of_turn: bool = False) -> int:
    """The option whose whole response (then the end-of-turn token, with ``end_of_turn``) is most likely, one full
    pass per option."""
    prompt = prompt_ids(tokenizer, it.instruction, it.system)
    scores = []
    for option in it.options:
        response = tokenizer(it.response(option))["input_ids"] + ([tokenizer.eos_token_id] if end_of_turn else [])
        ids = torch.tensor([prompt + response])
        logp = model(input_ids=ids).logits.float().log_softmax(-1)[0, len(prompt) - 1 : -1]
        scores.append(logp.gather(1, torch.tensor(response)[:, None]).sum().item())
    return max(range(len(scores)), key=scores.__getitem__)


def test_single_token_options_share_one_pass_and_pick_the_most_likely_response():
    tokenizer, model = WordTokenizer(), build("llama").eval()
    items = [item(("answer1", "answer2", "answer3", "answer4"), "answer2", q) for q in ("a b", "c d e", "f")]
    items += [item(("true", "false"), "true", q) for q in ("g h", "i")]
    scored = [lm_bench.scored_item(tokenizer, it) for it in items]
    assert all(len(s.queries) == 1 for s in scored)  # one teacher-forced pass per question
    choices = lm_bench.option_choices(model, scored, tokenizer.pad_token_id, bf16=False, batch_size=2)
    assert choices == [brute_force_choice(model, tokenizer, it) for it in items]


def test_options_of_several_tokens_are_scored_by_their_whole_likelihood():
    tokenizer, model = WordTokenizer(), build("llama").eval()
    items = [item(("red_apple", "green_pear"), "red_apple", q) for q in ("a", "b c")]
    # "red apple" / "green pear": two tokens each, after the shared "the correct answer is"
    items = [
        Item(it.task, it.instruction, "the correct answer is red apple", "red apple", ("red apple", "green pear"))
        for it in items
    ]
    scored = [lm_bench.scored_item(tokenizer, it) for it in items]
    assert all(len(s.queries) == 2 for s in scored)
    choices = lm_bench.option_choices(model, scored, tokenizer.pad_token_id, bf16=False)
    assert choices == [brute_force_choice(model, tokenizer, it) for it in items]


def test_options_of_different_lengths_are_scored_through_the_end_of_turn_token():
    """The stdlib task's scoring: "files and OS" against "text" is decided by each whole answer and its end of turn,
    so a short option does not win for having fewer tokens to pay for."""
    tokenizer, model = WordTokenizer(), build("llama").eval()
    options = ("networking", "files and OS", "text")
    items = [Item("stdlib", q, "text", "text", options, STDLIB_SYSTEM) for q in ("a b", "c", "d e f", "g")]
    scored = [lm_bench.scored_item(tokenizer, it, end_of_turn=True) for it in items]
    assert all(len(s.queries) == 3 for s in scored)
    assert all(q.targets[i][-1] == tokenizer.eos_token_id for s in scored for q in s.queries for i in q.targets)
    choices = lm_bench.option_choices(model, scored, tokenizer.pad_token_id, bf16=False, batch_size=3)
    assert choices == [brute_force_choice(model, tokenizer, it, end_of_turn=True) for it in items]


# ---------------------------------------------------------------- the stdlib task


def test_the_stdlib_task_is_data_for_the_same_runner():
    tokenizer = WordTokenizer()
    items = stdlib_items("stdlib", "test", tokenizer)
    assert len(items) == 832 and all(it.system == STDLIB_SYSTEM and it.output == it.answer for it in items)
    assert items[0].options == ("networking", "files and OS", "numbers", "text", "concurrency", "dates and time")
    assert max(len(it.instruction.split()) for it in items) == STDLIB_MAX_TOKENS
    assert prompt_ids(tokenizer, "s", STDLIB_SYSTEM)[:1] == tokenizer("<system>")["input_ids"]
    args = lm_bench.BenchArgs.main_job("stdlib", eval_items=12, validation_items=5)
    data = lm_bench.load_data(tokenizer, args)
    assert list(data.evaluation) == ["stdlib"] and len(data.evaluation["stdlib"]) == 12
    assert len(data.train) + data.dropped_long == 3360 - 5
    with pytest.raises(ValueError, match="one subtask, 'stdlib'"):
        stdlib_items("stdlib", "validation", tokenizer)


def test_the_cloze_task_trains_and_scores_the_same_questions_in_words():
    """Validation and test subsets are picked before the items change form, so both tasks ask the same questions;
    the cloze form asks the question alone and scores each option's words through the end-of-turn token."""
    tokenizer = WordTokenizer()
    settings = {"split": "validation", "eval_items": 4, "validation_items": 6}
    letter = lm_bench.load_data(tokenizer, lm_bench.BenchArgs(**settings))
    words = lm_bench.load_data(tokenizer, lm_bench.BenchArgs(task="commonsense-cloze", **settings))
    assert len(words.train) + words.dropped_long == len(letter.train) + letter.dropped_long
    for task in TASKS:
        pairs = list(zip(letter.evaluation[task], words.evaluation[task], strict=True))
        assert len(pairs) == 4
        for as_label, as_words in ((a.item, b.item) for a, b in pairs):
            assert as_label.instruction.startswith(as_words.instruction)
            assert "Answer1:" not in as_words.instruction and "Answer format" not in as_words.instruction
            assert as_words.answer == as_words.options[as_label.options.index(as_label.answer)]
    arc = words.evaluation["ARC-Easy"][0]
    assert len(arc.queries) == len(arc.item.options)  # different first words: one pass per option
    assert all(t[-1] == tokenizer.eos_token_id for q in arc.queries for t in q.targets.values())


def test_each_task_has_its_main_job_and_learning_rates():
    stdlib = lm_bench.BenchArgs.main_job("stdlib")
    assert stdlib.methods == lm_bench.STDLIB_JOB and stdlib.seeds == (0, 1, 2) and stdlib.steps == 22
    assert stdlib.results_dir == "runs/stdlib" and stdlib.lr_of("state-ctrl-both") == 1e-3
    assert stdlib.lr_of("odelora") == lm_bench.METHODS["odelora"].lr
    assert lm_bench.BenchArgs(task="stdlib", lr={"dora": 5e-4}).lr_of("dora") == 5e-4
    commonsense = lm_bench.BenchArgs.main_job()
    assert commonsense.methods == lm_bench.MAIN_JOB and commonsense.seeds == (0,) and commonsense.steps == 60
    assert commonsense.lr_of("state-ctrl-mlp") == 1e-3 and commonsense.results_dir == "runs/commonsense"
    assert lm_bench.settings_of(stdlib, "dora")["task"] == "stdlib"  # a resumed run never mixes tasks
    with pytest.raises(ValueError, match="task must be one of"):
        lm_bench.BenchArgs(task="piqa")


# ---------------------------------------------------------------- paired difference


def record(method: str, seed: int, hits: dict[str, list[int]]) -> dict:
    return {"method": method, "seed": seed, "hits": hits}


def test_paired_difference_and_its_interval():
    ref = [record("a", s, {"x": [1, 0, 1, 0] * 25, "y": [1] * 100}) for s in (0, 1)]
    same = [record("b", s, {"x": [1, 0, 1, 0] * 25, "y": [1] * 100}) for s in (0, 1)]
    assert lm_bench.paired_difference(same, ref) == (0.0, 0.0, 0.0)
    better = [record("b", s, {"x": [1, 1, 1, 0] * 25, "y": [1] * 100}) for s in (0, 1)]
    diff, low, high = lm_bench.paired_difference(better, ref)
    assert diff == pytest.approx(12.5) and 0 < low < diff < high  # +25 points on x, 0 on y
    with pytest.raises(ValueError, match="share no seed"):
        lm_bench.paired_difference([record("b", 5, {"x": [1]})], ref)


# ---------------------------------------------------------------- depth-scaled learning rates


def test_depth_scaled_groups_divide_each_bridges_lr_by_the_rms_it_reads():
    model = get_peft_model(build("llama"), StateCtrlConfig.control_lora(r=4, lora_r=2))
    ids = torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    seen = {}
    for name, module in model.named_modules():
        if name.endswith("post_attention_layernorm"):
            module.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0].pow(2).mean().sqrt()))
    rms = bridge_input_rms(model, lambda: model(input_ids=ids))
    assert len(rms) == 2 and sorted(rms.values()) == pytest.approx(sorted(v.item() for v in seen.values()))
    groups = depth_scaled_param_groups(model, 1e-3, rms)
    for group in groups[:-1]:
        assert group["lr"] == pytest.approx(1e-3 / rms[group["bridge"]]) and len(group["params"]) == 2
    assert groups[-1]["lr"] == 1e-3 and len(groups[-1]["params"]) == 2 * 3 * 2  # the LoRA part: q, k, v x 2 layers
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="no state-ctrl bridges"):
        bridge_input_rms(build("llama"), lambda: None)


# ---------------------------------------------------------------- the runner


def test_the_runner_resumes_and_skips_finished_experiments(tmp_path, monkeypatch):
    ran = []

    def fake_train(method, seed, args, data, steps=None):
        ran.append((method, seed))
        return {"method": method, "seed": seed, "train_seconds": 1.0}

    monkeypatch.setattr(models, "load_smollm2", lambda: (None, None))
    monkeypatch.setattr(lm_bench, "load_data", lambda tok, args: lm_bench.BenchData([], {"t": []}, 0))
    monkeypatch.setattr(lm_bench, "train_and_score", fake_train)
    args = lm_bench.BenchArgs(methods=("lora-all", "state-ctrl-mlp"), seeds=(0, 1), results_dir=str(tmp_path))
    lm_bench.result_path(args, "state-ctrl-mlp", 0).parent.mkdir(parents=True)
    # a file written before tasks existed (no "task" in its settings) is a commonsense experiment
    settings = {k: v for k, v in lm_bench.settings_of(args, "state-ctrl-mlp").items() if k != "task"}
    done = {"method": "state-ctrl-mlp", "seed": 0, "settings": settings}
    lm_bench.result_path(args, "state-ctrl-mlp", 0).write_text(json.dumps(done))
    results = lm_bench.run_bench(args)
    assert results[1]["task"] == "commonsense"
    assert ran == [("lora-all", 0), ("lora-all", 1), ("state-ctrl-mlp", 1)]
    assert [(r["method"], r["seed"]) for r in results] == [
        ("lora-all", 0),
        ("state-ctrl-mlp", 0),
        ("lora-all", 1),
        ("state-ctrl-mlp", 1),
    ]
    ran.clear()
    lm_bench.run_bench(args)  # everything done: nothing runs again
    assert ran == []
    other = lm_bench.BenchArgs(methods=args.methods, seeds=args.seeds, steps=7, results_dir=str(tmp_path))
    with pytest.raises(ValueError, match="made with other settings"):
        lm_bench.run_bench(other)  # a result of other settings is never mixed in
    monkeypatch.delenv("PEFT_CTRL_SEAL_KEY", raising=False)
    with pytest.raises(ValueError, match="PEFT_CTRL_SEAL_KEY"):
        lm_bench.run_bench(lm_bench.BenchArgs(methods=("seal-qkv",), results_dir=str(tmp_path)))


def tiny_data(tokenizer: WordTokenizer) -> lm_bench.BenchData:
    questions = [f"q{i} w{i % 3} x{i % 5}" for i in range(24)]
    items = [item(("answer1", "answer2"), f"answer{1 + i % 2}", q) for i, q in enumerate(questions)]
    train = [chat_example(tokenizer, it) for it in items[:16]]
    return lm_bench.BenchData(train, {"t": [lm_bench.scored_item(tokenizer, it) for it in items[16:]]}, 0)


@pytest.mark.parametrize("method", [m for m in lm_bench.METHODS if m != "base"])
def test_every_row_trains_scores_and_reports_on_a_tiny_llama(method, monkeypatch, tmp_path):
    """Every row of the comparison (AdaLoRA's allocator, SubLoRA's, ODELoRA's closure steps included) runs its
    loop, changes its adapter and returns a complete record."""
    monkeypatch.setenv("PEFT_CTRL_SEAL_KEY", "bench-test-key-0123456789")
    tokenizer = WordTokenizer()
    data = tiny_data(tokenizer)
    args = lm_bench.BenchArgs(methods=(method,), steps=10, batch_size=4, bf16=False, save_adapters=str(tmp_path))
    out = lm_bench.train_and_score(method, 0, args, data, load=lambda: (build("llama"), tokenizer), steps=10)
    assert out["optimizer_steps"] == 10 and len(out["losses"]) == 10 and all(v == v for v in out["losses"])
    assert out["saved_activation_bytes"] > 0 and out["adapter_bytes"] > 0 and out["trainable_params"] > 0
    assert len(out["hits"]["t"]) == 8 and 0 <= out["accuracy"]["t"] <= 1
    assert (tmp_path / method / "seed0" / "adapter_config.json").is_file()


def test_the_base_row_and_the_learning_curve(tmp_path):
    tokenizer = WordTokenizer()
    data = tiny_data(tokenizer)
    args = lm_bench.BenchArgs(steps=6, batch_size=4, bf16=False, eval_every=2)
    base = lm_bench.score_base(args, data, load=lambda: (build("llama"), tokenizer))
    assert base["kind"] == "none" and base["trainable_params"] == 0 and len(base["hits"]["t"]) == 8
    out = lm_bench.train_and_score("lora-qkv", 0, args, data, load=lambda: (build("llama"), tokenizer))
    assert [point["step"] for point in out["curve"]] == [2, 4, 6] and out["curve"][-1]["accuracy"] == out["accuracy"]
    table = lm_bench.summary_table([base | {"final_loss": 0.0}, {**out, "method": "lora-all"}])
    assert "SmolLM2 without fine-tuning | 0 |" in table and "reference" in table


def test_the_same_time_row_takes_its_steps_from_the_measured_step_times(tmp_path):
    args = lm_bench.BenchArgs(methods=("state-ctrl-mlp-same-time",), steps=80, results_dir=str(tmp_path))
    with pytest.raises(ValueError, match="run both at seed 0 first"):
        lm_bench.same_time_steps(args, "state-ctrl-mlp-same-time", 0)
    for method, seconds in (("lora-all", 2.0), ("state-ctrl-mlp", 1.1)):
        lm_bench.result_path(args, method, 0).parent.mkdir(parents=True, exist_ok=True)
        lm_bench.result_path(args, method, 0).write_text(json.dumps({"step_seconds": seconds}))
    assert lm_bench.same_time_steps(args, "state-ctrl-mlp-same-time", 0) == round(80 * 2.0 / 1.1)
    assert lm_bench.same_time_steps(args, "state-ctrl-mlp", 0) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"methods": ()}, "methods is empty"),
        ({"methods": ("lora",)}, "method must be one of"),
        ({"lr": {"lora-all": -1.0}}, "lr"),
        ({"split": "dev"}, "split must be one of"),
        ({"eval_items": 0}, "eval_items must be an integer >= 1"),
        ({"seeds": ()}, "at least one seed"),
    ],
)
def test_bad_bench_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lm_bench.BenchArgs(**kwargs)


@pytest.mark.slow
def test_one_experiment_on_the_real_smollm2(tmp_path):
    """Two steps of state-ctrl on SmolLM2, scored on 4 items per task: every record field, and every shipped task
    is scored in one pass per question."""
    try:
        models.smollm2_gguf()
    except ImportError as err:
        pytest.skip(str(err))
    _, tokenizer = models.load_smollm2()
    fast_bf16 = FAST_BF16  # bf16 only where the CPU multiplies it natively (tests/models.py)
    args = lm_bench.BenchArgs(
        methods=("state-ctrl-mlp",), seeds=(0,), steps=2, eval_items=4, split="validation", bf16=fast_bf16
    )
    data = lm_bench.load_data(tokenizer, args)
    assert all(len(s.queries) == 1 for items in data.evaluation.values() for s in items)
    args.save_adapters = str(tmp_path / "adapters")
    out = lm_bench.train_and_score("state-ctrl-mlp", 0, args, data)
    assert set(out["accuracy"]) == set(TASKS) and all(len(h) == 4 for h in out["hits"].values())
    assert out["saved_activation_bytes"] > 0 and out["adapter_bytes"] > 4 * out["trainable_params"]
    assert (tmp_path / "adapters" / "state-ctrl-mlp" / "seed0" / "adapter_config.json").is_file()
    scored = lm_bench.score_adapters(tmp_path / "adapters", [shipped_file("openbookqa", "test")], bf16=fast_bf16)
    assert len(scored) == 1 and 0 <= scored[0]["accuracy"]["openbookqa"] <= 1


# ---------------------------------------------------------------- report and command line


def fake_record(method: str, seed: int, hits: list[int], saved: int, step: float) -> dict:
    return {
        "method": method,
        "label": lm_bench.METHODS[method].label,
        "kind": lm_bench.METHODS[method].kind,
        "seed": seed,
        "task": "stdlib",
        "lr": 1e-3,
        "trainable_params": 10,
        "adapter_bytes": 1000,
        "saved_activation_bytes": saved,
        "step_seconds": step,
        "train_seconds": 30.0,
        "losses": [0.5, 0.4],
        "accuracy": {"stdlib": sum(hits) / len(hits)},
        "option_nll": {"stdlib": 1.0},
        "hits": {"stdlib": hits},
        "steps": 22,
        "batch_size": 8,
        "split": "test",
        "eval_items": 4,
        "machine": "test",
        "date": "2026-12-04",
    }


def test_the_report_files_carry_the_task_and_the_ratios(tmp_path):
    pytest.importorskip("matplotlib")
    results = [fake_record("lora-all", seed, [1, 0, 1, 0], 1000, 2.0 + seed) for seed in (0, 1)] + [
        fake_record("state-ctrl-mlp", seed, [1, 1, 1, 0], 400, 1.0 + seed) for seed in (0, 1)
    ]
    rows = {r["method"]: r for r in lm_bench.summary_rows(results)}
    assert rows["state-ctrl-mlp"]["bytes_x_ref"] == pytest.approx(0.4)
    assert rows["state-ctrl-mlp"]["time_x_ref"] == pytest.approx(1.5 / 2.5)
    assert rows["state-ctrl-mlp"]["difference"]["points"] == pytest.approx(25.0)
    written = lm_bench.write_report(results, tmp_path, "finetune_stdlib", "peft-ctrl finetune --task stdlib")
    assert sorted(p.name for p in written) == ["finetune_stdlib.json", "finetune_stdlib.md", "finetune_stdlib.png"]
    markdown = (tmp_path / "finetune_stdlib.md").read_text()
    assert "SmolLM2-135M-Instruct, stdlib topics as chat, 22 steps" in markdown
    assert "| state-ctrl mlp | 0.00M | 75.0 | 75.0 ± 0.0 (2 seeds) | +25.0 [" in markdown


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--blocks", "mlp"], "--blocks applies to --model minilm / tiny-llama only"),
        (["--task", "stdlib", "--methods", "seal"], "method must be one of 'base', 'lora-all'"),
        (["--lr-lora", "1e-3"], "--lr-lora applies to --model minilm / tiny-llama only (SmolLM2 rows: `peft-ctrl"),
        (["--task", "stdlib", "--rank-lora", "4"], "--rank-lora applies to --model minilm / tiny-llama only"),
        (["--model", "minilm", "--task", "stdlib"], "--task applies to --model smollm2 only"),
        (["--model", "minilm", "--results-dir", "x"], "--results-dir applies to --model smollm2 only"),
        (["--model", "minilm", "--methods", "dora"], "method must be one of 'state-ctrl', 'lora', 'seal'"),
        (["--quick", "--steps", "0"], "--steps: must be an integer >= 1"),
    ],
)
def test_finetune_flags_are_checked_before_anything_runs(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["finetune", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_flags_left_out_keep_each_jobs_defaults():
    parser = cli.Parser(prog="peft-ctrl")
    sub = parser.add_subparsers(dest="command")
    job_commands.finetune_parser(sub, cli.COMMANDS["finetune"])
    job_commands.bench_parser(sub, cli.COMMANDS["bench"])
    stdlib = job_commands._finetune_settings(parser.parse_args(["finetune", "--task", "stdlib", "--seeds", "4"]))
    assert stdlib.task == "stdlib" and stdlib.seeds == (4,) and stdlib.steps == 22
    assert stdlib.methods == lm_bench.STDLIB_JOB and stdlib.save_adapters == "runs/stdlib/adapters"
    quick = job_commands._finetune_settings(
        parser.parse_args(["finetune", "--task", "stdlib", "--quick", "--no-save"])
    )
    assert quick.steps == 20 and quick.eval_items == 30 and quick.save_adapters is None
    assert quick.results_dir == "runs/finetune/stdlib-quick" and quick.seeds == (0,)
    minilm = job_commands._finetune_settings(parser.parse_args(["finetune", "--model", "minilm", "--methods", "lora"]))
    assert minilm.model == "minilm" and minilm.methods == ("lora",) and minilm.steps == 200
    commonsense = job_commands._finetune_settings(parser.parse_args(["finetune", "--steps", "7"]))
    assert commonsense.task == "commonsense-cloze" and commonsense.steps == 7  # the README's main job
    assert commonsense.methods == lm_bench.MAIN_JOB and commonsense.seeds == (0,)
    assert commonsense.results_dir == "runs/commonsense-cloze"  # = the bench's, so each resumes from the other
    labels = job_commands._finetune_settings(parser.parse_args(["finetune", "--task", "commonsense"]))
    assert labels.task == "commonsense" and labels.results_dir == "runs/commonsense" and labels.bf16
    assert not job_commands._finetune_settings(parser.parse_args(["finetune", "--no-bf16"])).bf16
    with pytest.raises(ValueError, match="--no-bf16 applies to --model smollm2 only"):
        job_commands._finetune_settings(parser.parse_args(["finetune", "--model", "minilm", "--no-bf16"]))
    bench = job_commands._bench_settings(parser.parse_args(["bench", "stdlib", "--lr", "dora=5e-4"]))
    assert bench.task == "stdlib" and bench.steps == 22 and bench.methods == lm_bench.STDLIB_JOB
    assert bench.lr_of("dora") == 5e-4 and bench.results_dir == "runs/stdlib"
    headline = job_commands._bench_settings(parser.parse_args(["bench", "commonsense"]))
    assert headline.methods == lm_bench.HEADLINE and headline.steps == 60
    cloze = job_commands._bench_settings(parser.parse_args(["bench", "commonsense-cloze", "--seeds", "0"]))
    assert cloze.task == "commonsense-cloze" and cloze.results_dir == "runs/commonsense-cloze"
    assert cloze.methods == lm_bench.CLOZE_HEADLINE and cloze.steps == 60 and cloze.seeds == (0,)
    for task in lm_bench.TASKS:  # every task has its bench command and default rows
        assert job_commands._bench_settings(parser.parse_args(["bench", task])).task == task
