"""peft_ctrl.ops.lowrank: equality with the unfused expression, what it saves, the Triton kernels
(through TRITON_INTERPRET=1 on CPU), fallbacks and bad input."""

import subprocess
import sys
import types
import warnings

import pytest
import torch

from peft_ctrl.metrics import SavedTensorMeter
from peft_ctrl.ops import _dispatch, force_triton, keep_mask, lean_lora, lowrank, triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def tensors(shape=(2, 6, 16), r=4, d_out=12, seed=0, contiguous=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if not contiguous:
        x = torch.randn(shape[1], shape[0], shape[2], generator=g).transpose(0, 1)
    A = torch.randn(r, shape[-1], generator=g) * 0.3
    B = torch.randn(d_out, r, generator=g) * 0.3
    base = torch.randn(*shape[:-1], d_out, generator=g)
    return [t.requires_grad_(True) for t in (x, A, B, base)]


def grads(out, inputs, seed=3):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, inputs, g)


def next_seed(torch_seed: int) -> int:
    torch.manual_seed(torch_seed)
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


@pytest.mark.parametrize("contiguous", [True, False])
def test_without_dropout_matches_the_unfused_expression_bitwise(contiguous):
    x, A, B, base = tensors(contiguous=contiguous)
    fused = lowrank(x, A, B, scale=0.7, base=base)
    plain = base + 0.7 * (x @ A.t() @ B.t())
    assert torch.equal(fused, plain)
    for a, b in zip(grads(fused, (x, A, B, base)), grads(plain, (x, A, B, base)), strict=True):
        assert torch.equal(a, b)


def test_with_dropout_equals_f_dropout_after_seeding_with_the_documented_seed():
    x, A, B, _ = tensors()
    seed = next_seed(11)
    torch.manual_seed(11)
    fused = lowrank(x, A, B, scale=2.0, dropout=0.25)
    after = torch.randn(3)  # the caller's random stream moved on by exactly one draw
    torch.manual_seed(seed)
    plain = 2.0 * (torch.nn.functional.dropout(x, 0.25) @ A.t() @ B.t())
    assert torch.equal(fused, plain)
    for a, b in zip(grads(fused, (x, A, B)), grads(plain, (x, A, B)), strict=True):
        assert torch.equal(a, b)
    next_seed(11)
    assert torch.equal(torch.randn(3), after)
    keep = keep_mask(seed, torch.Size((12, 16)), 0.25, x.device).view(x.shape)
    assert 0.6 < keep.float().mean() < 0.9
    torch.testing.assert_close(plain, 2.0 * ((x * keep / 0.75) @ A.t() @ B.t()))


def test_eval_mode_has_no_dropout():
    x, A, B, _ = tensors()
    assert torch.equal(lowrank(x, A, B, dropout=0.5, training=False), x @ A.t() @ B.t())


def test_saves_only_z_besides_the_callers_tensors():
    x, A, B, _ = tensors(shape=(4, 32, 64), r=8, d_out=64)
    with SavedTensorMeter(exclude=[x, A, B]) as fused:
        lowrank(x, A, B, dropout=0.1).sum().backward()
    assert fused.total_bytes == 4 * 32 * 8 * 4  # z only
    with SavedTensorMeter(exclude=[x, A, B]) as plain:
        (torch.nn.functional.dropout(x, 0.1) @ A.t() @ B.t()).sum().backward()
    # The unfused expression keeps the mask and the dropped copy of x as well.
    assert plain.total_bytes >= fused.total_bytes + 2 * x.numel() * 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x, A, B: (x, A[:, :-1], B), "do not chain"),
        (lambda x, A, B: (x, A, B[:, :-1]), "do not chain"),
        (lambda x, A, B: (x, A[0], B), "matrices"),
        (lambda x, A, B: (x.double(), A, B), "dtype"),
        (lambda x, A, B: (x, A.to("meta"), B), "one device"),
    ],
)
def test_bad_input(change, message):
    x, A, B, _ = tensors()
    with pytest.raises(ValueError, match=message):
        lowrank(*change(x, A, B))


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_bad_dropout(p):
    x, A, B, _ = tensors()
    with pytest.raises(ValueError, match="dropout"):
        lowrank(x, A, B, dropout=p)


def test_missing_triton_on_cuda_warns_once_and_uses_torch(monkeypatch):
    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    monkeypatch.setattr(_dispatch, "_FORCED", False)
    monkeypatch.setattr(_dispatch, "_WARNED", False)
    cuda_like = types.SimpleNamespace(is_cuda=True, dtype=torch.float32)
    with pytest.warns(UserWarning, match="Triton is not installed"):
        assert _dispatch.use_triton(cuda_like) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.use_triton(cuda_like) is False


@pytest.mark.skipif(not _dispatch.triton_available(), reason="Triton is not installed")
def test_on_cuda_the_kernels_run_for_exactly_the_dtypes_and_ranks_they_are_compiled_for(monkeypatch):
    """The dispatcher's choice, with its reason, for CUDA-like inputs (no GPU needed): every dtype and rank class
    that peft_ctrl.ops.triton_aot compiles goes to Triton, anything else to the torch path with a reason."""
    from peft_ctrl.ops import triton_aot

    monkeypatch.setattr(_dispatch, "_FORCED", False)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert set(dtypes.values()) == set(_dispatch.TRITON_DTYPES) and set(dtypes) == set(triton_aot.DTYPES)
    for name, dtype in dtypes.items():
        for rank in (1, *triton_aot.RANK_CLASSES):
            cuda = types.SimpleNamespace(is_cuda=True, dtype=dtype)
            assert _dispatch.triton_reason(cuda, rank) is None, (name, rank)
    top = max(triton_aot.RANK_CLASSES)
    cuda64 = types.SimpleNamespace(is_cuda=True, dtype=torch.float64)
    assert "no Triton kernel for torch.float64" in _dispatch.triton_reason(cuda64, 8)
    assert f"above the kernels' largest rank class, {top}" in _dispatch.triton_reason(
        types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16), top + 1
    )
    assert _dispatch.triton_reason(torch.zeros(1), 8) == "not a CUDA tensor"
    assert not _dispatch.use_triton(cuda64, 8)


def test_package_works_without_triton():
    script = """
import sys
sys.modules["triton"] = None  # import triton now raises ImportError, as when it is not installed
import torch, peft_ctrl
from peft_ctrl.ops import lowrank, triton_available
x = torch.randn(3, 8, requires_grad=True)
lowrank(x, torch.randn(2, 8), torch.randn(4, 2), dropout=0.5).sum().backward()
print(triton_available(), x.grad.shape)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "torch.Size([3,", "8])"]


@needs_triton
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("r", [4, 16, 20, 100, 200])  # 100: the 16 x 16 tiles; 200 (fp32): 16 x 8
def test_triton_kernels_match_the_reference(r, contiguous):
    from peft_ctrl.ops import triton_lowrank

    x, A, B, base = tensors(shape=(3, 11, 40), r=r, d_out=24, contiguous=contiguous)
    p, seed = 0.2, next_seed(5)
    torch.manual_seed(5)
    with force_triton():
        fused = lowrank(x, A, B, scale=1.5, dropout=p, base=base)
        fused_grads = grads(fused, (x, A, B, base))
    keep = triton_lowrank.philox_keep_mask(seed, 33, 40, p, x.device).view(x.shape)
    plain = base + 1.5 * ((x * keep / (1 - p)) @ A.t() @ B.t())
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(fused_grads, grads(plain, (x, A, B, base)), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_mask_is_regenerated_identically_and_rank_limit_falls_back():
    from peft_ctrl.ops import triton_lowrank

    m1 = triton_lowrank.philox_keep_mask(99, 7, 33, 0.4, torch.device("cpu"))
    m2 = triton_lowrank.philox_keep_mask(99, 7, 33, 0.4, torch.device("cpu"))
    assert torch.equal(m1, m2) and 0.4 < m1.float().mean() < 0.8
    with pytest.raises(ValueError, match="ranks up to 256"):
        triton_lowrank.dropout_matmul(torch.randn(4, 8), torch.randn(300, 8), 0, 0.1)
    # lowrank itself routes ranks above the kernel limit to the torch path, forward and backward alike.
    x, A, B, _ = tensors(shape=(2, 3, 8), r=300, d_out=4)
    with force_triton():
        out = lowrank(x, A, B, dropout=0.1)
        out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _lora_llama(dropout: float, use_dora: bool = False):
    from models import build
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=4, lora_dropout=dropout, target_modules=targets, init_lora_weights=False, use_dora=use_dora)
    model = get_peft_model(build("llama"), config)
    model.train()
    return model


def test_lean_lora_equals_peft_lora_and_keeps_less():
    from models import inputs, output

    from peft_ctrl.metrics import saved_activation_bytes

    batch = inputs("llama", batch=2, seq=16)
    runs = {}
    for lean in (False, True):
        model = _lora_llama(dropout=0.1)
        if lean:
            assert lean_lora(model) == 14
        torch.manual_seed(0)
        out = output(model, batch)
        out.pow(2).mean().backward()
        grads_ = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        saved = saved_activation_bytes(lambda m=model: output(m, batch).sum().backward(), exclude=model)
        runs[lean] = (out, grads_, saved)
    assert runs[True][2] < 0.6 * runs[False][2]
    # Dropout masks come from different draws, so compare the deterministic eval outputs and no-dropout grads.
    for lean in (False, True):
        model = _lora_llama(dropout=0.0)
        if lean:
            lean_lora(model)
        out = output(model, batch)
        out.pow(2).mean().backward()
        runs[lean] = (out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert torch.equal(runs[True][0], runs[False][0])
    for name, grad in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], grad, atol=1e-6, rtol=1e-5)


def test_lean_lora_leaves_variants_and_disabled_adapters_to_peft():
    from models import build, inputs, output

    batch = inputs("llama")
    dora = _lora_llama(dropout=0.0, use_dora=True)
    expected = output(dora, batch)
    lean_lora(dora)
    assert torch.equal(output(dora, batch), expected)
    with dora.disable_adapter():
        torch.testing.assert_close(output(dora, batch), output(build("llama").train(), batch), atol=0, rtol=0)
    with pytest.raises(ValueError, match="no peft LoRA Linear"):
        lean_lora(build("llama"))
