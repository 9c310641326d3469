"""Scaffolding shared by the benchmark scripts: the command line, writing results, and the two problems more
than one script runs (the LLaMA-shaped benchmark model, the PINN transfer task).

Scripts run as ``python benchmarks/NAME.py``, which puts this folder on ``sys.path``, so they import it as
``_common``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from peft_ctrl import StateCtrlConfig
from peft_ctrl.ops import lean_lora, lean_mlp

# ALL_LINEAR (re-exported for the benchmarks): the seven linears of a LLaMA block, as in the main job.
from peft_ctrl_app.training import ALL_LINEAR as ALL_LINEAR

RESULTS = Path("docs/results")


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The benchmark's command line, with ``--out`` (where results go, default docs/results)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the results files (default docs/results)")
    return p


def write_results(
    out: Path, name: str, table: str, data: Any = None, plot: Callable[[Path], None] | None = None
) -> None:
    """Print ``table`` and write ``out/NAME.md``, ``out/NAME.json`` (``data``, if any) and ``out/NAME.png``
    (drawn by ``plot(path)``, if given)."""
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table + "\n")
    if data is not None:
        (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    if plot is not None:
        plot(out / f"{name}.png")


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 120) -> None:
    """Lay out ``fig``, write it to ``path`` and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def training_step(opt: torch.optim.Optimizer, closure: Callable[[], torch.Tensor]) -> None:
    """One optimizer step on ``closure``'s loss: ODELoRA evaluates the closure itself (torch.optim's convention,
    and Heun/RK4 need it again); the other optimizers get one backward first (peft's Riemannian optimizer
    refuses closures)."""
    from peft_ctrl.optim import ODELoRA

    if isinstance(opt, ODELoRA):
        opt.step(closure)
    else:
        closure()
        opt.step()


# ---------------------------------------------------------------- rank allocation runs (SubLoRA against AdaLoRA)


@dataclass(frozen=True)
class Schedule:
    """AdaLoRA's cubic budget schedule, shared by SubLoRA: initial rank, warm-up, final phase, interval, steps."""

    init_r: int
    t_init: int
    t_final: int
    delta_t: int
    steps: int


def sublora_config(modules: list[str], budget: int, schedule: Schedule, **options: Any) -> Any:
    from peft_ctrl import SubLoRAConfig

    s = schedule
    return SubLoRAConfig(
        r=s.init_r,
        budget=budget,
        lora_alpha=s.init_r,
        target_modules=modules,
        t_init=s.t_init,
        t_final=s.t_final,
        delta_t=s.delta_t,
        total_step=s.steps,
        **options,
    )


def adalora_config(modules: list[str], budget: int, schedule: Schedule, **options: Any) -> Any:
    from peft import AdaLoraConfig

    s = schedule
    return AdaLoraConfig(
        init_r=s.init_r,
        target_r=budget // len(modules),
        lora_alpha=s.init_r,
        target_modules=modules,
        tinit=s.t_init,
        tfinal=s.t_final,
        deltaT=s.delta_t,
        total_step=s.steps,
        **options,
    )


# ---------------------------------------------------------------- the LLaMA-shaped benchmark model

MiB = 2**20


@dataclass(frozen=True)
class Shape:
    hidden: int = 512
    intermediate: int = 1376
    layers: int = 4
    heads: int = 8
    vocab: int = 1024
    batch: int = 4
    seq: int = 256
    kv_heads: int = 0  # grouped-query attention: key/value heads (0: as many as heads)


def build_base(shape: Shape, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads or shape.heads,
        max_position_embeddings=max(shape.seq, 64),
    )
    model = LlamaForCausalLM(config).requires_grad_(False)
    model.train()
    return model


def make_batch(shape: Shape) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g)
    return {"input_ids": ids, "labels": ids}


def checkpointed(model: nn.Module) -> nn.Module:
    """Gradient checkpointing on every decoder layer (transformers' non-reentrant default)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def lora(
    targets: list[str], dora: bool = False, lean: bool = False, checkpointing: bool = False, lean_mlps: bool = False
) -> Callable[[nn.Module], nn.Module]:
    """PEFT LoRA r=16; ``lean``: peft_ctrl.ops.lean_lora on its layers, ``lean_mlps``: ops.lean_mlp on the model."""
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets, use_dora=dora)

    def build(base: nn.Module) -> nn.Module:
        model = get_peft_model(base, config)
        if lean:
            lean_lora(model)
        if lean_mlps:
            lean_mlp(model)
        return checkpointed(model) if checkpointing else model

    return build


def state_ctrl(
    r: int, blocks: str, dropout: float = 0.0, fused: bool = True, checkpointing: bool = False, lean_mlp: bool = True
) -> Callable[[nn.Module], nn.Module]:
    config = StateCtrlConfig(r=r, blocks=blocks, dropout=dropout, fused=fused, lean_mlp=lean_mlp)

    def build(base: nn.Module) -> nn.Module:
        model = get_peft_model(base, config)
        return checkpointed(model) if checkpointing else model

    return build


LLAMA2_7B = Shape(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000, batch=1, seq=4096)
LLAMA3_8B = Shape(hidden=4096, intermediate=14336, layers=32, heads=32, vocab=128256, batch=1, seq=4096, kv_heads=8)
# The real SmolLM2-135M-Instruct (peft_ctrl.models.load_smollm2) at 1 x 512 tokens.
SMOLLM2 = Shape(hidden=576, intermediate=1536, layers=30, heads=9, vocab=49152, batch=1, seq=512, kv_heads=3)


def projected_bytes(method: str, s: Shape, elem: int = 4, mask: int = 4) -> int:
    """Bytes saved for backward predicted from the shapes alone (LLaMA decoder, fp32 by default).

    Counts in elements per token (d = hidden, f = intermediate, H = heads, r = rank, d_kv = key/value width,
    d for multi-head attention, kv_heads x head_dim for grouped-query attention), from what each op keeps:
      frozen decoder layer that gradients flow through:  LAYER = 4d + 2 d_kv + 3f + H + 2
          (two RMSNorms keep h and 1/rms: 2(d + 1); attention keeps q, k, v, out and a log-sum-exp per head:
           2d + 2 d_kv + H, k and v unexpanded when SDPA runs grouped-query attention itself; the SwiGLU MLP keeps
           gate, silu(gate) and up: 3f, or gate and up only, 2f, under peft_ctrl.ops.lean_mlp, which state-ctrl
           uses unless the method's name says "without lean_mlp"; frozen linears keep no activation)
      head: final norm d + 1, log-softmax output V, plus an int64 target and the rotary cos/sin (2 d/H) once
      state-ctrl bridge: + r (A h); h is the tensor the norm already keeps, except in layer 0 (+ d once)
      PEFT LoRA on a linear of input width w (dropout > 0): + w (dropped x) + r (A x) + the dropout mask,
          w elements of `mask` bytes (4 on CPU, where dropout keeps a float mask; 1 on CUDA, a bool mask),
          except where the linear's input needs no gradient (layer 0's q, k, v)
      full fine-tuning adds the linears' inputs and norms' normalised states: + 5d + f per layer (+ 2d head,
      + an int64 index for the embedding)
    Layer 0 is partial: with LoRA its attention internals need gradients but its input norm does not
    (LAYER - d - 1); a floor or bridge that starts at the MLP output saves nothing there.
    """
    d, f, H, L, V, T = s.hidden, s.intermediate, s.heads, s.layers, s.vocab, s.batch * s.seq
    d_kv = (s.kv_heads or H) * (d // H)
    layer = 4 * d + 2 * d_kv + 3 * f + H + 2
    head = (d + 1 + V) * elem + 8
    after_attn0 = d + 1 + 3 * f  # layer 0 from its attention output on
    lora_layer0 = layer - d - 1
    rest = (L - 1) * layer
    if method.startswith("state-ctrl") and "without lean_mlp" not in method:
        rest, after_attn0 = rest - (L - 1) * f, after_attn0 - f  # the SwiGLU keeps gate and up only
    rank = re.search(r"r=(\d+)", method)
    r = int(rank.group(1)) if rank else 0
    if method == "floor mlp":
        per_token = rest * elem + head
    elif method == "floor attn":
        per_token = (rest + after_attn0) * elem + head
    elif method.startswith("state-ctrl mlp"):
        per_token = (rest + L * r + d) * elem + head
    elif method.startswith("state-ctrl both"):
        per_token = (rest + after_attn0 + 2 * L * r + d) * elem + head
    elif method == "PEFT LoRA all-linear r=16":
        adapters = (6 * d + f + 7 * 16) * elem + (6 * d + f) * mask
        # layer 0's q, k, v inputs need no gradient, so their dropout masks are not kept
        per_token = (rest + lora_layer0) * elem + L * adapters - 3 * d * mask + head
    elif method == "PEFT LoRA q,v r=16":
        adapters = 2 * (d + 16) * elem + 2 * d * mask
        per_token = (rest + lora_layer0) * elem + L * adapters - 2 * d * mask + head
    elif method == "full fine-tuning":
        per_token = (L * (layer + 4 * d + f) + 2 * d) * elem + head + 8
    else:
        raise KeyError(f"no projection formula for {method!r}")
    rotary = 2 * s.seq * (d // H) * elem  # cos and sin, computed once and shared by every layer
    return T * per_token + rotary


# ---------------------------------------------------------------- the PINN transfer task
# 2-D Poisson -Laplace(u) = f on [0, 1]^2, u = 0 on the boundary: pre-trained on u1 = sin(pi x) sin(pi y),
# fine-tuned to u2 = u1 + 0.5 sin(2 pi x) sin(pi y); errors are relative L2 against the exact solution.

PI = math.pi


def exact(xy: torch.Tensor, shifted: bool) -> torch.Tensor:
    x, y = xy[:, :1], xy[:, 1:]
    u = torch.sin(PI * x) * torch.sin(PI * y)
    return u + 0.5 * torch.sin(2 * PI * x) * torch.sin(PI * y) if shifted else u


def source(xy: torch.Tensor, shifted: bool) -> torch.Tensor:
    """f = -Laplace(u) for the exact solution."""
    x, y = xy[:, :1], xy[:, 1:]
    f = 2 * PI**2 * torch.sin(PI * x) * torch.sin(PI * y)
    return f + 0.5 * 5 * PI**2 * torch.sin(2 * PI * x) * torch.sin(PI * y) if shifted else f


class MLP(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(2, width)
        self.h1 = nn.Linear(width, width)
        self.h2 = nn.Linear(width, width)
        self.h3 = nn.Linear(width, width)
        self.out = nn.Linear(width, 1)

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.inp(xy))
        for layer in (self.h1, self.h2, self.h3):
            z = torch.tanh(layer(z))
        return self.out(z)


def pinn_loss(model: nn.Module, interior: torch.Tensor, boundary: torch.Tensor, shifted: bool) -> torch.Tensor:
    xy = interior.clone().requires_grad_(True)
    u = model(xy)
    (grad,) = torch.autograd.grad(u.sum(), xy, create_graph=True)
    lap = sum(torch.autograd.grad(grad[:, i].sum(), xy, create_graph=True)[0][:, i] for i in range(2))
    residual = -lap.unsqueeze(1) - source(interior, shifted)
    return residual.pow(2).mean() + 10 * model(boundary).pow(2).mean()


def points(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    interior = torch.rand(500, 2, generator=g)
    t = torch.rand(100, 1, generator=g)
    zeros, ones = torch.zeros_like(t), torch.ones_like(t)
    boundary = torch.cat([torch.cat(p, 1) for p in ((t, zeros), (t, ones), (zeros, t), (ones, t))])
    return interior, boundary


def grid() -> torch.Tensor:
    s = torch.linspace(0, 1, 50)
    return torch.cartesian_prod(s, s)


def rel_l2(model: nn.Module, shifted: bool) -> float:
    xy = grid()
    with torch.no_grad():
        return float((model(xy) - exact(xy, shifted)).norm() / exact(xy, shifted).norm())


def pretrain(seed: int = 0, model_cls: type[nn.Module] = MLP) -> nn.Module:
    """A ``model_cls()`` PINN trained on the unshifted instance u1."""
    torch.manual_seed(seed)
    model = model_cls()
    interior, boundary = points(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(1500):
        opt.zero_grad()
        pinn_loss(model, interior, boundary, shifted=False).backward()
        opt.step()
    return model
