"""SubLoRA layers, truncation round trip, schedule, curvature estimators, allocation, bad input."""

import pytest
import torch
from models import build, inputs, output
from peft import PeftModel, get_peft_model
from torch import nn

from peft_ctrl import SubLoRAConfig
from peft_ctrl.distributed.launch import free_port
from peft_ctrl.sublora.runtime import RankAllocator

TARGETS = ["q_proj", "v_proj", "down_proj"]


def sublora(**kw):
    options = {"r": 4, "target_r": 2, "target_modules": TARGETS, "total_step": 20, **kw}
    model = get_peft_model(build("llama"), SubLoRAConfig(**options))
    with torch.no_grad():  # non-zero singular values so the adapter changes the output
        for name, p in model.named_parameters():
            if "sublora_lambda" in name:
                p.copy_(torch.randn_like(p))
    return model


def adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "sublora" in n}


def batches(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(2, 60, (n, 10), generator=g)
        yield {"input_ids": ids, "labels": ids}


def test_forward_is_the_svd_form_and_merge_matches():
    model = sublora()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features)
    P, Q, lam = (layer.sublora_P["default"], layer.sublora_Q["default"], layer.sublora_lambda["default"])
    torch.testing.assert_close(layer(x), layer.base_layer(x) + (12 / 4) * x @ (P @ torch.diag(lam) @ Q).T)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "sublora_mask" in n)
    batch = inputs("llama")
    torch.testing.assert_close(output(model.merge_and_unload(), batch), output(sublora(), batch), atol=1e-5, rtol=1e-5)


def test_default_init_is_the_base_model():
    model = get_peft_model(build("llama"), SubLoRAConfig(r=4, target_r=2, target_modules=TARGETS))
    batch = inputs("llama")
    torch.testing.assert_close(output(model, batch), output(build("llama"), batch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_is_never_trainable_and_a_step_leaves_it(tmp_path, dtype):
    """On a bf16 base peft upcasts the adapter to fp32 by re-assigning its tensors; the 0/1 mask must stay frozen
    (it was trainable there, so AdamW moved it), also after loading."""
    model = get_peft_model(build("llama").to(dtype), SubLoRAConfig(r=4, target_r=2, target_modules=TARGETS))
    masks = {n: p for n, p in model.named_parameters() if "sublora_mask" in n}
    assert masks and not any(p.requires_grad for p in masks.values())
    opt = adamw(model)
    model(**next(batches())).loss.backward()
    opt.step()
    assert all(torch.equal(p, torch.ones_like(p)) for p in masks.values())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build("llama").to(dtype), tmp_path, is_trainable=True)
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if "sublora_mask" in n)


def test_adapter_cast_without_its_mask_still_runs_in_the_adapter_dtype():
    """TRL over a quantised base casts only the trainable parameters to bf16; the float32 mask must not promote
    the adapter's product back to float32 (the fused op refused the mixed dtypes)."""
    model = get_peft_model(build("llama").to(torch.bfloat16), SubLoRAConfig(r=4, target_r=2, target_modules=TARGETS))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    assert {p.dtype for n, p in model.named_parameters() if "sublora_mask" in n} == {torch.float32}
    loss = model(**next(batches())).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in model.named_parameters() if "sublora_lambda" in n]
    assert grads and all(g is not None and g.dtype == torch.bfloat16 for g in grads)


def test_truncation_round_trip_is_smaller_and_identical(tmp_path):
    model = sublora()
    alloc = RankAllocator(model)
    alloc.allocate(20, batches(), adamw(model))
    assert alloc.kept() == alloc.target == 12
    batch = inputs("llama")
    before = output(model, batch)
    model.save_pretrained(tmp_path / "masked")
    pattern = model.base_model.truncate()
    assert sum(pattern.values()) == 12 and model.peft_config["default"].rank_pattern == pattern
    torch.testing.assert_close(output(model, batch), before)
    model.save_pretrained(tmp_path / "truncated")
    size = {k: (tmp_path / k / "adapter_model.safetensors").stat().st_size for k in ("masked", "truncated")}
    assert size["truncated"] < 0.7 * size["masked"]
    loaded = PeftModel.from_pretrained(build("llama"), tmp_path / "truncated")
    torch.testing.assert_close(output(loaded, batch), before)
    masked = PeftModel.from_pretrained(build("llama"), tmp_path / "masked")  # mid-training checkpoints too
    torch.testing.assert_close(output(masked, batch), before)


def test_schedule_is_cubic_and_meets_the_budget_exactly_at_the_end_of_decay():
    model = sublora(t_init=3, t_final=5, delta_t=4, total_step=40)
    alloc = RankAllocator(model)
    assert alloc.budget_at(0) == alloc.budget_at(2) == 24 and alloc.budget_at(35) == alloc.budget_at(40) == 12
    budgets = [alloc.budget_at(t) for t in range(3, 36)]
    assert budgets == sorted(budgets, reverse=True)
    events = []
    gen, optimizer = batches(), adamw(model)
    for step in range(1, 41):
        if alloc.due(step):
            alloc.allocate(step, gen, optimizer)
            events.append(step)
            assert alloc.kept() == alloc.budget_at(step)
    assert events[0] == 7 and events[-1] == 35 and all(e == 35 or (e - 3) % 4 == 0 for e in events)
    assert alloc.kept() == 12


@pytest.mark.parametrize("hessian", ["exact", "block", "fisher", "diag"])
def test_curvature_estimators(hessian):
    model = sublora(hessian=hessian, curvature_samples=4)
    alloc = RankAllocator(model)
    grad, H = alloc.curvature(batches())
    d = 24
    assert grad.shape == (d,) and H.shape == (d, d) and torch.isfinite(H).all()
    exact_model = sublora(hessian="exact", curvature_samples=4)
    exact_grad, exact_H = RankAllocator(exact_model).curvature(batches())
    torch.testing.assert_close(grad, exact_grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(exact_H, exact_H.T, atol=1e-6, rtol=1e-5)
    if hessian == "exact":
        # against finite differences of the gradient
        lam = model.base_model.model.model.layers[0].self_attn.q_proj.sublora_lambda["default"]
        with torch.no_grad():
            lam[1] += 1e-3
        grad_plus, _ = alloc.curvature(batches())
        with torch.no_grad():
            lam[1] -= 1e-3
        torch.testing.assert_close((grad_plus - grad) / 1e-3, H[:, 1], atol=2e-3, rtol=2e-2)
    if hessian == "diag":
        assert torch.count_nonzero(H - torch.diag(H.diagonal())) == 0


def test_budget_and_schedule_errors():
    with pytest.raises(ValueError, match="exactly one of target_r"):
        SubLoRAConfig(r=4, target_modules=TARGETS)
    with pytest.raises(ValueError, match="SubLoRAConfig.budget must be an integer >= 1"):
        SubLoRAConfig(r=4, budget=0, target_modules=TARGETS)
    with pytest.raises(ValueError, match="must be smaller than total_step"):
        SubLoRAConfig(r=4, target_r=2, t_init=10, t_final=10, total_step=20, target_modules=TARGETS)
    model = get_peft_model(build("llama"), SubLoRAConfig(r=4, budget=25, target_modules=TARGETS, total_step=20))
    with pytest.raises(ValueError, match="exceeds the 24 components"):
        RankAllocator(model)
    with pytest.raises(ValueError, match="SubLoRAConfig"):
        RankAllocator(build("llama"))


def test_nan_curvature_changes_nothing():
    model = sublora()
    before = adapter_state(model)
    alloc = RankAllocator(model, loss_fn=lambda m, b: m(**b).loss * float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        alloc.allocate(20, batches(), adamw(model))
    assert alloc.kept() == 24 and alloc.history == []
    assert all(torch.equal(before[n], p) for n, p in adapter_state(model).items())  # SVD form undone


def test_exact_svd_needs_the_optimizer():
    model = sublora()
    before = adapter_state(model)
    with pytest.raises(ValueError, match="pass optimizer= to allocate"):
        RankAllocator(model).allocate(20, batches())
    assert all(torch.equal(before[n], p) for n, p in adapter_state(model).items())
    model = sublora(exact_svd=False)
    before = adapter_state(model)
    RankAllocator(model).allocate(20, batches())  # masks only: the factors keep their coordinates
    after = adapter_state(model)
    assert all(torch.equal(before[n], after[n]) for n in before if "mask" not in n)


def delta_w(layer):
    return layer.get_delta_weight("default").detach().double()


def test_to_svd_form_keeps_outputs_and_makes_orthonormal_sorted_components():
    model = sublora()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.sublora_mask["default"][1] = 0  # one removed component: must stay removed, moved last
    x = torch.randn(5, layer.in_features)
    before, removed = layer(x), layer.sublora_P["default"][:, 1].clone()
    layer.to_svd_form("default")
    P, Q, lam = (layer.sublora_P["default"], layer.sublora_Q["default"], layer.sublora_lambda["default"])
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    assert layer.sublora_mask["default"].tolist() == [1, 1, 1, 0]
    torch.testing.assert_close(P[:, :3].T @ P[:, :3], torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(Q[:3] @ Q[:3].T, torch.eye(3), atol=1e-5, rtol=0)
    assert (lam[:3] >= 0).all() and (lam[:3].diff() <= 0).all()
    torch.testing.assert_close(P[:, 3], removed)


def test_allocation_splits_singular_triplets_and_restarts_only_the_modules_that_lose_components():
    model = sublora(t_init=0, t_final=0, total_step=20)
    layers = model.base_model.sublora_layers("default")
    optimizer = adamw(model)
    gen = batches()
    for _ in range(2):  # optimizer statistics for every factor
        model(**next(gen)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    before = {name: (delta_w(layer), adapter_state(layer)) for name, layer in layers.items()}
    alloc = RankAllocator(model)
    ranks = alloc.allocate(2, gen, optimizer)
    assert alloc.kept() == 21  # three components go: some modules lose components, most keep all four
    assert any(r == 4 for r in ranks.values()) and any(r < 4 for r in ranks.values())
    for name, layer in layers.items():
        old, new = before[name][0], delta_w(layer)
        factors = [layer.sublora_P["default"], layer.sublora_lambda["default"], layer.sublora_Q["default"]]
        if ranks[name] == 4:  # untouched: same parameters, optimizer statistics kept
            assert all(torch.equal(before[name][1][n], p) for n, p in adapter_state(layer).items())
            assert all(p in optimizer.state for p in factors)
        else:  # kept = a subset of the old delta W's singular triplets; statistics restarted
            rest = old - new
            assert (new.T @ rest).abs().max() < 1e-6 and (new @ rest.T).abs().max() < 1e-6
            assert torch.linalg.matrix_rank(new, atol=1e-6) == ranks[name]
            assert not any(p in optimizer.state for p in factors)


def test_orthogonality_gradient_is_added_whatever_the_model_returns():
    class Bare(nn.Module):  # returns a plain tensor: no .loss for AdaLoRA-style hooks to find
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    config = SubLoRAConfig(r=3, target_r=2, target_modules=["fc1", "fc2"], total_step=10, orth_reg_weight=0.1)
    model = get_peft_model(Bare(), config)
    alloc = RankAllocator(model, loss_fn=lambda m, b: m(b[0]).pow(2).mean())
    alloc.add_orthogonality_gradient()
    P = model.base_model.model.fc1.sublora_P["default"]
    M = P.T @ P - torch.eye(3)
    expected = 0.1 / 4 * 2 * P @ M / torch.linalg.matrix_norm(M)  # d|M|_F/dP, averaged over 4 matrices
    torch.testing.assert_close(P.grad, expected.detach())


def _curvature_on_rank(rank: int, world: int, port: int, hessian: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        grad, H = RankAllocator(sublora(hessian=hessian, curvature_samples=6)).curvature(batches())
        if rank == 0:
            torch.save((grad, H), out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("hessian", ["exact", "fisher"])
def test_curvature_split_across_two_processes_equals_one_process(hessian, tmp_path):
    """Each rank estimates on its share of the drawn examples; the sum is the one-process estimate."""
    out = str(tmp_path / "rank0.pt")
    torch.multiprocessing.spawn(_curvature_on_rank, args=(2, free_port(), hessian, out), nprocs=2)
    torch.manual_seed(0)
    grad, H = RankAllocator(sublora(hessian=hessian, curvature_samples=6)).curvature(batches())
    split_grad, split_H = torch.load(out)
    torch.testing.assert_close(split_grad, grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(split_H, H, rtol=1e-5, atol=1e-7)


def test_hessian_vector_rows_are_the_same_in_any_chunking():
    """The curvature probes go through in chunks (memory: one copy of the graph per probe in a chunk); every
    chunking gives the exact Hessian rows."""
    from peft_ctrl.sublora.runtime import _hvp_rows

    g = torch.Generator().manual_seed(0)
    lams = [torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    M = torch.randn(6, 6, generator=g, dtype=torch.float64)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return (x @ M @ x) + (x**3).sum()

    flat = torch.cat(torch.autograd.grad(loss_of(torch.cat(lams)), lams, create_graph=True))
    exact = torch.autograd.functional.hessian(loss_of, torch.cat(lams).detach())
    probes = torch.randn(7, 6, generator=g, dtype=torch.float64)
    for chunk in (1, 3, 7, 100):
        torch.testing.assert_close(_hvp_rows(flat, lams, probes, chunk=chunk), probes @ exact.T)
