"""Dynamic linear (``nn.Linear``, ``F.linear``, ``matmul`` with a constant weight) ->
``graphquant::qlinear_dynamic``; float16 weights -> ``graphquant::linear_fp16``.

The weight is quantized once at convert time; the activation is quantized per batch
inside the kernel (uint8 per tensor, or int8 per token). Output is float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn

from graphquant.graph import Match
from graphquant.kernels import x86
from graphquant.patterns import Pattern, aten, register
from graphquant.patterns.context import KernelContext, QValue
from graphquant.qconfig import activation_qmax, asymmetric_one_sided
from graphquant.quant_math import QParams

# float ops whose outputs are one-sided (or nearly: GELU >= -0.17, SiLU >= -0.28, hardswish >= -0.38)
_ONE_SIDED = {aten.relu.default, aten.relu_.default, aten.gelu.default, aten.silu.default, aten.hardswish.default,
              aten.sigmoid.default, aten.relu6.default}


def asymmetric_rows(match: Match, x: object) -> bool:
    """Whether a per-token dynamic linear quantizes its input ``x`` as asymmetric uint8 rows: ``x``
    is one-sided (:data:`_ONE_SIDED`, or a hardtanh from 0) and the qconfig keeps the default
    (qconfig.get_default_dynamic_qconfig's ``one_sided_rows``)."""
    if not asymmetric_one_sided(match.qconfig.activation) or not isinstance(x, fx.Node) or x.op != "call_function":
        return False
    if x.target is aten.hardtanh.default:
        return len(x.args) > 1 and isinstance(x.args[1], (int, float)) and x.args[1] >= 0
    return x.target in _ONE_SIDED


def _lower_kernel(ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams) -> fx.Node:
    x = inputs[0].node
    if match.qconfig.weight.dtype == torch.float16:
        w = ctx.fp16_weight(match)
        return ctx.call(torch.ops.graphquant.linear_fp16.default, (x, w.packed, w.bias))
    w = ctx.linear_weight(match)
    per_token = match.qconfig.activation.observer == "dynamic_per_token"
    qmax = activation_qmax(match.qconfig.activation, ctx.backend == "onednn" and x86.saturates())
    kwargs: dict[str, object] = {"x_qmax": qmax} if qmax < 255 else {}
    if per_token and asymmetric_rows(match, x):
        kwargs["asymmetric"] = True
    return ctx.call(torch.ops.graphquant.qlinear_dynamic.default, (x, w.packed, w.scale, w.bias, per_token), kwargs)


class _Linear(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class _MatmulWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.w)


def _examples() -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    return [
        (_Linear(), (torch.randn(1, 16),)),
        (_Linear(bias=False), (torch.randn(2, 5, 16),)),
        (_MatmulWeight(), (torch.randn(3, 16),)),
    ]


register(Pattern("dynamic_linear", ((aten.linear.default,),), "dynamic", "qlinear_dynamic", _lower_kernel,
                 _examples, weight_arg=1, bias_arg=2,
                 doc="linear with int8 weights and per-batch activation qparams"))
