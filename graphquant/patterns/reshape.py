"""Value-preserving shape ops (flatten, reshape, view) run on uint8 with their input's qparams.

``flatten`` and most ``reshape`` calls reach the graph as ``aten.view``. On uint8 they
lower to ``aten.reshape``: int8 convs return channels-last tensors, which ``view``
cannot always reinterpret, while ``reshape`` gives the same values either way.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import fx, nn

from graphquant.graph import Match
from graphquant.patterns.context import KernelContext, QValue
from graphquant.patterns import Pattern, aten, register
from graphquant.quant_math import QParams


def _lower_reshape(ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams) -> fx.Node:
    return ctx.call(aten.reshape.default, (inputs[0].node, *match.anchor.args[1:]))


class _ConvFlattenLinear(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.how == "flatten":
            y = torch.flatten(y, 1)
        elif self.how == "reshape":
            y = y.reshape(y.shape[0], -1)
        else:
            y = y.view(y.shape[0], -1)
        return self.fc(y)


def _examples() -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    return [(_ConvFlattenLinear(how), (torch.randn(1, 3, 8, 8),)) for how in ("flatten", "reshape", "view")]


register(Pattern("reshape", ((aten.view.default, aten._unsafe_view.default, aten.reshape.default),),
                 "shares_qparams", "aten.reshape", _lower_reshape, _examples))  # fmt: skip
