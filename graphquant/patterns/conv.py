"""conv1d / conv2d / conv3d, alone and fused with a following relu -> ``graphquant::qconvNd``.

``aten.convNd(x, w, b, stride, padding, dilation, groups)``; oneDNN applies the relu as a
post-op inside the same call.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import fx, nn

from graphquant.graph import Match, op_args
from graphquant.patterns.context import KernelContext, QValue
from graphquant.patterns import Pattern, aten, register
from graphquant.quant_math import QParams

_CONVS = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}
_RELU = (aten.relu.default,)


def _lower(dim: int, post_op: str):  # type: ignore[no-untyped-def]
    kernel = getattr(torch.ops.graphquant, f"qconv{dim}d").default

    def lower_kernel(ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams) -> fx.Node:
        x = inputs[0]
        _, _, _, stride, padding, dilation, groups = op_args(match.anchor)
        x_scale, x_zero_point = x.qparams.scalar()
        w = ctx.conv_weight(match, x_scale, x_zero_point, list(stride), list(padding), list(dilation), groups)
        out_scale, out_zero_point = out.scalar()
        return ctx.call(
            kernel,
            (x.node, x_scale, x_zero_point, w.packed, w.scale, w.bias,
             list(stride), list(padding), list(dilation), groups, out_scale, out_zero_point, post_op),
        )  # fmt: skip

    return lower_kernel


class _Conv(nn.Module):
    def __init__(self, dim: int, relu: bool, **kwargs: int) -> None:
        super().__init__()
        self.conv = getattr(nn, f"Conv{dim}d")(4, 8, 3, **kwargs)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


def _examples(dim: int, relu: bool):  # type: ignore[no-untyped-def]
    def examples() -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
        shape = (1, 4) + (10,) * dim
        return [
            (_Conv(dim, relu), (torch.randn(shape),)),
            (_Conv(dim, relu, stride=2, padding=1, bias=False), (torch.randn(shape),)),
        ]

    return examples


for _dim, _op in _CONVS.items():
    register(Pattern(f"conv{_dim}d", ((_op,),), "weighted", f"qconv{_dim}d", _lower(_dim, "none"),
                     _examples(_dim, False), weight_arg=1, bias_arg=2))  # fmt: skip
    register(Pattern(f"conv{_dim}d_relu", ((_op,), _RELU), "weighted", f"qconv{_dim}d", _lower(_dim, "relu"),
                     _examples(_dim, True), weight_arg=1, bias_arg=2))  # fmt: skip
