"""Padding runs on uint8 with its input's qparams (kind ``shares_qparams``).

``F.pad``, ``nn.ZeroPad2d``, ``nn.ConstantPadNd``, ``nn.ReflectionPadNd``,
``nn.ReplicationPadNd`` and circular padding all reach the captured graph as ``aten.pad``
(``aten.constant_pad_nd`` never does: capture keeps ``aten.pad`` whole).
Reflect, replicate and circular copy input values, so quantization commutes with them.
Constant padding adds the fill value: on uint8 the fill is that value quantized with the
input's scale and zero point. A fill of 0.0 (the usual one) is exact, since the
zero point represents 0.0 exactly; another fill inside the input's range is within half
a step, as in the reference graph; a fill outside it is clamped to the grid, in both.

TensorFlow-style "same" padding (MobileNet, EfficientNet ports) puts an ``aten.pad``
before nearly every convolution; left in float each one would cost a dequantize, a
float pad and a requantize (with its own, new rounding) between two int8 kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import fx, nn

from graphquant.graph import Match
from graphquant.patterns import Pattern, aten, register
from graphquant.patterns.context import KernelContext, QValue
from graphquant.quant_math import QParams


def quantized_fill(value: float, qparams: QParams) -> int:
    """``value`` on the uint8/int8 grid of ``qparams``: rounded, then clamped to ``[qmin, qmax]``."""
    scale, zero_point = qparams.scalar()
    return int(min(max(round(value / scale) + zero_point, qparams.qmin), qparams.qmax))


def _lower_pad(ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams) -> fx.Node:
    args = list(match.anchor.args) + [None] * (4 - len(match.anchor.args))
    pad = args[1]
    mode = match.anchor.kwargs.get("mode", args[2] if args[2] is not None else "constant")
    value = match.anchor.kwargs.get("value", args[3])
    if mode != "constant":
        return ctx.call(aten.pad.default, (inputs[0].node, pad, mode))
    fill = quantized_fill(0.0 if value is None else float(cast(float, value)), inputs[0].qparams)
    return ctx.call(aten.pad.default, (inputs[0].node, pad, "constant", float(fill)))


class _ConvPadConv(nn.Module):
    """``conv -> pad -> conv``: the pad runs between two int8 kernels, on the first's uint8 output."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)
        self.how = how
        self.zero = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        if self.how == "same":
            y = self.zero(y)  # TF "same" padding: one more at the end
        elif self.how == "constant":
            y = nn.functional.pad(y, (1, 1, 2, 0), value=0.25)
        else:
            y = nn.functional.pad(y, (1, 1, 1, 1), mode=self.how)
        return self.conv2(y)


def _examples() -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    return [(_ConvPadConv(how), (torch.randn(1, 3, 10, 10),))
            for how in ("same", "constant", "reflect", "replicate", "circular")]


register(Pattern("pad", ((aten.pad.default,),), "shares_qparams", "aten.pad", _lower_pad, _examples,
                 doc="constant fill quantized with the input's qparams; reflect/replicate/circular copy"))
