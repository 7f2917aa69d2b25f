"""linear (``nn.Linear``, ``F.linear``), alone and fused with relu -> ``graphquant::qlinear``."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import fx, nn

from graphquant.graph import Match
from graphquant.patterns.context import KernelContext, QValue
from graphquant.patterns import Pattern, aten, register
from graphquant.quant_math import QParams


def _lower(post_op: str):  # type: ignore[no-untyped-def]
    def lower_kernel(ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams) -> fx.Node:
        x = inputs[0]
        x_scale, x_zero_point = x.qparams.scalar()
        w = ctx.linear_weight(match)
        out_scale, out_zero_point = out.scalar()
        return ctx.call(
            torch.ops.graphquant.qlinear.default,
            (x.node, x_scale, x_zero_point, w.packed, w.scale, w.bias, out_scale, out_zero_point, post_op),
        )

    return lower_kernel


class _Linear(nn.Module):
    def __init__(self, relu: bool, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8, bias=bias)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.fc(x))


def _examples(relu: bool):  # type: ignore[no-untyped-def]
    def examples() -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
        return [
            (_Linear(relu), (torch.randn(1, 16),)),
            (_Linear(relu, bias=False), (torch.randn(1, 5, 16),)),
        ]

    return examples


_LINEAR = (aten.linear.default,)
register(Pattern("linear", (_LINEAR,), "weighted", "qlinear", _lower("none"), _examples(False),
                 weight_arg=1, bias_arg=2))  # fmt: skip
register(Pattern("linear_relu", (_LINEAR, (aten.relu.default,)), "weighted", "qlinear", _lower("relu"),
                 _examples(True), weight_arg=1, bias_arg=2))  # fmt: skip
