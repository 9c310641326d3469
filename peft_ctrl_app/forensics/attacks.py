"""What an adversary can do to a released adapter, as functions (and ``peft-ctrl seal attack``).

Each weight-space attack takes and returns a ``LoraFactors`` (the released adapter as data) and never
changes its input (``pad_rank`` and ``rename`` included). ``merge`` returns the merged weights, which
``permute_heads`` and ``rotate_residual`` rewrite without changing the model's function (LLaMA family);
``forge_proof`` builds the proof a forger would present for a key of their own; ``continued_finetune`` trains a
loaded LoRA model further on other data, and ``distill`` trains a fresh adapter on the watermarked model's outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from peft_ctrl.factors import balanced_split, haar_orthogonal, product_svd
from peft_ctrl.seal.canonical import LLAMA_NORM_READERS, norm_readers
from peft_ctrl.seal.claim import Claim, structure_of, weights_sha256
from peft_ctrl.seal.io import LoraFactors, Proof
from peft_ctrl.seal.keys import commitment, new_salt, passport, resolve_key

WEIGHT_ATTACKS = ("prune", "noise", "obfuscate", "permute", "refactorize", "pad-rank")


def _map(adapter: LoraFactors, fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
    factors = {m: tuple(t.to(B.dtype) for t in fn(B.double(), A.double())) for m, (B, A) in adapter.factors.items()}
    return LoraFactors(factors, adapter.scaling, dict(adapter.config), dict(adapter.extra))


def prune(adapter: LoraFactors, fraction: float) -> LoraFactors:
    """Magnitude pruning: zero the ``fraction`` smallest-magnitude entries of every factor."""
    if not 0 <= fraction < 1:
        raise ValueError(f"The pruning fraction must be in [0, 1), got {fraction}.")

    def cut(t: torch.Tensor) -> torch.Tensor:
        k = int(fraction * t.numel())
        if k == 0:
            return t
        threshold = t.abs().flatten().kthvalue(k).values
        return torch.where(t.abs() > threshold, t, torch.zeros_like(t))

    return _map(adapter, lambda B, A: (cut(B), cut(A)))


def noise(adapter: LoraFactors, relative_std: float, seed: int = 0) -> LoraFactors:
    """Gaussian noise with standard deviation ``relative_std`` times each factor's RMS entry."""
    if relative_std < 0:
        raise ValueError(f"relative_std must be non-negative, got {relative_std}.")
    g = torch.Generator().manual_seed(seed)

    def add(t: torch.Tensor) -> torch.Tensor:
        rms = t.pow(2).mean().sqrt()
        return t + relative_std * rms * torch.randn(t.shape, generator=g, dtype=t.dtype)

    return _map(adapter, lambda B, A: (add(B), add(A)))


def obfuscate(adapter: LoraFactors, seed: int = 0) -> LoraFactors:
    """B' M, M^-1 A' with a random well-conditioned invertible M (the product is unchanged)."""
    g = torch.Generator().manual_seed(seed)

    def mix(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = A.shape[0]
        M = torch.eye(r, dtype=B.dtype) + torch.randn(r, r, generator=g, dtype=B.dtype) / (2 * r**0.5)
        return B @ M, torch.linalg.solve(M, A)

    return _map(adapter, mix)


def permute(adapter: LoraFactors, seed: int = 0) -> LoraFactors:
    """Permute the rank components (columns of B', rows of A')."""
    g = torch.Generator().manual_seed(seed)

    def shuffle(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.randperm(A.shape[0], generator=g)
        return B[:, order], A[order]

    return _map(adapter, shuffle)


def refactorize(adapter: LoraFactors) -> LoraFactors:
    """Balanced re-factorisation through the SVD of B'A': U S^1/2, S^1/2 V^T (the product is unchanged)."""

    def svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new_B, new_A = balanced_split(*product_svd(B, A))
        return new_B.to(B.dtype), new_A.to(A.dtype)

    return _map(adapter, svd)


def pad_rank(adapter: LoraFactors, extra: int, scale: float = 1e-4, seed: int = 0) -> LoraFactors:
    """Add ``extra`` near-null rank components to every module (B columns ``scale`` times B's RMS, random A rows):
    the adapter computes almost the same function at a larger rank."""
    if extra < 1:
        raise ValueError(f"pad_rank needs extra >= 1 components, got {extra}.")
    g = torch.Generator().manual_seed(seed)

    def pad(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new_B = scale * B.pow(2).mean().sqrt() * torch.randn(B.shape[0], extra, generator=g, dtype=B.dtype)
        new_A = A.pow(2).mean().sqrt() * torch.randn(extra, A.shape[1], generator=g, dtype=A.dtype)
        return torch.cat([B, new_B], 1), torch.cat([A, new_A], 0)

    return _map(adapter, pad)


def rename(adapter: LoraFactors, old: str, new: str) -> LoraFactors:
    """The adapter with ``old`` replaced by ``new`` in every module name (e.g. saved for the backbone)."""
    factors = {m.replace(old, new): f for m, f in adapter.factors.items()}
    if len(factors) != len(adapter.factors):
        raise ValueError(f"Renaming {old!r} to {new!r} would merge modules; pick another replacement.")
    return LoraFactors(factors, adapter.scaling, dict(adapter.config), dict(adapter.extra))


def merge(adapter: LoraFactors, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The merged model's weights: ``base[module.weight] + scaling * B' A'`` for every adapted module."""
    merged = dict(base)
    for module in adapter.factors:
        name = f"{module}.weight"
        if name not in base:
            raise ValueError(f"The base weights have no {name!r}; pass the state dict of the adapter's base model.")
        merged[name] = (base[name].double() + adapter.delta(module)).to(base[name].dtype)
    return merged


def round_to_bf16(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights as a model saved in bf16 holds them (read back in fp32): every weight moves by its rounding."""
    return {k: v.to(torch.bfloat16).float() for k, v in weights.items()}


def noisy_weights(weights: dict[str, torch.Tensor], relative_std: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every 2-D weight with Gaussian noise of ``relative_std`` times its own spread added to each entry."""
    g = torch.Generator().manual_seed(seed)
    noisy = {
        k: v + relative_std * v.std() * torch.randn(v.shape, generator=g) for k, v in weights.items() if v.dim() == 2
    }
    return {**weights, **noisy}


def _llama_layout(weights: dict[str, torch.Tensor], config) -> tuple[int, int, int, int]:
    """Layers, query heads, key/value heads and head size of a LLaMA-family model, checked against ``weights``."""
    heads, kv_heads = (
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = config.num_hidden_layers
    q = weights.get("model.layers.0.self_attn.q_proj.weight")
    if q is None or q.shape[0] != heads * head_dim:
        raise ValueError(
            "These are not the weights of a LLaMA-family model with this config (model.layers.N.self_attn.q_proj "
            f"with {heads} heads of {head_dim}); the merged-model rewrites support LLaMA, Mistral and Qwen2."
        )
    return layers, heads, kv_heads, head_dim


def permute_heads(weights: dict[str, torch.Tensor], config, seed: int = 0) -> dict[str, torch.Tensor]:
    """A function-preserving rewrite of a merged LLaMA-family model: per layer, a random order of the key/value
    heads (each with its query heads), of the query heads inside each group, and of the MLP neurons, with a
    random sign for every value channel and MLP neuron (undone by o_proj and down_proj)."""
    layers, heads, kv_heads, head_dim = _llama_layout(weights, config)
    g = torch.Generator().manual_seed(seed)
    group = heads // kv_heads
    out = dict(weights)
    for i in range(layers):
        p = f"model.layers.{i}."
        kv_order = torch.randperm(kv_heads, generator=g)
        q_heads = torch.cat([kv * group + torch.randperm(group, generator=g) for kv in kv_order.tolist()])
        q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
        kv_rows = (kv_order[:, None] * head_dim + torch.arange(head_dim)).flatten()
        v_signs = torch.randint(0, 2, (kv_heads * head_dim,), generator=g) * 2 - 1
        attn = p + "self_attn."
        out[attn + "q_proj.weight"] = weights[attn + "q_proj.weight"][q_rows]
        out[attn + "k_proj.weight"] = weights[attn + "k_proj.weight"][kv_rows]
        out[attn + "v_proj.weight"] = weights[attn + "v_proj.weight"][kv_rows] * v_signs[:, None].to(
            weights[attn + "v_proj.weight"].dtype
        )
        # o_proj reads query head h's slot, which now holds value head q_heads[h] // group (re-signed).
        o = weights[attn + "o_proj.weight"]
        slot_signs = v_signs.view(kv_heads, head_dim)[(torch.arange(heads) // group)].flatten()
        out[attn + "o_proj.weight"] = o[:, q_rows] * slot_signs.to(o.dtype)
        for name in ("q_proj.bias", "k_proj.bias", "v_proj.bias"):
            if attn + name in weights:
                rows = q_rows if name.startswith("q") else kv_rows
                bias = weights[attn + name][rows]
                out[attn + name] = bias * v_signs.to(bias.dtype) if name.startswith("v") else bias
        mlp = p + "mlp."
        neurons = torch.randperm(weights[mlp + "up_proj.weight"].shape[0], generator=g)
        signs = (torch.randint(0, 2, (len(neurons),), generator=g) * 2 - 1).to(weights[mlp + "up_proj.weight"].dtype)
        out[mlp + "gate_proj.weight"] = weights[mlp + "gate_proj.weight"][neurons]
        out[mlp + "up_proj.weight"] = weights[mlp + "up_proj.weight"][neurons] * signs[:, None]
        out[mlp + "down_proj.weight"] = weights[mlp + "down_proj.weight"][:, neurons] * signs
    return out


def random_orthogonal(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-random n x n orthogonal matrix."""
    return haar_orthogonal(n, torch.Generator().manual_seed(seed)).to(dtype)


def rotate_residual(weights: dict[str, torch.Tensor], config, seed: int = 0) -> dict[str, torch.Tensor]:
    """A function-preserving rewrite of a merged LLaMA-family model: every RMSNorm gain is folded into the linear
    layers that read it (gains set to 1), then the residual stream is rotated by a random orthogonal Q: weights
    reading it become ``W diag(g) Q``, weights writing it ``Q^T W``, the embedding ``E Q``. RMSNorm commutes
    with Q, so the logits are unchanged. The output head is written separately (``lm_head.weight``): load the
    result with ``tie_word_embeddings=False``."""
    layers, _, _, _ = _llama_layout(weights, config)
    E = weights["model.embed_tokens.weight"]
    Q = random_orthogonal(E.shape[1], seed)
    out = dict(weights)

    def read(name: str, gain: torch.Tensor) -> None:
        out[name] = ((weights[name].double() * gain.double()) @ Q).to(weights[name].dtype)

    def write(name: str) -> None:
        out[name] = (Q.T @ weights[name].double()).to(weights[name].dtype)
        bias = name[: -len("weight")] + "bias"
        if bias in weights:
            out[bias] = (Q.T @ weights[bias].double()).to(weights[bias].dtype)

    out["model.embed_tokens.weight"] = (E.double() @ Q).to(E.dtype)
    for i in range(layers):
        p = f"model.layers.{i}."
        for norm, readers in LLAMA_NORM_READERS:
            gain = weights[p + norm + ".weight"]
            for reader in readers:
                read(p + reader + ".weight", gain)
            out[p + norm + ".weight"] = torch.ones_like(gain)
        write(p + "self_attn.o_proj.weight")
        write(p + "mlp.down_proj.weight")
    head, gain = weights.get("lm_head.weight", E), weights["model.norm.weight"]
    out["lm_head.weight"] = ((head.double() * gain.double()) @ Q).to(head.dtype)
    out["model.norm.weight"] = torch.ones_like(gain)
    return out


def rescale_norms(weights: dict[str, torch.Tensor], config, seed: int = 0) -> dict[str, torch.Tensor]:
    """A function-preserving rewrite of a merged LLaMA-family model: every RMSNorm gain is multiplied by a random
    factor (log-uniform in [1/4, 4], random sign) and the columns of the weights reading it are divided by it.
    After ``rotate_residual`` this re-introduces norm gains into a rotated model."""
    _llama_layout(weights, config)
    g = torch.Generator().manual_seed(seed)
    out = dict(weights)
    readers = norm_readers(weights)
    for norm in sorted(set(readers.values())):
        gain = weights[norm]
        factor = 4.0 ** (2 * torch.rand(gain.shape, generator=g, dtype=torch.float64) - 1)
        factor *= torch.randint(0, 2, gain.shape, generator=g, dtype=torch.float64) * 2 - 1
        out[norm] = (gain.double() * factor).to(gain.dtype)
        for reader in (r for r, n in readers.items() if n == norm):
            out[reader] = (weights[reader].double() / factor).to(weights[reader].dtype)
    return out


def forge_proof(adapter: LoraFactors, forged_key: str | bytes, rank: int | None = None) -> Proof:
    """The ambiguity attack: a forger picks a key of their own, derives its passports C*, and presents
    'pre-release' factors B* = B' C*^-1, A* = A' with B* C* A* = B' A', so the passport test alone would
    credit them, with a claim of their own over the released weights (``forged_claim(...).digest()`` is what
    they would publish, after the owner). ``rank`` is the rank the forger claims for every module (default: the
    adapter's; a larger one pads B' and A' with zeros, which keeps B* C* A* = B' A'). The key-only part of owner
    verification rejects the claim."""
    raw = resolve_key(forged_key)
    salt = new_salt()
    key_commitment = commitment(raw, salt)
    padded = {}
    for module, (B, A) in adapter.factors.items():
        extra = (rank or A.shape[0]) - A.shape[0]
        if extra < 0:
            raise ValueError(f"rank {rank} is below the adapter's rank {A.shape[0]}: the forgery pads, never cuts.")
        padded[module] = (
            torch.cat([B, B.new_zeros(B.shape[0], extra)], 1),
            torch.cat([A, A.new_zeros(extra, A.shape[1])]),
        )
    claim = Claim(key_commitment, salt, structure_of(padded), weights_sha256(adapter.factors, adapter.scaling))
    factors = {}
    for module, (B, A) in padded.items():
        C = passport(raw, claim.schedule(), module, A.shape[0])
        factors[module] = ((B.double() @ torch.linalg.inv(C)).to(B.dtype), A.clone())
    return Proof(factors, key_commitment, salt, claim.structure[0][3], claim.fields())


def claim_of(proof: Proof) -> Claim:
    """The claim stored in a proof (what its maker published, or would publish)."""
    if proof.claim is None:
        raise ValueError("This proof holds no claim (it predates published claims).")
    return Claim.from_fields(proof.claim)


def hostile_claims(
    modules: dict[str, tuple[int, int]], weights_sha: str, count: int, seed: int, max_rank: int
) -> Iterator[tuple[Claim | None, str]]:
    """Claims built to exploit a verifier over a release whose modules have the given shapes, each with its own
    forger key: the release's modules (all or a subset) under their own names with mixed ranks (2 to max_rank),
    plus up to three times as many invented modules of the release's shapes (more entries than the suspect has
    modules; ranks 1 to max_rank), listed in a shuffled order; every fourth claim also repeats some of its
    entries. Yields (the claim, or None where ``Claim`` refused it, and the forger key)."""
    names = sorted(modules)
    shapes = sorted(set(modules.values()))
    rng = np.random.default_rng(seed)
    for i in range(count):
        key = f"hostile-{seed}-{i:05d}-0123456789abcdef"
        own = [names[j] for j in rng.choice(len(names), size=rng.integers(1, len(names) + 1), replace=False)]
        rows = [(m, *modules[m], int(rng.integers(2, max_rank + 1))) for m in own]
        for j in range(int(rng.integers(0, 3 * len(names) + 1))):
            out, inp = shapes[rng.integers(len(shapes))]
            rows.append((f"invented.{i}.{j}", out, inp, int(rng.integers(1, max_rank + 1))))
        if i % 4 == 3:
            rows += [rows[k] for k in rng.choice(len(rows), size=rng.integers(1, len(rows) + 1))]
        rows = [rows[k] for k in rng.permutation(len(rows))]
        salt = f"{seed:08x}{i:024x}"
        try:
            yield Claim(commitment(key.encode(), salt), salt, tuple(rows), weights_sha), key
        except ValueError as err:
            if "more than once" not in str(err):
                raise
            yield None, key


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def distill(
    teacher: nn.Module,
    student: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    steps: int,
    lr: float = 1e-3,
    logits: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] = _logits,
) -> nn.Module:
    """Distillation into a fresh adapter: train ``student`` (e.g. a new PEFT LoRA model, its own random init)
    ``steps`` AdamW steps to match ``teacher``'s output distribution (KL divergence) on unlabelled ``batches``.
    ``logits(model, batch)`` gives the outputs that count (default: the model's logits, labels not passed)."""
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("distill needs a student with trainable parameters (a fresh adapter).")
    optimizer = torch.optim.AdamW(params, lr=lr)
    teacher.eval()
    student.train()
    for step, batch in enumerate(batches):
        if step >= steps:
            break
        with torch.no_grad():
            target = logits(teacher, batch).float().log_softmax(-1).flatten(0, -2)
        predicted = logits(student, batch).float().log_softmax(-1).flatten(0, -2)
        torch.nn.functional.kl_div(predicted, target, log_target=True, reduction="batchmean").backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    student.eval()
    return student


def continued_finetune(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    steps: int,
    lr: float = 1e-3,
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] = lambda model, batch: model(**batch).loss,
    warmup_steps: int = 0,
    max_grad_norm: float | None = None,
) -> nn.Module:
    """Train a loaded LoRA model (``PeftModel`` of the released adapter) ``steps`` more AdamW steps on
    ``batches`` (by default dicts accepted by the model, including labels; else give ``loss(model, batch)``):
    the 'continued fine-tuning' attack. ``warmup_steps`` ramps the learning rate up linearly; ``max_grad_norm``
    clips the gradient norm (as an attacker keeping the task at a high learning rate would)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("continued_finetune needs a model with trainable adapter parameters (is_trainable=True).")
    if warmup_steps < 0 or (max_grad_norm is not None and max_grad_norm <= 0):
        raise ValueError(f"warmup_steps must be >= 0 and max_grad_norm > 0, got {warmup_steps}, {max_grad_norm}.")
    optimizer = torch.optim.AdamW(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    model.train()
    for step, batch in enumerate(batches):
        if step >= steps:
            break
        loss(model, batch).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model
