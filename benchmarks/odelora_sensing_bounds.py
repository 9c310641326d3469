"""What any fixed-step integrator of the projected gradient flow can reach on the sensing benchmark.

    python benchmarks/odelora_sensing_bounds.py     # about 20 seconds; run after odelora_sensing.py

Near the solution, every method of ``odelora_sensing.py`` that follows the projected gradient flow
(ODELoRA's schemes, ScaledGD, LoRA-Pro) moves W on the tangent space T of the rank-r manifold at W*, where
the loss is the quadratic 1/2 e^T H e with H = Q^T X^T X Q (Q an orthonormal basis of T, X the sensing
operator). One step of size lr multiplies each eigencomponent of the error by R(lr * lambda), where R is
the scheme's stability polynomial: 1 - z (Euler), 1 - z + z^2/2 (Heun), the degree-4 Taylor polynomial
(RK4). So H's extreme eigenvalues bound, for each scheme, the largest stable lr and the best rate per
gradient evaluation that a fixed lr can give; the Chebyshev rate (sqrt(c) - 1) / (sqrt(c) + 1),
c = lambda_max / lambda_min, is what momentum (an accelerated, second-order flow) could give instead.
The script prints these bounds next to the measured figures from docs/results/odelora_sensing.json and
writes docs/results/odelora_sensing_bounds.md.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from _common import parser, write_results

from peft_ctrl_app.sensing import SensingProblem

TARGET = 1e-6
SCHEMES = {  # stability polynomial coefficients (lowest degree first) and evaluations per step
    "euler": ([1, -1], 1),
    "heun": ([1, -1, 1 / 2], 2),
    "rk4": ([1, -1, 1 / 2, -1 / 6, 1 / 24], 4),
}
MEASURED = {"euler": "odelora-euler", "heun": "odelora-heun", "rk4": "odelora-rk4"}


def tangent_spectrum(problem: SensingProblem, rank: int) -> tuple[float, float]:
    """Extreme eigenvalues of the loss Hessian restricted to the tangent space at W*."""
    m, n = problem.W_star.shape
    U, _, Vh = torch.linalg.svd(problem.W_star)
    U, V = U[:, :rank], Vh[:rank].T
    # T = {U Y^T + Z V^T}: spanned by u_i e_j^T and e_k v_i^T, of dimension (m + n - r) r; with W
    # flattened row by row these are the columns of kron(u_i, I_n) and kron(I_m, v_i).
    U, V = U.contiguous(), V.contiguous()
    spanning = [torch.kron(U[:, i : i + 1], torch.eye(n, dtype=U.dtype)) for i in range(rank)]
    spanning += [torch.kron(torch.eye(m, dtype=U.dtype), V[:, i : i + 1]) for i in range(rank)]
    basis, s, _ = torch.linalg.svd(torch.cat(spanning, dim=1), full_matrices=False)
    basis = basis[:, : (m + n - rank) * rank]
    assert s[(m + n - rank) * rank - 1] > 1e-8
    eig = torch.linalg.eigvalsh((problem.X @ basis).T @ (problem.X @ basis))
    return float(eig[0]), float(eig[-1])


def stability_limit(coeffs: list[float]) -> float:
    """Largest z such that |R(x)| <= 1 on all of [0, z]."""
    z = np.linspace(0, 4, 400_001)
    ok = np.abs(np.polynomial.polynomial.polyval(z, coeffs)) <= 1 + 1e-12
    return float(z[np.argmin(ok)] if not ok.all() else z[-1])


def best_fixed_rate(coeffs: list[float], evals: int, lo: float, hi: float) -> tuple[float, float]:
    """The lr minimising max over lambda in [lo, hi] of |R(lr lambda)|, and that rate per evaluation."""
    best = (math.inf, 0.0)
    for lr in np.linspace(1e-3, stability_limit(coeffs) / hi, 4000):
        z = lr * np.linspace(lo, hi, 2001)
        rate = float(np.abs(np.polynomial.polynomial.polyval(z, coeffs)).max()) ** (1 / evals)
        best = min(best, (rate, float(lr)))
    return best[1], best[0]


def evaluations(rate: float) -> float:
    return math.log(TARGET) / math.log(rate)


def main() -> None:
    args = parser(__doc__).parse_args()
    measured = json.loads((args.out / "odelora_sensing.json").read_text())
    problem = SensingProblem.make(100, 100, 4, 100, 2000)  # the benchmark's kappa = 100 problem
    lo, hi = tangent_spectrum(problem, 4)
    c = hi / lo

    lines = [
        "Local analysis at W* (kappa 100, m = n = 100, rank 4, 2000 measurements): the loss Hessian on the "
        f"tangent space has eigenvalues in [{lo:.3f}, {hi:.3f}] (condition number {c:.1f}).",
        "",
        "| scheme | largest stable lr (bound) | largest converging lr (measured) | best fixed-lr rate per eval "
        "(bound) | evaluations to 1e-6 at that rate | measured evaluations (rate) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for scheme, (coeffs, evals) in SCHEMES.items():
        name = MEASURED[scheme]
        converged = [r["lr"] for r in measured["tuning"][name] if r["converged"]]
        run = measured["sweep"][name]["100"]
        _, rate = best_fixed_rate(coeffs, evals, lo, hi)
        lines.append(
            f"| {scheme} | {stability_limit(coeffs) / hi:.3f} | {max(converged):g} | {rate:.4f} | "
            f"{evaluations(rate):.0f} | {run['evaluations']} ({run['rate_per_evaluation']:.4f}) |"
        )
    scaled = measured["sweep"]["scaledgd"]["100"]
    scaled_lr = max(r["lr"] for r in measured["tuning"]["scaledgd"] if r["converged"])
    chebyshev = (math.sqrt(c) - 1) / (math.sqrt(c) + 1)
    euler_lr_limit = stability_limit(SCHEMES["euler"][0]) / hi
    rk4_lr_limit = stability_limit(SCHEMES["rk4"][0]) / hi
    lines += [
        "",
        f"ScaledGD measured: {scaled['evaluations']} evaluations (rate {scaled['rate_per_evaluation']:.4f}), "
        f"largest converging lr {scaled_lr:g}; as a first-order step on the same tangent quadratic it has "
        f"Euler's bounds.",
        f"The 0.8x target asks for <= {0.8 * scaled['evaluations']:.0f} evaluations, a rate per evaluation of "
        f"<= {TARGET ** (1 / (0.8 * scaled['evaluations'])):.4f} from error 1.",
        f"RK4's stable lr is at most {rk4_lr_limit / euler_lr_limit:.2f}x Euler's (and ScaledGD's) on this "
        f"quadratic, whatever the problem: the ratio of the polynomials' stability limits.",
        f"Chebyshev (accelerated) rate per evaluation: {chebyshev:.4f}, {evaluations(chebyshev):.0f} evaluations.",
    ]
    write_results(args.out, "odelora_sensing_bounds", "\n".join(lines))


if __name__ == "__main__":
    main()
