"""add / sub / mul of two quantized tensors or of a tensor and a Python number, each alone
or with a following relu -> ``graphquant::qadd`` / ``qadd_scalar`` / ``qmul`` /
``qmul_scalar``; and ``matmul`` / ``bmm`` between two activations (attention scores), kept
in the reference form.

In-place spellings (``x += y``, ``x.add_(y)``, ``x *= 2``, ``F.relu(x, inplace=True)``)
reach the graph functionalised as ``aten.add.Tensor`` / ``aten.mul.Tensor`` /
``aten.relu.default``, so they match these rows and give the same numbers. A number
operand is an argument, not an activation: ``x + 1.5`` is ``aten.add.Tensor(x, 1.5)``
with one activation input, and lowers to ``qadd_scalar``. An add of two float model
inputs stays float (kind ``general``: quantized only when an input already is).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphquant.graph import Match, activation_inputs, op_args
from graphquant.patterns import LowerKernel, Pattern, aten, register
from graphquant.patterns.context import KernelContext, QValue
from graphquant.quant_math import QParams

_ADD = (aten.add.Tensor, aten.sub.Tensor)
_MUL = (aten.mul.Tensor,)
_RELU = (aten.relu.default,)


def _lower(kernel: str, post_op: str) -> LowerKernel:
    tensor_op = getattr(torch.ops.graphquant, kernel).default
    scalar_op = getattr(torch.ops.graphquant, kernel + "_scalar").default

    def lower_kernel(ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams) -> fx.Node:
        by_node = dict(zip(activation_inputs(match), inputs, strict=True))  # x + x: one input, used twice
        args = op_args(match.anchor)
        x, other = by_node[args[0]], args[1]
        extra = []
        if kernel == "qadd":
            alpha = float(args[2]) * (-1.0 if match.anchor.target is aten.sub.Tensor else 1.0)
            extra = [alpha]
        x_scale, x_zero_point = x.qparams.scalar()
        out_scale, out_zero_point = out.scalar()
        if isinstance(other, fx.Node):
            y = by_node[other]
            y_scale, y_zero_point = y.qparams.scalar()
            return ctx.call(tensor_op, (x.node, x_scale, x_zero_point, y.node, y_scale, y_zero_point, *extra,
                                        out_scale, out_zero_point, post_op))
        assert isinstance(other, (int, float)), f"graphquant: {match.anchor}: operand {other!r} is not a number"
        value = float(other) * (extra[0] if extra else 1.0)  # add: x + alpha * other
        return ctx.call(scalar_op, (x.node, x_scale, x_zero_point, value, out_scale, out_zero_point, post_op))

    return lower_kernel


class _Binary(nn.Module):
    """Two conv branches (or one and a number) joined by ``how``; the in-place spellings
    are written as a user would write them."""

    def __init__(self, how: str, relu: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pooled, so that the add is not fused into the conv (the conv + add pattern)
        a, b = F.max_pool2d(self.conv1(x), 2), F.max_pool2d(self.conv2(x), 2)
        if self.how == "add":
            y = a + b
        elif self.how == "iadd":
            a += b
            y = a
        elif self.how == "add_":
            y = a.add_(b)
        elif self.how == "sub_then_scalar":
            y = torch.sub(a, b, alpha=0.5)
            y += 1.5
        elif self.how == "imul":
            a *= b
            y = a
        elif self.how == "mul_then_scalar":
            y = a * b
            y *= 2
        else:
            raise ValueError(self.how)
        return self.relu(y)


def _examples(*hows: str, relu: bool = False):  # type: ignore[no-untyped-def]
    def examples() -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
        return [(_Binary(how, relu), (torch.randn(1, 3, 10, 10),)) for how in hows]

    return examples


class _Attention(nn.Module):
    """Attention scores: ``q @ k^T`` between two activations (``matmul``) or ``bmm``."""

    def __init__(self, bmm: bool) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.bmm = bmm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.q(x), self.k(x)
        if self.bmm:
            return torch.bmm(q, k.transpose(1, 2))
        return q @ k.transpose(-2, -1)


def _attention(bmm: bool):  # type: ignore[no-untyped-def]
    def examples() -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
        return [(_Attention(bmm), (torch.randn(1, 5, 8),))]

    return examples


register(Pattern("add", (_ADD,), "general", "graphquant.qadd", _lower("qadd", "none"),
                 _examples("add_", "sub_then_scalar"), activation_args=(0, 1)))
register(Pattern("add_relu", (_ADD, _RELU), "general", "graphquant.qadd", _lower("qadd", "relu"),
                 _examples("iadd", relu=True), activation_args=(0, 1)))
register(Pattern("mul", (_MUL,), "general", "graphquant.qmul", _lower("qmul", "none"),
                 _examples("mul_then_scalar"), activation_args=(0, 1)))
register(Pattern("mul_relu", (_MUL, _RELU), "general", "graphquant.qmul", _lower("qmul", "relu"),
                 _examples("imul", relu=True), activation_args=(0, 1)))
register(Pattern("matmul", ((aten.matmul.default,),), "general", "aten.matmul", None, _attention(False),
                 activation_args=(0, 1)))
register(Pattern("bmm", ((aten.bmm.default,),), "general", "aten.bmm", None, _attention(True),
                 activation_args=(0, 1)))
