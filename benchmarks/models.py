"""Models the benchmarks quantize. Plain nn.Modules, no graphquant imports."""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu, conv-bn, add shortcut, relu.

    The shortcut is identity when shape is kept, else a 1x1 conv-bn projection.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv-bn-relu, four basic blocks (32-32-64-128), avgpool, linear to 10.

    On a 3x64x64 input the feature maps are 32x32 (stem, block 1), 16x16 (block 2)
    and 8x8 (blocks 3, 4).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.layer1 = BasicBlock(32, 32)
        self.layer2 = BasicBlock(32, 64, stride=2)
        self.layer3 = BasicBlock(64, 128, stride=2)
        self.layer4 = BasicBlock(128, 128)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.pool(x)))


def make_small_resnet(seed: int = 0) -> SmallResNet:
    """A SmallResNet in eval mode whose batch-norms are not the identity.

    Fresh batch-norms (mean 0, var 1, weight 1, bias 0) fold away to nothing, which
    would flatter the int8 numbers; random affine terms and running statistics
    gathered on random data give each fold real work to do.
    """
    torch.manual_seed(seed)  # default (Kaiming) init of the convolutions and the linear
    generator = torch.Generator().manual_seed(seed)
    model = SmallResNet()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.2, 0.2, generator=generator)
                module.momentum = None  # cumulative average over the warm-up batches
        model.train()
        for _ in range(8):
            model(torch.randn(16, 3, 64, 64, generator=generator))
    return model.eval()
