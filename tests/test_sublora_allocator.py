"""The submodular allocator: sign convention, projection, greedy against brute force, stated guarantee."""

import itertools
import math

import pytest
import torch

from peft_ctrl.sublora.allocator import (
    brute_force_select,
    curvature_model,
    greedy_select,
    is_monotone,
    is_submodular,
    project_submodular,
    utility,
)


def instance(d: int, seed: int, scale_off: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    lam = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    grad = torch.randn(d, generator=g, dtype=torch.float64)
    R = torch.randn(d, d, generator=g, dtype=torch.float64)
    hess = R @ R.T / d * scale_off + torch.diag(torch.rand(d, generator=g, dtype=torch.float64))
    return curvature_model(lam, grad, hess)


def keep_of(d: int, subset) -> torch.Tensor:
    keep = torch.zeros(d, dtype=torch.bool)
    keep[list(subset)] = True
    return keep


@pytest.mark.parametrize("seed", range(20))
def test_second_difference_is_minus_h_and_projection_makes_it_submodular(seed):
    g, H = instance(7, seed)
    for raw, projected in ((H, False), (project_submodular(H), True)):
        violations = 0
        for i, j in itertools.combinations(range(7), 2):
            rest = [k for k in range(7) if k not in (i, j)]
            for size in range(len(rest) + 1):
                for S in itertools.combinations(rest, size):
                    F = [utility(g, raw, keep_of(7, (*S, *extra))) for extra in ((), (i,), (j,), (i, j))]
                    second = F[3] - F[1] - F[2] + F[0]
                    assert math.isclose(second, -raw[i, j].item(), abs_tol=1e-9)
                    violations += second > 1e-12
        if projected:
            assert violations == 0 and is_submodular(raw)
        elif not is_submodular(raw):
            assert violations > 0


def test_projection_is_the_nearest_submodular_matrix():
    _, H = instance(6, 0)
    P = project_submodular(H)
    torch.testing.assert_close(P.diagonal(), H.diagonal())
    off = ~torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(P[off], H[off].clamp(min=0))
    g = torch.Generator().manual_seed(1)
    for _ in range(50):  # no other symmetric matrix with off-diagonals >= 0 is closer
        Q = P + 0.1 * torch.randn(6, 6, generator=g, dtype=torch.float64)
        Q = (Q + Q.T) / 2
        Q[off] = Q[off].clamp(min=0)
        assert torch.linalg.matrix_norm(Q - H) >= torch.linalg.matrix_norm(P - H) - 1e-12


@pytest.mark.parametrize("seed", range(30))
def test_greedy_is_exact_on_modular_instances(seed):
    g, H = instance(10, seed)
    H = torch.diag(H.diagonal())
    for budget in (1, 4, 7):
        greedy = greedy_select(g, H, budget)
        assert int(greedy.sum()) == budget
        assert math.isclose(utility(g, H, greedy), utility(g, H, brute_force_select(g, H, budget)), abs_tol=1e-9)


def test_greedy_meets_its_guarantee_on_every_monotone_submodular_instance_and_matches_brute_force_mostly():
    checked = matched = 0
    for seed, d in itertools.product(range(60), (8, 10, 12)):
        g, H = instance(d, seed, scale_off=0.3)
        H = project_submodular(H)
        g = -g.abs() * (seed % 3)  # g_i <= 1/2 H_ii keeps every removal costly: monotone (seed % 3 == 0: g = 0)
        if not is_monotone(g, H):
            continue
        for budget in (2, d // 2):
            greedy, best = greedy_select(g, H, budget), brute_force_select(g, H, budget)
            empty = utility(g, H, torch.zeros(d, dtype=torch.bool))
            f_greedy, f_best = utility(g, H, greedy) - empty, utility(g, H, best) - empty
            assert f_greedy >= (1 - 1 / math.e) * f_best - 1e-9
            checked += 1
            matched += math.isclose(f_greedy, f_best, rel_tol=1e-9, abs_tol=1e-12)
    assert checked > 100
    assert matched / checked > 0.8, (matched, checked)


def test_greedy_respects_alive_components_and_the_budget_exactly():
    g, H = instance(9, 3)
    H = project_submodular(H)
    alive = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    keep = greedy_select(g, H, 4, alive)
    assert int(keep.sum()) == 4 and not (keep & ~alive).any()
    assert torch.equal(greedy_select(g, H, 6, alive), alive)


@pytest.mark.parametrize(("budget", "message"), [(-1, "between 0"), (10, "between 0")])
def test_bad_budget_and_nan_curvature(budget, message):
    g, H = instance(9, 0)
    with pytest.raises(ValueError, match=message):
        greedy_select(g, H, budget)
    H[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        greedy_select(g, H, 3)
