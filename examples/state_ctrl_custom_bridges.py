"""State-ctrl on a plain PyTorch model (no transformers config): name the bridges yourself.

    python examples/state_ctrl_custom_bridges.py    # a few seconds

A bridge is a (head, tail) pair of module paths relative to one block: the control reads the input of
`head` and is added to the output of `tail`. Here each residual block computes x + ff(norm(x)), so the
bridge is ("norm", "ff"): out = x + ff(norm(x)) + B A x.
"""

import torch
from peft import get_peft_model
from torch import nn

from peft_ctrl import StateCtrlConfig


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff(self.norm(x))


class Net(nn.Module):
    def __init__(self, d: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.out = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def main() -> None:
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(256, 32)
    y = torch.sin(x[:, :4].sum(1, keepdim=True))  # a target the frozen random net does not fit
    try:
        get_peft_model(Net(), StateCtrlConfig(r=8))
    except ValueError as err:
        print("without bridges:", str(err)[:120], "...")
    model = get_peft_model(
        net, StateCtrlConfig(r=8, bridges=[("norm", "ff")], layers_to_transform=[1, 2, 3], layers_pattern="blocks")
    )
    model.print_trainable_parameters()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(301):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            print(f"step {step:3d}  mse {loss.item():.4f}")
    with model.disable_adapter():
        print(f"base model mse {nn.functional.mse_loss(model(x), y).item():.4f}")


if __name__ == "__main__":
    main()
