import torch
from models import build, enable_checkpointing, inputs
from peft import get_peft_model
from torch import nn

from peft_ctrl.metrics import SavedTensorMeter, saved_activation_bytes
from peft_ctrl.metrics.memory import checkpointed_layers


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


class SinBlock(nn.Module):
    """sin(sin(sin(x))): saves its input and two intermediates, each one tensor of x's size."""

    def forward(self, x):
        return x.sin().sin().sin()


class Chain(nn.Module):
    def __init__(self, checkpoint: str | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SinBlock() for _ in range(3))
        self.checkpoint = checkpoint

    def forward(self, x):
        for block in self.blocks:
            if self.checkpoint is None:
                x = block(x)
            else:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.checkpoint == "reentrant")
        return x.sum()


def test_peak_under_gradient_checkpointing_matches_the_hand_count():
    """Three blocks of three sines on an n-element input, n * 4 bytes per tensor.

    Without checkpointing all 9 saved tensors are alive at the end of the forward pass: 9 n * 4 bytes.
    With each block checkpointed the forward keeps the 3 block inputs, and the backward recomputes one
    block at a time, which saves its 2 intermediates beyond its input: peak (3 + 2) n * 4 bytes, in both
    checkpoint modes.
    """
    n = 1000
    x = torch.randn(n, requires_grad=True)
    plain = Chain(None)
    assert saved_activation_bytes(lambda: plain(x).backward()) == 9 * n * 4
    x.grad = None
    for mode in ("reentrant", "non-reentrant"):
        model = Chain(mode)
        with SavedTensorMeter(checkpointed=model.blocks) as meter:
            model(x).backward()
        assert meter.outer_bytes == 3 * n * 4, mode
        assert meter.region_bytes == [2 * n * 4] * 3, mode
        assert meter.total_bytes == 5 * n * 4, mode
        # the gradient is the one without checkpointing: measuring changed nothing
        grad = x.grad.clone()
        x.grad = None
        plain(x).backward()
        assert torch.allclose(grad, x.grad)
        x.grad = None


def test_regions_with_dropout_keep_the_random_stream():
    block = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5))
    x = torch.randn(4, 8, requires_grad=True)
    torch.manual_seed(0)
    expected = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    torch.manual_seed(0)
    with SavedTensorMeter(checkpointed=[block]):
        got = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    assert torch.equal(expected, got)


def test_in_backward_pass_tells_forward_from_backward():
    # The meter uses torch's current graph task id; if a torch release changes it, this fails.
    from peft_ctrl.metrics.memory import in_backward_pass

    seen = []
    x = torch.randn(3, requires_grad=True)
    y = x.exp()
    y.register_hook(lambda g: seen.append(in_backward_pass()))
    assert not in_backward_pass()
    y.sum().backward()
    assert seen == [True]


def _llama_step_bytes(config, checkpointing: str | None) -> int:
    model = get_peft_model(build("llama"), config)
    model.train()
    enable_checkpointing(model, checkpointing)
    batch = inputs("llama", seq=16)
    # the meter finds transformers' checkpointed layers by their `gradient_checkpointing` flag
    assert len(checkpointed_layers(model)) == (
        0 if checkpointing is None else len(model.base_model.model.model.layers)
    )
    return saved_activation_bytes(lambda: model(**batch, labels=batch["input_ids"]).loss.backward(), exclude=model)


def test_transformers_checkpointed_layers_are_found_and_both_modes_agree():
    from peft import LoraConfig

    from peft_ctrl import StateCtrlConfig

    for config in (StateCtrlConfig(r=4), LoraConfig(r=4, target_modules="all-linear")):
        plain = _llama_step_bytes(config, None)
        reentrant = _llama_step_bytes(config, "reentrant")
        non_reentrant = _llama_step_bytes(config, "non-reentrant")
        assert reentrant == non_reentrant < plain, (type(config).__name__, plain, reentrant, non_reentrant)
    # the meter sees inside checkpointed layers: the bridge keeps less than LoRA on every linear
    assert _llama_step_bytes(StateCtrlConfig(r=4), "non-reentrant") < _llama_step_bytes(
        LoraConfig(r=4, target_modules="all-linear"), "non-reentrant"
    )
