"""ODELoRA: the ODE identities against a dense reference, re-balancing, the integrators' order, resume,
Trainer glue for every scheme, and bad input."""

import copy

import pytest
import torch
from models import build, inputs, output
from peft import LoraConfig, get_peft_model

from peft_ctrl.optim import ODELoRA, create_odelora_optimizer, imbalance, ode_direction, rebalance
from peft_ctrl.optim.odelora import LoraPair, gauge
from peft_ctrl_app.sensing import SensingProblem


def dense_projection(B, A, G):
    PB = B @ torch.linalg.inv(B.T @ B) @ B.T
    PA = A.T @ torch.linalg.inv(A @ A.T) @ A
    return PB @ G + G @ PA - PB @ G @ PA


@pytest.mark.parametrize(("m", "n", "r", "s"), [(12, 9, 3, 0.7), (20, 30, 5, 2.0), (7, 7, 1, 1.0)])
def test_product_follows_the_projected_gradient_flow_and_balance_is_kept(m, n, r, s):
    g = torch.Generator().manual_seed(m * n + r)
    B, A = rebalance(
        torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64)
    )
    assert imbalance(B, A) < 1e-12
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    dB, dA = ode_direction(B, A, s * G @ A.T, s * B.T @ G, s, eps=1e-14)
    # W = W0 + s B A, so dW/dt = s (dB A + B dA) must be -P_T(G).
    torch.testing.assert_close(s * (dB @ A + B @ dA), -dense_projection(B, A, G), atol=1e-10, rtol=1e-10)
    # d/dt (B^T B - A A^T) = 0 at a balanced point.
    drift = dB.T @ B + B.T @ dB - dA @ A.T - A @ dA.T
    assert drift.abs().max() < 1e-10 * (B.T @ B).abs().max()


def test_gauge_solves_the_lyapunov_equation():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 5, generator=g, dtype=torch.float64)
    M = X @ X.T + 0.1 * torch.eye(5, dtype=torch.float64)
    N = torch.randn(5, 5, generator=g, dtype=torch.float64)
    S = 2 * gauge(M, N, eps=1e-14)
    D = N - N.T
    rhs = 0.5 * (D @ torch.linalg.inv(M) - torch.linalg.inv(M) @ D)
    torch.testing.assert_close(M @ S + S @ M, rhs, atol=1e-10, rtol=1e-10)


def test_rebalance_keeps_the_product_and_balances():
    g = torch.Generator().manual_seed(1)
    B, A = (
        torch.randn(30, 4, generator=g, dtype=torch.float64) * 5,
        torch.randn(4, 20, generator=g, dtype=torch.float64),
    )
    assert imbalance(B, A) > 0.5
    B2, A2 = rebalance(B, A)
    torch.testing.assert_close(B2 @ A2, B @ A, atol=1e-12, rtol=1e-12)
    assert imbalance(B2, A2) < 1e-12


def _flow(h: float, steps: int, scheme: str) -> torch.Tensor:
    problem = SensingProblem.fully_observed(8, 6, 2, 3.0)
    torch.manual_seed(0)
    B = torch.nn.Parameter(torch.randn(8, 2, dtype=torch.float64) * 0.5)
    A = torch.nn.Parameter(torch.randn(2, 6, dtype=torch.float64) * 0.5)
    opt = ODELoRA([LoraPair("w", A, B, 1.0)], [], lr=h, scheme=scheme, warmup_steps=0, eps=1e-14)

    def closure():
        loss = 0.5 * (B @ A - problem.W_star).pow(2).sum()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.zero_grad()
        opt.step(closure)
    return (B @ A).detach()


def test_rk4_is_fourth_order_and_heun_second_order():
    reference = _flow(0.005, 200, "rk4")
    for scheme, order in (("rk4", 16), ("heun", 4), ("euler", 2)):
        coarse = (_flow(0.1, 10, scheme) - reference).norm()
        fine = (_flow(0.05, 20, scheme) - reference).norm()
        assert 0.7 * order < coarse / fine < 1.4 * order, (scheme, float(coarse / fine))


@pytest.mark.parametrize("scheme", ["euler", "heun", "rk4"])
def test_sensing_converges_from_peft_default_init_and_stays_balanced(scheme):
    problem = SensingProblem.make(16, 16, 2, 100.0, 200)
    model = problem.model(2)
    assert torch.count_nonzero(model.base_model.model.lin.lora_B["default"].weight) == 0
    opt = create_odelora_optimizer(model, lr=0.5, scheme=scheme)

    def closure():
        loss = problem.loss(model)
        loss.backward()
        return loss

    for _ in range(300):
        opt.zero_grad()
        opt.step(closure)
        pair = opt.pairs[0]
        assert imbalance(pair.B, pair.A) < 1e-3
        if problem.error(model) < 1e-6:
            break
    assert problem.error(model) < 1e-6


@pytest.mark.parametrize("scheme", ["euler", "rk4"])
def test_resume_continues_exactly(scheme, tmp_path):
    problem = SensingProblem.make(20, 20, 2, 10.0, 300)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            problem.loss(model).backward()
            opt.step(lambda: problem.loss(model).backward())

    straight = problem.model(2)
    opt = create_odelora_optimizer(straight, lr=0.2, scheme=scheme)
    train(straight, opt, 7)

    first = problem.model(2)
    opt = create_odelora_optimizer(first, lr=0.2, scheme=scheme)
    train(first, opt, 3)
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt")
    resumed = problem.model(2)
    resumed.load_state_dict(saved["model"])
    opt = create_odelora_optimizer(resumed, lr=0.2, scheme=scheme)
    opt.load_state_dict(saved["opt"])
    train(resumed, opt, 4)
    assert torch.equal(problem.weight(resumed), problem.weight(straight))


def test_non_lora_parameters_take_plain_steps():
    model = get_peft_model(build("bert"), LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    opt = create_odelora_optimizer(model, lr=0.05, other_lr=0.1)
    head = next(p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad and p.dim() == 2)
    before = head.detach().clone()
    output(model, inputs("bert")).sum().backward()
    grad = head.grad.clone()
    opt.step()
    torch.testing.assert_close(head.detach(), before - 0.1 * (1 / 5) * grad)  # first warm-up step: lr / 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"scheme": "rk5"}, "Unknown scheme"), ({"lr": 0.0}, "positive"), ({"lr": -1.0}, "positive")],
)
def test_bad_arguments(kwargs, message):
    model = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=message):
        create_odelora_optimizer(model, **{"lr": 0.1, **kwargs})


def test_model_without_lora_and_rk_without_closure():
    from peft_ctrl import StateCtrlConfig

    with pytest.raises(ValueError, match="no trainable LoRA layer"):
        create_odelora_optimizer(get_peft_model(build("llama"), StateCtrlConfig(r=2)), lr=0.1)
    model = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    opt = create_odelora_optimizer(model, lr=0.1, scheme="heun")
    output(model, inputs("llama")).sum().backward()
    with pytest.raises(ValueError, match="needs step\\(closure\\)"):
        opt.step()


def test_a_blow_up_raises_and_leaves_the_parameters_unchanged():
    problem = SensingProblem.make(10, 10, 2, 10.0, 200)
    model = problem.model(2)
    opt = create_odelora_optimizer(model, lr=1e150, warmup_steps=0)
    for _ in range(6):
        opt.zero_grad()
        problem.loss(model).backward()
        try:
            before = copy.deepcopy([p.detach().clone() for p in model.parameters() if p.requires_grad])
            opt.step()
        except FloatingPointError as err:
            assert "lower lr" in str(err)
            after = [p.detach() for p in model.parameters() if p.requires_grad]
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
            return
    pytest.fail("a step of 1e30 should not stay finite")


def test_partitioned_or_wrapped_factors_are_refused():
    model = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    factor = next(p for n, p in model.named_parameters() if "lora_A" in n)
    factor.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    with pytest.raises(ValueError, match="ZeRO stage 3.*without DeepSpeed in a single process"):
        create_odelora_optimizer(model, lr=0.1)
    del factor.ds_id

    opt = create_odelora_optimizer(model, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in opt.param_groups[0]["params"]])
    opt.param_groups[0]["params"] = [flat]  # what ZeRO-1/2 does to a client optimizer
    output(model, inputs("llama")).sum().backward()
    with pytest.raises(RuntimeError, match="replaced.*without DeepSpeed in a single process"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("scheme", ["euler", "heun", "rk4"])
def test_step_with_a_closure_evaluates_it_first_like_torch_optim(scheme):
    """``closure`` zeroes the gradients, runs forward and backward and returns the loss; no backward before step."""
    problem = SensingProblem.make(12, 12, 2, 10.0, 150)
    model = problem.model(2)
    opt = create_odelora_optimizer(model, lr=0.5, scheme=scheme)
    calls = []

    def closure():
        opt.zero_grad()
        loss = problem.loss(model)
        loss.backward()
        calls.append(float(loss.detach()))
        return loss

    start = problem.error(model)
    for step in range(40):
        before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
        loss = opt.step(closure)
        assert float(loss.detach()) == calls[-opt.evaluations_per_step]  # the loss at the start point, as torch.optim
        assert any(not torch.equal(a, b) for a, b in zip(before, opt.param_groups[0]["params"], strict=True)), step
    assert len(calls) == 40 * opt.evaluations_per_step
    assert problem.error(model) < 0.5 * start


def test_step_without_gradients_or_closure_is_an_error_and_changes_nothing():
    model = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    opt = create_odelora_optimizer(model, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="no gradient.*backward.*closure"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
