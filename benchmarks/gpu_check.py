"""One-shot GPU check: run it whenever a CUDA machine is at hand and commit docs/results/gpu_check.json.

    python benchmarks/gpu_check.py                 # on a CUDA machine (an H100 takes a few minutes)
    python benchmarks/gpu_check.py --smoke         # on any machine: the same code on a tiny model on the CPU

1. **Kernels, natively.** The fused low-rank op on CUDA tensors (Triton kernels) against the plain expression with
   the same Philox mask, forward and every gradient, in fp32, bf16 and fp16, at ranks 8, 64 and 200.
2. **Speed.** Forward + backward of the fused op, of the same math in plain torch (dropout mask kept), and of a PEFT
   LoRA layer, on 16 x 2048 tokens of width 4096 at ranks 16 and 64 (CUDA events, median of 20 after 5 warm-ups).
3. **Memory: measured beside planned.** For every planner method on a 1B-class shape (Llama-3.2-1B's config values)
   and on Llama-3.1-8B with random bf16 weights: ``torch.cuda.max_memory_allocated`` over one training step (AdamW,
   batch 1 x 2048) next to the planner's peak (``peft_ctrl.planner.plan``, target "cuda"), and the bytes autograd
   saved (``SavedTensorMeter``) next to the planned saved bytes. A method that does not fit reports "OOM".

``--smoke`` runs part 3 on a tiny LLaMA on the CPU with the CPU target (saved bytes only) and a 1-step version of
parts 1-2 through Triton's interpreter when Triton is installed; the unit tests run it, so the script keeps working.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import torch
import transformers
from _common import parser

from peft_ctrl.metrics import SavedTensorMeter
from peft_ctrl.planner import METHODS, load_config, plan
from peft_ctrl.planner.plan import build

LLAMA_1B = transformers.LlamaConfig(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True,
)  # fmt: skip
TINY = transformers.LlamaConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip


def kernels(device: str, ranks: tuple[int, ...]) -> list[dict]:
    """Fused op vs the plain expression with the same mask, for each dtype and rank."""
    from peft_ctrl.ops import force_triton, lowrank
    from peft_ctrl.ops import triton_lowrank as T

    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for r in ranks:
            g = torch.Generator().manual_seed(r)
            x, A, B = (torch.randn(*s, generator=g).to(device, dtype) for s in ((3, 37, 96), (r, 96), (64, r)))
            for t in (x, A, B):
                t.requires_grad_(True)
            seed_state = torch.random.get_rng_state()
            with force_triton():
                fused = lowrank(x, A, B, scale=1.5, dropout=0.2)
            torch.random.set_rng_state(seed_state)
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
            keep = T.philox_keep_mask(seed, 111, 96, 0.2, x.device).view(x.shape)
            plain = 1.5 * ((x * keep / 0.8) @ A.t() @ B.t())
            grads = torch.autograd.grad(fused.float().sum(), (x, A, B))
            ref = torch.autograd.grad(plain.float().sum(), (x, A, B))
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            close = [
                torch.allclose(a.float(), b.float(), atol=10 * tol, rtol=10 * tol)
                for a, b in zip(grads, ref, strict=True)
            ]
            ok = torch.allclose(fused.float(), plain.float(), atol=tol, rtol=tol) and all(close)
            out.append({"dtype": str(dtype), "rank": r, "match": bool(ok)})
    return out


def _median_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        return float("nan")
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _timed(device: str, tokens: int, width: int, r: int, repeats: int, warmup: int) -> dict:
    from peft import LoraConfig, get_peft_model

    from peft_ctrl.ops import lowrank

    x = torch.randn(tokens, width, device=device, dtype=torch.bfloat16, requires_grad=True)
    A = torch.randn(r, width, device=device, dtype=torch.bfloat16, requires_grad=True)
    B = torch.randn(width, r, device=device, dtype=torch.bfloat16, requires_grad=True)
    layer = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(width, width, bias=False)).to(device, torch.bfloat16),
        LoraConfig(r=r, target_modules=["0"], lora_dropout=0.05),
    )
    steps = {
        "fused_ms": lambda: lowrank(x, A, B, dropout=0.05).sum().backward(),
        "torch_unfused_ms": lambda: (torch.nn.functional.dropout(x, 0.05) @ A.t() @ B.t()).sum().backward(),
        "peft_lora_layer_ms": lambda: layer(x).sum().backward(),
    }
    times = {name: _median_ms(step, repeats, warmup) for name, step in steps.items()}
    return {"rank": r, "tokens": tokens, "width": width, **times}


def speed(device: str, tokens: int, width: int, ranks: tuple[int, ...], repeats: int, warmup: int) -> list[dict]:
    return [_timed(device, tokens, width, r, repeats, warmup) for r in ranks]


def memory(config, name: str, device: str, seq: int, target: str) -> list[dict]:
    out = []
    dtype = "bf16" if device == "cuda" else "fp32"
    for method in METHODS:
        planned = plan(config, method, dtype=dtype, seq=seq, target=target)
        row = {"model": name, "method": method, "planned_peak": planned.peak, "planned_saved": planned.saved}
        try:
            model = build(config, method, dtype, device=device, target=target if device == "cuda" else None)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
            ids = torch.randint(0, config.vocab_size, (1, seq), device=device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with SavedTensorMeter(exclude=model) as meter:
                model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            row["measured_saved"] = meter.total_bytes
            if device == "cuda":
                row["measured_peak"] = torch.cuda.max_memory_allocated()
        except torch.OutOfMemoryError:
            row["measured_peak"] = "OOM"
        finally:
            model = optimizer = None
            if device == "cuda":
                torch.cuda.empty_cache()
        out.append(row)
        print(row, file=sys.stderr)
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="a tiny CPU run of the same code (what the tests run)")
    args = p.parse_args()
    if args.smoke:
        print(json.dumps({"memory": memory(TINY, "tiny", "cpu", 16, "cpu")}))
        return
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU (or --smoke for the CPU dry run).")
    os.environ.pop("TRITON_INTERPRET", None)
    report = {
        "device": torch.cuda.get_device_name(),
        "kernels": kernels("cuda", (8, 64, 200)),
        "speed": speed("cuda", 16 * 2048, 4096, (16, 64), repeats=20, warmup=5),
        "memory": memory(LLAMA_1B, "llama-3.2-1b-shape", "cuda", 2048, "cuda")
        + memory(load_config("llama-3.1-8b"), "llama-3.1-8b", "cuda", 2048, "cuda"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
