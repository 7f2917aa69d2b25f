"""conv1d / conv2d / conv3d (grouped and depthwise too), alone and fused with what oneDNN
fuses after them -> ``graphquant::qconvNd``:

- an activation: relu; relu6 / hardtanh / clamp (the "hardtanh" post-op with its bounds);
  hardswish. The kernel applies it to the real value before its one rounding.
- a residual add of a uint8 activation of the output's shape, alone or followed by relu
  (ResNet's ``out += identity; relu(out)``) -> ``graphquant::qconvNd_add``, 1-d and 2-d
  (oneDNN's "sum" post-op has no 3-d form; conv3d + add stays a conv3d and an add).

``aten.convNd(x, w, b, stride, padding, dilation, groups)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphquant.graph import Match, op_args
from graphquant.patterns import Pattern, aten, register
from graphquant.patterns.context import KernelContext, QValue, x_qmax_kwarg
from graphquant.patterns.post_ops import HARDSWISH, HARDTANH, RELU, fused_post_op
from graphquant.quant_math import QParams

_CONVS = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}
_ADD = (aten.add.Tensor,)
_JOIN = ((1, 0), (1, 1))  # add(conv, other) or add(other, conv): other is the second input
Examples = list[tuple[nn.Module, tuple[torch.Tensor, ...]]]


def _conv_args(ctx: KernelContext, match: Match, x: QValue) -> tuple[object, ...]:
    """``x, x_scale, x_zero_point, w, w_scale, bias, stride, padding, dilation, groups`` of a kernel call."""
    _, _, _, stride, padding, dilation, groups = op_args(match.anchor)
    x_scale, x_zero_point = x.qparams.scalar()
    w = ctx.conv_weight(match, x_scale, x_zero_point, list(stride), list(padding), list(dilation), groups)
    return (x.node, x_scale, x_zero_point, w.packed, w.scale, w.bias, list(stride), list(padding), list(dilation),
            groups)


def _lower(dim: int):  # type: ignore[no-untyped-def]
    kernel = getattr(torch.ops.graphquant, f"qconv{dim}d").default

    def lower_kernel(ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams) -> fx.Node:
        name, scalars = fused_post_op(match)
        return ctx.call(kernel, (*_conv_args(ctx, match, inputs[0]), *out.scalar(), name, scalars),
                        x_qmax_kwarg(inputs[0]))

    return lower_kernel


def _lower_add(dim: int):  # type: ignore[no-untyped-def]
    kernel = getattr(torch.ops.graphquant, f"qconv{dim}d_add").default

    def lower_kernel(ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams) -> fx.Node:
        if op_args(match.nodes[1])[2] != 1:
            # add(a, b, alpha) scales b, maybe the conv: keep the reference form conv -> add -> quantize
            return ctx.call(torch.ops.graphquant.quantize_per_tensor.default,
                            (match.output, *out.scalar(), out.qmin, out.qmax, out.dtype))
        accum = inputs[-1]  # in conv(x) + x the one input x is also the accum
        post_op = "relu" if len(match.nodes) == 3 else "none"
        return ctx.call(kernel, (*_conv_args(ctx, match, inputs[0]), accum.node, *accum.qparams.scalar(),
                                 *out.scalar(), post_op), x_qmax_kwarg(inputs[0]))

    return lower_kernel


class _Conv(nn.Module):
    def __init__(self, dim: int, act: nn.Module | None = None, channels: tuple[int, int] = (4, 8),
                 **kwargs: int) -> None:
        super().__init__()
        self.conv = getattr(nn, f"Conv{dim}d")(*channels, 3, **kwargs)
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class _Clamp(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "relu6":
            return F.relu6(x)
        if self.how == "hardtanh":
            return F.hardtanh(x, -0.5, 0.5)
        if self.how == "clamp":
            return torch.clamp(x, min=-1.0, max=2.0)
        return torch.clamp_min(x, 0.25)


def _shape(dim: int, channels: int = 4) -> tuple[int, ...]:
    return (1, channels) + ((10,) * dim if dim < 3 else (6, 7, 8))


def _examples(dim: int, act: str | None):  # type: ignore[no-untyped-def]
    def examples() -> Examples:
        if act is None:  # plain, strided without bias, grouped, depthwise
            return [
                (_Conv(dim), (torch.randn(_shape(dim)),)),
                (_Conv(dim, stride=2, padding=1, bias=False), (torch.randn(_shape(dim)),)),
                (_Conv(dim, channels=(4, 6), groups=2, dilation=2), (torch.randn(_shape(dim)),)),
                (_Conv(dim, channels=(8, 8), groups=8, padding=1), (torch.randn(_shape(dim, 8)),)),
            ]
        if act == "relu":
            return [
                (_Conv(dim, nn.ReLU()), (torch.randn(_shape(dim)),)),
                (_Conv(dim, nn.ReLU(inplace=True), stride=2, padding=1, bias=False), (torch.randn(_shape(dim)),)),
            ]
        if act == "hardswish":
            return [(_Conv(dim, nn.Hardswish(), padding=1), (torch.randn(_shape(dim)),))]
        ways = ["relu6", "clamp", "clamp_min"] if dim == 2 else ["relu6" if dim == 1 else "hardtanh"]
        modules: list[nn.Module] = [nn.ReLU6(inplace=True)] if dim == 2 else []
        modules += [_Clamp(how) for how in ways]
        return [(_Conv(dim, m, padding=1), (torch.randn(_shape(dim)),)) for m in modules]

    return examples


class _Residual(nn.Module):
    """The joins a network makes: ``conv(x) + x``; ``a + conv(a)``; ResNet's shortcut conv,
    matched after the conv it joins; an identity read again after the join (a kernel writing
    the sum into its accum would corrupt ``conv_c(a)``)."""

    def __init__(self, dim: int, how: str, relu: bool) -> None:
        super().__init__()
        conv = getattr(nn, f"Conv{dim}d")
        self.conv_a, self.conv_b, self.conv_c = (conv(4, 4, 3, padding=1) for _ in range(3))
        self.how = how
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.how == "input":
            return self.relu(self.conv_a(x) + x)
        a = torch.relu(self.conv_a(x))
        if self.how == "shortcut":
            h = self.conv_b(a)
            h += self.conv_c(x)
            return self.relu(h)
        if self.how == "left":
            return self.relu(a + self.conv_b(a))
        out = self.conv_b(a)
        out += a
        return self.relu(out), self.conv_c(a)


def _examples_add(dim: int, relu: bool):  # type: ignore[no-untyped-def]
    def examples() -> Examples:
        hows = ["input", "shortcut" if relu else "left", "reread"] if dim == 2 else ["input"]
        return [(_Residual(dim, how, relu), (torch.randn(_shape(dim)),)) for how in hows]

    return examples


for _dim, _op in _CONVS.items():
    register(Pattern(f"conv{_dim}d", ((_op,),), "weighted", f"qconv{_dim}d", _lower(_dim),
                     _examples(_dim, None), weight_arg=1, bias_arg=2))
    for _act, _ops in (("relu", RELU), ("hardtanh", HARDTANH), ("hardswish", HARDSWISH)):
        register(Pattern(f"conv{_dim}d_{_act}", ((_op,), _ops), "weighted", f"qconv{_dim}d", _lower(_dim),
                         _examples(_dim, _act), weight_arg=1, bias_arg=2))
for _dim in (1, 2):
    _op = _CONVS[_dim]
    register(Pattern(f"conv{_dim}d_add", ((_op,), _ADD), "weighted", f"qconv{_dim}d_add", _lower_add(_dim),
                     _examples_add(_dim, False), weight_arg=1, bias_arg=2, chain_inputs=_JOIN))
    register(Pattern(f"conv{_dim}d_add_relu", ((_op,), _ADD, RELU), "weighted", f"qconv{_dim}d_add",
                     _lower_add(_dim), _examples_add(_dim, True), weight_arg=1, bias_arg=2,
                     chain_inputs=_JOIN))
