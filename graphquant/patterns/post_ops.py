"""Activations an int8 conv / linear kernel applies before its one rounding, read off the graph.

``conv -> relu6`` lowers to ``qconv2d(..., "hardtanh", [0.0, 6.0])``: the kernel applies the
activation to the real value and rounds once to the output grid, as the reference graph
``conv -> relu6 -> quantize`` does. Names and scalars are those of
:data:`graphquant.kernels.portable.POST_OPS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from graphquant.graph import Match, op_args

aten = torch.ops.aten
PostOp = tuple[str, list[float]]


def _bounds(lo: Any, hi: Any) -> PostOp:
    low = -math.inf if lo is None else float(lo)
    high = math.inf if hi is None else float(hi)
    return "hardtanh", [min(low, high), high]  # clamp(x, 2, 1) is 1 everywhere, as torch.clamp has it


# ATen op -> its post-op, from the op's arguments (defaults filled in)
_POST_OPS: dict[Any, Callable[[list[Any]], PostOp]] = {
    aten.relu.default: lambda args: ("relu", []),
    aten.relu6.default: lambda args: ("hardtanh", [0.0, 6.0]),
    aten.hardtanh.default: lambda args: _bounds(args[1], args[2]),
    aten.clamp.default: lambda args: _bounds(args[1], args[2]),
    aten.clamp_min.default: lambda args: _bounds(args[1], None),
    aten.clamp_max.default: lambda args: _bounds(None, args[1]),
    aten.hardswish.default: lambda args: ("hardswish", []),
    aten.silu.default: lambda args: ("silu", []),
    aten.gelu.default: lambda args: ("gelu_tanh" if args[1] == "tanh" else "gelu", []),
    aten.leaky_relu.default: lambda args: ("leaky_relu", [float(args[1])]),
}

POST_OP_TARGETS = frozenset(_POST_OPS)

RELU = (aten.relu.default,)
# relu6, F.hardtanh / nn.ReLU6 (hardtanh), torch.clamp with scalar bounds
HARDTANH = (aten.relu6.default, aten.hardtanh.default, aten.clamp.default, aten.clamp_min.default,
            aten.clamp_max.default)
HARDSWISH = (aten.hardswish.default,)
SILU = (aten.silu.default,)
GELU = (aten.gelu.default,)
LEAKY_RELU = (aten.leaky_relu.default,)


def post_op(node: fx.Node) -> PostOp:
    """The kernel post-op computing ``node``, an activation fused at the end of a chain."""
    return _POST_OPS[node.target](op_args(node))


def fused_post_op(match: Match) -> PostOp:
    """The post-op of a ``weighted -> [activation]`` match: ``("none", [])`` when there is none."""
    return post_op(match.output) if len(match.nodes) > 1 else ("none", [])
