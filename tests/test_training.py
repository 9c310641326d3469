"""The shared causal-LM training pieces (peft_ctrl_app.training) on a tiny LLaMA: batches, the answer-only loss, the
one-pass greedy score and the learning-rate schedule."""

import torch
import torch.nn.functional as F
from models import VOCAB, build

from peft_ctrl_app.training import (
    ChatExample,
    answer_logits,
    answer_loss,
    balanced_subset,
    collate,
    greedy_hits,
    length_bucketed_batches,
)

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


def test_length_bucketed_batches_are_fixed_per_seed_and_group_similar_lengths():
    lengths = torch.arange(400) % 37
    batches = length_bucketed_batches(lengths, 8, 30, seed=3)
    assert len(batches) == 30 and all(len(b) == 8 for b in batches)
    again = length_bucketed_batches(lengths, 8, 30, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    spread = [int(lengths[b].max() - lengths[b].min()) for b in batches]
    assert max(spread) < 10  # sorted pools: a batch holds similar lengths, not the whole 0..36 range
