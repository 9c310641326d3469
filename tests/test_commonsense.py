"""The commonsense benchmark: the shipped data and its reader, option scoring, the paired interval, depth-scaled
learning rates and the resumable runner (the SmolLM2 run itself is in the slow tier at the end)."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from models import VOCAB, build
from peft import get_peft_model

from peft_ctrl import StateCtrlConfig, lm_bench, models
from peft_ctrl.commonsense import DATA_DIR, TASKS, Item, read_items, shipped_file, split_validation, subset
from peft_ctrl.optim import bridge_input_rms, depth_scaled_param_groups

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

    def _id(self, word: str) -> int:
        return self.ids.setdefault(word, 2 + len(self.ids) % (VOCAB - 2))

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "<user> " + messages[0]["content"] + " <assistant>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self._id(w) for w in text.split()]}


def item(options: tuple[str, ...], answer: str, question: str = "which one") -> Item:
    return Item(
        "t", f"{question} Answer format: {'/'.join(options)}", f"the correct answer is {answer}", answer, options
    )


def brute_force_choice(model, tokenizer, it: Item) -> int:
    """The option whose whole response is most likely, one full pass per option."""
    prompt = lm_bench.prompt_ids(tokenizer, it.instruction)
    scores = []
    for option in it.options:
        response = tokenizer(it.response(option))["input_ids"]
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
    monkeypatch.setattr(lm_bench, "load_data", lambda tok, args: lm_bench.CommonsenseData([], {"t": []}, 0))
    monkeypatch.setattr(lm_bench, "train_and_score", fake_train)
    args = lm_bench.BenchArgs(methods=("lora-all", "state-ctrl-mlp"), seeds=(0, 1), results_dir=str(tmp_path))
    lm_bench.result_path(args, "state-ctrl-mlp", 0).parent.mkdir(parents=True)
    done = {"method": "state-ctrl-mlp", "seed": 0, "settings": lm_bench.settings_of(args, "state-ctrl-mlp")}
    lm_bench.result_path(args, "state-ctrl-mlp", 0).write_text(json.dumps(done))
    results = lm_bench.run_bench(args)
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


def tiny_data(tokenizer: WordTokenizer) -> lm_bench.CommonsenseData:
    questions = [f"q{i} w{i % 3} x{i % 5}" for i in range(24)]
    items = [item(("answer1", "answer2"), f"answer{1 + i % 2}", q) for i, q in enumerate(questions)]
    train = [lm_bench.train_example(tokenizer, it) for it in items[:16]]
    return lm_bench.CommonsenseData(train, {"t": [lm_bench.scored_item(tokenizer, it) for it in items[16:]]}, 0)


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
    args = lm_bench.BenchArgs(methods=("state-ctrl-mlp",), seeds=(0,), steps=2, eval_items=4, split="validation")
    data = lm_bench.load_data(tokenizer, args)
    assert all(len(s.queries) == 1 for items in data.evaluation.values() for s in items)
    args.save_adapters = str(tmp_path / "adapters")
    out = lm_bench.train_and_score("state-ctrl-mlp", 0, args, data)
    assert set(out["accuracy"]) == set(TASKS) and all(len(h) == 4 for h in out["hits"].values())
    assert out["saved_activation_bytes"] > 0 and out["adapter_bytes"] > 4 * out["trainable_params"]
    assert (tmp_path / "adapters" / "state-ctrl-mlp" / "seed0" / "adapter_config.json").is_file()
    scored = lm_bench.score_adapters(tmp_path / "adapters", [shipped_file("openbookqa", "test")])
    assert len(scored) == 1 and 0 <= scored[0]["accuracy"]["openbookqa"] <= 1
