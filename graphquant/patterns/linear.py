"""linear (``nn.Linear``, ``F.linear``), alone and fused with a following activation ->
``graphquant::qlinear``.

oneDNN's ``qlinear_pointwise`` applies each of these to the real value before its one
rounding (all checked on torch 2.13): relu; relu6 / hardtanh / clamp ("hardtanh" with its
bounds); hardswish; silu; gelu, exact or tanh-approximated; leaky_relu.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphquant.graph import Match
from graphquant.patterns import Pattern, aten, register
from graphquant.patterns.context import KernelContext, QValue, x_qmax_kwarg
from graphquant.patterns.post_ops import GELU, HARDSWISH, HARDTANH, LEAKY_RELU, RELU, SILU, fused_post_op
from graphquant.quant_math import QParams


def _lower_kernel(ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams | None) -> fx.Node:
    """``qlinear``; with ``out=None`` (only float ops read the result) it returns float32."""
    x = inputs[0]
    x_scale, x_zero_point = x.qparams.scalar()
    w = ctx.linear_weight(match)
    name, scalars = fused_post_op(match)
    if out is None:
        args = (x.node, x_scale, x_zero_point, w.packed, w.scale, w.bias, 1.0, 0, name, scalars, True)
        return ctx.call(torch.ops.graphquant.qlinear.default, args, x_qmax_kwarg(x))
    return ctx.call(
        torch.ops.graphquant.qlinear.default,
        (x.node, x_scale, x_zero_point, w.packed, w.scale, w.bias, *out.scalar(), name, scalars),
        x_qmax_kwarg(x),
    )


class _Linear(nn.Module):
    def __init__(self, act: nn.Module | None, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8, bias=bias)
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class _Functional(nn.Module):
    """``F.linear`` with a functional activation after it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 16) / 4)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.how == "clamp":
            return torch.clamp(y, -0.5, 1.0)
        if self.how == "gelu_tanh":
            return F.gelu(y, approximate="tanh")
        return F.leaky_relu(y, 0.2, inplace=True)


def _examples(*modules: nn.Module | str | None):  # type: ignore[no-untyped-def]
    """First module with a bias on a 2-d input, the rest without on a 3-d input."""

    def examples() -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
        out: list[tuple[nn.Module, tuple[torch.Tensor, ...]]] = []
        for i, m in enumerate(modules):
            module = _Functional(m) if isinstance(m, str) else _Linear(m, bias=i == 0)
            out.append((module, (torch.randn(1, 16) if i == 0 else torch.randn(1, 5, 16),)))
        return out

    return examples


_LINEAR = (aten.linear.default,)
_FUSED = (
    ("relu", RELU, _examples(nn.ReLU(), nn.ReLU(inplace=True))),
    ("hardtanh", HARDTANH, _examples(nn.ReLU6(), "clamp")),
    ("hardswish", HARDSWISH, _examples(nn.Hardswish())),
    ("silu", SILU, _examples(nn.SiLU())),
    ("gelu", GELU, _examples(nn.GELU(), "gelu_tanh")),
    ("leaky_relu", LEAKY_RELU, _examples(nn.LeakyReLU(), "leaky_relu")),
)
register(Pattern("linear", (_LINEAR,), "weighted", "qlinear", _lower_kernel, _examples(None, None),
                 weight_arg=1, bias_arg=2, float_output=True))
for _name, _ops, _ex in _FUSED:
    register(Pattern(f"linear_{_name}", (_LINEAR, _ops), "weighted", "qlinear", _lower_kernel, _ex,
                     weight_arg=1, bias_arg=2, float_output=True))
