"""Pooling, reductions and resizing.

- ``max_pool1/2/3d``, ``amax`` / ``amin`` (and ``max(x)`` / ``min(x)`` over all elements)
  and nearest ``interpolate`` pick input values, and the max of quantized values is the
  quantized max (quantization is monotone): kind ``shares_qparams``, the same op on uint8.
- ``avg_pool1/2/3d``, ``adaptive_avg_pool1/2/3d``, ``mean`` and linear / bilinear
  ``interpolate`` compute new values: kind ``general``, reference form ``dq -> op -> q``
  with the output's own scale. (bicubic and trilinear stay float.)
- ``x.max(dim)``, ``x.min(dim)``, ``x.sort(dim)``, ``topk`` (values and indices) are in
  :mod:`graphquant.patterns.multi_output`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphquant.graph import Match, copy_meta, op_args
from graphquant.patterns import Kind, LowerKernel, Pattern, aten, register
from graphquant.patterns.context import KernelContext, QValue
from graphquant.patterns.reshape import same_op_on_uint8
from graphquant.quant_math import QParams


def _lower_max_pool1d(ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams) -> fx.Node:
    """``max_pool1d`` has no uint8 CPU kernel; ``max_pool2d`` over a unit height does the same."""
    _, kernel, stride, padding, dilation, ceil_mode = op_args(match.anchor)
    stride = stride or kernel  # [] means stride = kernel_size
    graph = ctx.gm.graph
    node = ctx.call(aten.unsqueeze.default, (inputs[0].node, -2))
    for target, args in [
        (aten.max_pool2d.default, ([1, kernel[0]], [1, stride[0]], [0, padding[0]], [1, dilation[0]], ceil_mode)),
        (aten.squeeze.dim, (-2,)),
    ]:
        with graph.inserting_after(node):
            node = graph.call_function(target, (node, *args))
        copy_meta(match.anchor, node)
    return node


def _lower_max_pool_via_float(ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams) -> fx.Node:
    """``max_pool2d/3d`` of the uint8 values converted to float32, converted back: exact, since the
    max commutes with the monotone uint8 -> float32 map. torch 2.13's uint8 kernel refuses
    channels-last input of ResNet's stem size (64x112x112: "Expected input_depth * input_height *
    input_width <= int max") and on a contiguous copy runs a scalar loop with indices: 48 ms for
    ResNet-50's stem pool at batch 8, against 8 ms through float32 (channels-last kept)."""
    graph = ctx.gm.graph
    as_float = ctx.call(aten._to_copy.default, (inputs[0].node,))
    as_float.kwargs = {"dtype": torch.float32}
    with graph.inserting_after(as_float):
        pooled = graph.call_function(cast(Callable[..., Any], match.anchor.target), (as_float, *match.anchor.args[1:]),
                                     dict(match.anchor.kwargs))
    with graph.inserting_after(pooled):
        back = graph.call_function(aten._to_copy.default, (pooled,), {"dtype": torch.uint8})
    for node in (pooled, back):
        copy_meta(match.anchor, node)
    return back


def _lower_full_reduction(ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams) -> fx.Node:
    """``max(x)`` / ``min(x)`` over all elements is ``amax`` / ``amin`` over no dims, which also take ``dim``."""
    amax = match.anchor.target in (aten.amax.default, aten.max.default)
    target = aten.amax.default if amax else aten.amin.default
    return ctx.call(target, (inputs[0].node, *match.anchor.args[1:]))


_Forward = Callable[[torch.Tensor], torch.Tensor]


class _ConvThen(nn.Module):
    """``convNd -> <op>`` on a small random input."""

    def __init__(self, dim: int, forward: _Forward) -> None:
        super().__init__()
        self.conv = getattr(nn, f"Conv{dim}d")(3, 4, 3)
        self.then = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.then(self.conv(x))


_SIZES = {1: (1, 3, 12), 2: (1, 3, 8, 8), 3: (1, 3, 6, 6, 6)}


def _examples(*cases: tuple[int, _Forward]):  # type: ignore[no-untyped-def]
    def examples() -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
        return [(_ConvThen(dim, forward), (torch.randn(_SIZES[dim]),)) for dim, forward in cases]

    return examples


def _row(name: str, ops: tuple[torch._ops.OpOverload, ...], kind: Kind, kernel: str, lower: LowerKernel | None,
         *cases: tuple[int, _Forward]) -> None:
    register(Pattern(name, (ops,), kind, kernel, lower, _examples(*cases)))


_row("max_pool1d", (aten.max_pool1d.default,), "shares_qparams", "aten.max_pool2d", _lower_max_pool1d,
     (1, lambda y: F.max_pool1d(y, 3, 2, 1, ceil_mode=True)))
_row("max_pool2d", (aten.max_pool2d.default,), "shares_qparams", "aten.max_pool2d", _lower_max_pool_via_float,
     (2, lambda y: F.max_pool2d(y, 3, 2, padding=1)))
_row("max_pool3d", (aten.max_pool3d.default,), "shares_qparams", "aten.max_pool3d", _lower_max_pool_via_float,
     (3, lambda y: F.max_pool3d(y, 2)))
_row("amax", (aten.amax.default, aten.max.default), "shares_qparams", "aten.amax", _lower_full_reduction,
     (2, lambda y: y.amax(dim=1) - torch.max(y)))
_row("amin", (aten.amin.default, aten.min.default), "shares_qparams", "aten.amin", _lower_full_reduction,
     (2, lambda y: y.amin(dim=(2, 3), keepdim=True) - y.min()))
_row("avg_pool1d", (aten.avg_pool1d.default,), "general", "aten.avg_pool1d", None,
     (1, lambda y: F.avg_pool1d(y, 3, 2, 1, count_include_pad=False)))
_row("avg_pool2d", (aten.avg_pool2d.default,), "general", "aten.avg_pool2d", None,
     (2, lambda y: F.avg_pool2d(y, 2)))
_row("avg_pool3d", (aten.avg_pool3d.default,), "general", "aten.avg_pool3d", None,
     (3, lambda y: F.avg_pool3d(y, 2, ceil_mode=True)))
_row("adaptive_avg_pool1d", (aten.adaptive_avg_pool1d.default,), "general", "aten.adaptive_avg_pool1d", None,
     (1, lambda y: F.adaptive_avg_pool1d(y, 3)))
_row("adaptive_avg_pool2d", (aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default), "general",
     "adaptive_avg_pool2d", None, (2, lambda y: F.adaptive_avg_pool2d(y, (1, 1))))
_row("adaptive_avg_pool3d", (aten.adaptive_avg_pool3d.default, aten._adaptive_avg_pool3d.default), "general",
     "adaptive_avg_pool3d", None, (3, lambda y: F.adaptive_avg_pool3d(y, 2)))
_row("mean", (aten.mean.dim, aten.mean.default), "general", "aten.mean", None,
     (2, lambda y: y.mean([2, 3]) - y.mean()))
_row("upsample_nearest",
     (aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec, aten.upsample_nearest3d.vec,
      aten._upsample_nearest_exact1d.vec, aten._upsample_nearest_exact2d.vec, aten._upsample_nearest_exact3d.vec),
     "shares_qparams", "upsample_nearest", same_op_on_uint8,
     (2, lambda y: F.interpolate(y, scale_factor=2)),
     (3, lambda y: F.interpolate(y, size=(5, 6, 7), mode="nearest-exact")))
_row("upsample_bilinear2d", (aten.upsample_bilinear2d.vec,), "general", "aten.upsample_bilinear2d", None,
     (2, lambda y: F.interpolate(y, scale_factor=2, mode="bilinear")))
_row("upsample_linear1d", (aten.upsample_linear1d.vec,), "general", "aten.upsample_linear1d", None,
     (1, lambda y: F.interpolate(y, size=15, mode="linear", align_corners=True)))

