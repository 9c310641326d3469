"""peft_ctrl.factors: the factor-pair algebra shared by ODELoRA, SubLoRA and SEAL."""

import pytest
import torch

from peft_ctrl.factors import balanced_split, product_svd, work_dtype


@pytest.mark.parametrize(("m", "n", "r"), [(12, 9, 3), (5, 40, 5), (30, 30, 1)])
def test_product_svd_is_the_svd_of_the_product(m, n, r):
    g = torch.Generator().manual_seed(m + n + r)
    B, A = torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64)
    U, S, Vh = product_svd(B, A)
    assert U.shape == (m, r) and S.shape == (r,) and Vh.shape == (r, n)
    torch.testing.assert_close(U * S @ Vh, B @ A)
    torch.testing.assert_close(U.T @ U, torch.eye(r, dtype=torch.float64))
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(r, dtype=torch.float64))
    torch.testing.assert_close(S, torch.linalg.svdvals(B @ A)[:r])


def test_balanced_split_keeps_the_product_and_equalises_the_grams():
    g = torch.Generator().manual_seed(0)
    B, A = (
        torch.randn(10, 3, generator=g, dtype=torch.float64) * 5,
        torch.randn(3, 7, generator=g, dtype=torch.float64),
    )
    new_B, new_A = balanced_split(*product_svd(B, A))
    torch.testing.assert_close(new_B @ new_A, B @ A)
    torch.testing.assert_close(new_B.T @ new_B, new_A @ new_A.T)


def test_low_precision_factors_are_worked_in_fp32():
    assert work_dtype(torch.zeros(1, dtype=torch.bfloat16)) == torch.float32
    assert work_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64
    U, S, Vh = product_svd(torch.randn(6, 2, dtype=torch.bfloat16), torch.randn(2, 4, dtype=torch.bfloat16))
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
