"""SEAL end to end on a tiny LLaMA (random init, CPU, about 15 seconds):

train a watermarked adapter -> release it as plain LoRA -> verify (owner and key-only) -> attack -> verify,
including a merged model rewritten by rotation and permutation, one saved in bf16 (key mode without the record),
renamed modules, and a padded, renamed adapter.

    python examples/seal_watermark.py
"""

import os
import tempfile
from pathlib import Path

import torch
import transformers
from peft import PeftModel, get_peft_model

from peft_ctrl import SealConfig
from peft_ctrl.seal import generate_key
from peft_ctrl.seal.claim import read_claim
from peft_ctrl.seal.io import LoraFactors, read_adapter
from peft_ctrl.seal.release import release
from peft_ctrl.seal.verify import Suspect, verify_key, verify_owner
from peft_ctrl_app.forensics import attacks


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        initializer_range=0.2,  # weights of a pretrained model's scale: fine-tuning deltas are a fraction of them
    )
    return transformers.LlamaForCausalLM(config)


def main() -> None:
    # The owner's key lives in the environment (or is passed as key=); it is never written anywhere.
    os.environ["PEFT_CTRL_SEAL_KEY"] = generate_key()
    model = get_peft_model(
        tiny_llama(), SealConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"])
    )

    # Train as any LoRA adapter (here a plain loop on a repeating token pattern).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    data = (torch.arange(32).repeat(8, 1) * 5 + torch.arange(8)[:, None]) % 128
    for _ in range(60):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"training loss after 60 steps: {loss.item():.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model.save_pretrained(root / "sealed")  # peft_type SEAL, only a commitment to the key
        claim = release(root / "sealed", root / "release", root / "private" / "proof.safetensors")
        print(f"published claim digest (the owner posts it, dated, at release): {claim.digest()}")

        # Anyone loads the release with stock peft; outputs equal the watermarked model's.
        released = PeftModel.from_pretrained(tiny_llama(), root / "release")
        model.eval()
        same = torch.allclose(released(input_ids=data).logits, model(input_ids=data).logits, atol=1e-4)
        print(f"release loads as plain LoRA ({released.peft_config['default'].peft_type.value}), same outputs: {same}")

        plain = read_adapter(root / "release")
        proof = root / "private" / "proof.safetensors"
        print("owner:   ", verify_owner(Suspect.from_adapter(plain), proof, claim.digest()))
        print("key-only:", verify_key(Suspect.from_adapter(plain)))
        pruned = attacks.obfuscate(attacks.prune(plain, 0.5))
        print("after pruning 50% and obfuscation:", verify_key(Suspect.from_adapter(pruned)))
        print("someone else's key:", verify_key(Suspect.from_adapter(plain), key=generate_key()))

        # A merged model rewritten without changing its function (residual stream rotated with the norm gains
        # folded in, attention heads and MLP neurons permuted): the verifier aligns it to the base first.
        base = tiny_llama().state_dict()
        config = released.config
        rewritten = attacks.permute_heads(attacks.rotate_residual(attacks.merge(plain, base), config), config)
        print(
            "merged, rotated, permuted:",
            verify_owner(Suspect.from_merged(rewritten, base, rank=16), proof, claim.digest()),
        )

        # The same merged model saved in bf16: every weight now differs from the base, and key mode without the
        # record still reads the claimed structure from the modules that carry a clear rank-16 update.
        rounded = attacks.round_to_bf16(attacks.merge(plain, base))
        print("merged, saved in bf16, key only:", verify_key(Suspect.from_merged(rounded, base, rank=16), r=16))

        # Renamed GGUF-style: owner mode pairs modules by shape, with every key row tested.
        gguf = {f"blk.{m.split('.')[2]}.{m.rsplit('.', 1)[1]}": f for m, f in plain.factors.items()}
        renamed = Suspect.from_adapter(LoraFactors(gguf, plain.scaling))
        print("renamed blk.N.q_proj:", verify_owner(renamed, proof, claim.digest()))

        # Near-null rank padding and renamed modules: key mode with the owner's public record (ranks and names).
        dodged = attacks.rename(attacks.pad_rank(plain, 40), "model.layers.", "backbone.layers.")
        record = read_claim(root / "release" / "seal_claim.json")
        print("padded and renamed, key mode with the record:", verify_key(Suspect.from_adapter(dodged), claim=record))


if __name__ == "__main__":
    main()
