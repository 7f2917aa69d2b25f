"""Shared models and data for the tests."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


class ConvBnReluNet(nn.Module):
    """The model of the static end-to-end criterion:
    conv -> bn -> relu -> conv -> relu -> flatten -> linear -> relu -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.fc1 = nn.Linear(16 * 8 * 8, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        x = torch.flatten(x, 1)
        return self.fc2(self.relu3(self.fc1(x)))


def make_net(seed: int = 0) -> ConvBnReluNet:
    """An eval-mode net whose batch-norm has non-trivial statistics."""
    torch.manual_seed(seed)
    net = ConvBnReluNet()
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.3, 0.3)
        net.bn1.running_var.uniform_(0.5, 2.0)
        net.bn1.weight.uniform_(0.5, 1.5)
        net.bn1.bias.uniform_(-0.2, 0.2)
    return net.eval()


def calibration_batches(n: int = 4, batch: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(n)]


def run_batches(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """The ``run_fn`` of the seed API: run the model on each batch."""
    with torch.no_grad():
        for b in batches:
            model(b)


@pytest.fixture
def net() -> ConvBnReluNet:
    return make_net()
