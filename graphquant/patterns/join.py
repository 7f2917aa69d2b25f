"""``cat`` and ``stack`` of quantized tensors -> ``graphquant::qcat`` / ``graphquant::qstack``.

The tensor list is the activation argument (``activation_inputs`` flattens it); every
input is observed and the output gets one scale of its own. The kernel requantizes each
uint8 input to that scale (an input that already has it is copied as is) and joins.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn

from graphquant.graph import Match, activation_inputs, op_args
from graphquant.patterns import LowerKernel, Pattern, aten, register
from graphquant.patterns.context import KernelContext, QValue
from graphquant.quant_math import QParams


def _lower(kernel: torch._ops.OpOverload) -> LowerKernel:
    def lower_kernel(ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams) -> fx.Node:
        by_node = dict(zip(activation_inputs(match), inputs, strict=True))  # cat([x, x]): one input, listed twice
        tensors, dim = op_args(match.anchor)[:2]
        values = [by_node[t] for t in tensors]
        scales = [v.qparams.scalar()[0] for v in values]
        zero_points = [v.qparams.scalar()[1] for v in values]
        out_scale, out_zero_point = out.scalar()
        return ctx.call(kernel, ([v.node for v in values], scales, zero_points, dim, out_scale, out_zero_point))

    return lower_kernel


class _Join(nn.Module):
    """Two conv branches with different ranges, joined along channels; ``stack`` adds a dim."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv1(x), 2 * self.conv2(x)  # a different range, so the kernel really requantizes
        if self.how == "cat":
            return torch.cat([a, b, a], dim=1)
        return torch.stack([a, b], dim=-1)


def _examples(how: str):  # type: ignore[no-untyped-def]
    def examples() -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
        return [(_Join(how), (torch.randn(1, 3, 6, 6),))]

    return examples


register(Pattern("cat", ((aten.cat.default,),), "general", "graphquant.qcat",
                 _lower(torch.ops.graphquant.qcat.default), _examples("cat")))
register(Pattern("stack", ((aten.stack.default,),), "general", "graphquant.qstack",
                 _lower(torch.ops.graphquant.qstack.default), _examples("stack")))
