import torch
from torch import nn

from peft_ctrl.metrics import SavedTensorMeter, saved_activation_bytes


def test_counts_exact_bytes_of_a_known_op():
    x = torch.randn(10, 20, requires_grad=True)
    # exp saves its output: 10 * 20 float32
    assert saved_activation_bytes(lambda: x.exp().sum().backward()) == 10 * 20 * 4


def test_one_storage_saved_twice_counts_once():
    x = torch.randn(50, requires_grad=True)
    # sin and cos both save x; x[:10] is a view of the same storage
    assert saved_activation_bytes(lambda: (x.sin() + x.cos() + x[:10].sin().sum()).sum().backward()) == 50 * 4


def test_parameters_and_excluded_modules_are_not_activations():
    lin = nn.Linear(8, 8, bias=False).requires_grad_(False)
    x = torch.randn(4, 8, requires_grad=True)
    # Frozen weight, input needs grad: only the weight is saved, and it is a parameter.
    assert saved_activation_bytes(lambda: lin(x).sum().backward()) == 0
    buf = torch.randn(4, 8)
    assert saved_activation_bytes(lambda: (x * buf).sum().backward(), exclude=[buf]) == 0
    assert saved_activation_bytes(lambda: (x * buf).sum().backward()) == 4 * 8 * 4


def test_freed_and_reused_memory_is_not_deduplicated_away():
    x = torch.randn(1000, requires_grad=True)

    def step():
        for _ in range(3):
            x.exp().sum().backward()  # each output is freed after its backward

    with SavedTensorMeter() as meter:
        step()
    assert meter.num_storages == 3 and meter.total_bytes == 3 * 1000 * 4
    # The storages are released when the meter exits; the figure stays.
    assert meter.total_bytes == 3 * 1000 * 4
