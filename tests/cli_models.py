"""A small model, data and an evaluation function for the command-line tests (tests/test_cli.py).

The CLI names them as specs: ``cli_models:make_model``, ``cli_models:calibration``,
``cli_models:agreement`` (with ``tests/`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import torch
from torch import nn


class SmallNet(nn.Module):
    """conv -> relu -> conv -> relu -> flatten -> linear, and a submodule forward never calls
    (a qconfig_dict key for it matches no node)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(8 * 6 * 6, 10)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(torch.flatten(x, 1))


def make_model() -> SmallNet:
    torch.manual_seed(0)
    return SmallNet().eval()


def calibration() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 6, 6, generator=g) for _ in range(3)]


def held_out() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(8, 3, 6, 6, generator=g) for _ in range(2)]


def agreement(model: nn.Module) -> float:
    """Fraction of held-out inputs where ``model`` and the float model pick the same class."""
    reference = make_model()
    with torch.no_grad():
        hits = [(model(x).argmax(1) == reference(x).argmax(1)).float().mean() for x in held_out()]
    return float(sum(hits) / len(hits))


def not_a_model() -> int:
    return 3


def worst_for_int8(model: nn.Module) -> float:
    """Minus the largest output difference from the float model: 0 only for the float model."""
    reference = make_model()
    with torch.no_grad():
        return -max(float((model(x) - reference(x)).abs().max()) for x in held_out())
