"""State-ctrl on a small LLaMA (random init, built from a config): train, save, reload, generate.

    python examples/state_ctrl_llama.py        # about 30 s on a 2-core CPU

The model learns to continue a repeating token pattern; only the bridges train (B starts at zero, so
step 0 is the base model). Generation with and without a KV cache gives the same tokens.
"""

import tempfile

import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_ctrl  # noqa: F401  (registers STATE_CTRL with peft)
from peft_ctrl import StateCtrlConfig, saved_activation_bytes


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return LlamaForCausalLM(config)


def main() -> None:
    pattern = torch.arange(10, 26)
    data = pattern.repeat(8, 4)  # 8 sequences of 64 tokens
    model = get_peft_model(base_model(), StateCtrlConfig(r=16, blocks="both", alpha=1.0))
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(60):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 0 or step == 59:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    saved = saved_activation_bytes(lambda: model(input_ids=data, labels=data).loss.backward(), exclude=model)
    print(f"bytes saved for backward in one step: {saved / 2**20:.1f} MiB")

    model.eval()
    prompt = pattern[:6].unsqueeze(0)
    cached = model.generate(input_ids=prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    uncached = model.generate(input_ids=prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    print("generated:", cached[0].tolist(), "| same without KV cache:", torch.equal(cached, uncached))

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = PeftModel.from_pretrained(base_model(), folder)
        same = torch.equal(reloaded(input_ids=data).logits, model(input_ids=data).logits)
        print("reloaded adapter gives identical logits:", same)
    try:
        model.merge_and_unload()
    except ValueError as err:
        print("merge_and_unload:", str(err).split(":")[0])


if __name__ == "__main__":
    main()
