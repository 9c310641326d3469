"""State-ctrl and Control+LoRA out of the box on model families with different block shapes.

    python examples/state_ctrl_any_family.py    # about ten seconds

Tiny random models (no download) of a sandwich-norm decoder (Gemma2), an MoE decoder (Mixtral), a
parallel-residual decoder (Falcon), a post-norm encoder (DistilBERT) and an encoder-decoder (T5). For each,
`get_peft_model(model, StateCtrlConfig(...))` finds the bridges with one probe forward; the script prints them,
trains a few steps and checks that the adapter was trained and generation (where the model generates) works.
"""

import sys
from pathlib import Path

import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import tiny  # noqa: E402 - the tiny-model builder of the test suite

from peft_ctrl import StateCtrlConfig  # noqa: E402
from peft_ctrl.state_ctrl import StateCtrlLayer, find_bridges  # noqa: E402

FAMILIES = ["gemma2", "mixtral", "falcon", "distilbert", "t5"]


def output(model, batch):
    out = model(**batch)
    return out.logits


def main() -> None:
    for family in FAMILIES:
        base, batch = tiny(family)
        print(f"\n{family} ({type(base).__name__})")
        for block, subs in find_bridges(base).items():
            for s in subs:
                print(f"  {block}: {s.kind:5s} {s.form:9s} {s.head} -> {s.tail} (width {s.width})")
        for name, config in (
            ("state-ctrl both", StateCtrlConfig(r=8, blocks="both")),
            ("Control+LoRA", StateCtrlConfig.control_lora(r=8, lora_r=4)),
        ):
            model = get_peft_model(tiny(family)[0], config)
            model.train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            losses = []
            for _ in range(10):
                loss = output(model, batch).float().pow(2).mean()  # a toy target: shrink the outputs
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
            bridges = sum(isinstance(m, StateCtrlLayer) for m in model.modules())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"  {name}: {bridges} bridges, {trainable:,} trainable, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
            assert losses[-1] < losses[0]
        if model.can_generate():
            model.eval()
            prompt = {k: v[:1] for k, v in batch.items() if k != "decoder_input_ids"}
            tokens = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
            print("  generate:", tokens[0].tolist())


if __name__ == "__main__":
    main()
