"""Activations.

- ``relu``, ``relu6``, ``hardtanh`` (``nn.ReLU6`` arrives as ``hardtanh(0, 6)``), ``clamp``
  (and ``clamp_min`` / ``clamp_max``):
  clamping is monotone and every output is an input value or a bound, so they keep the
  input's qparams (kind ``shares_qparams``) and run as ``aten.clamp`` on uint8, with the
  bounds quantized once at convert: ``q(clamp(x, lo, hi)) == clamp(q(x), q(lo), q(hi))``
  exactly, because quantization is monotone.
- ``leaky_relu``, ``elu``, ``hardswish``: new values, kind ``general``, reference form.
- ``hardsigmoid``, ``sigmoid`` (range [0, 1]) and ``tanh`` ([-1, 1]): kind
  ``fixed_qparams``, the output scale from the op's range, reference form.

After a conv, linear or add the clamps fuse into those patterns instead; the examples
put a max-pool between, as a LeNet-style ``relu(max_pool(conv(x)))`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphquant.graph import Match, op_args
from graphquant.patterns import Pattern, aten, register
from graphquant.patterns.context import KernelContext, QValue
from graphquant.quant_math import QParams, quantize_tensor


def _bounds(match: Match) -> tuple[float | None, float | None]:
    """The ``(min, max)`` the matched op clamps to; ``None`` is unbounded."""
    target = match.anchor.target
    if target is aten.relu.default:
        return 0.0, None
    if target is aten.relu6.default:
        return 0.0, 6.0
    args = op_args(match.anchor)
    if target is aten.clamp_min.default:
        return args[1], None
    if target is aten.clamp_max.default:
        return None, args[1]
    return args[1], args[2]  # hardtanh(x, min_val, max_val), clamp(x, min, max)


def _lower_clamp(ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams) -> fx.Node:
    x = inputs[0]
    scale, zero_point = x.qparams.scalar()

    def quantized(bound: float | None) -> int | None:
        # the reference quantizes the float32 bound with the same division and rounding
        if bound is None:
            return None
        q = quantize_tensor(torch.tensor(float(bound)), scale, zero_point, x.qparams.qmin, x.qparams.qmax, torch.int64)
        return int(q)

    lo, hi = _bounds(match)
    return ctx.call(aten.clamp.default, (x.node, quantized(lo), quantized(hi)))


_Forward = Callable[[torch.Tensor], torch.Tensor]


class _PooledConvThen(nn.Module):
    """``conv -> max_pool -> <activation>``: the pool keeps the activation out of conv fusion."""

    def __init__(self, forward: _Forward) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.then = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.then(F.max_pool2d(self.conv(x), 2))


def _examples(*forwards: _Forward):  # type: ignore[no-untyped-def]
    def examples() -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
        return [(_PooledConvThen(forward), (torch.randn(1, 3, 10, 10),)) for forward in forwards]

    return examples


_OpOverload = torch._ops.OpOverload
_SHARES: list[tuple[str, tuple[_OpOverload, ...], tuple[_Forward, ...]]] = [
    ("relu", (aten.relu.default,), (lambda y: F.relu(y, inplace=True),)),
    ("relu6", (aten.relu6.default,), (F.relu6,)),
    ("hardtanh", (aten.hardtanh.default,), (lambda y: F.hardtanh(F.hardtanh(y, -1.5, 1.0, inplace=True), 0.0, 6.0),)),
    ("clamp", (aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default),
     (lambda y: torch.clamp_min(torch.clamp(y, max=0.5), -1.0).clamp_(min=-0.75),)),
]
_GENERAL: list[tuple[str, _OpOverload, str, tuple[_Forward, ...]]] = [
    ("leaky_relu", aten.leaky_relu.default, "aten.leaky_relu", (lambda y: F.leaky_relu(y, 0.2, True),)),
    ("elu", aten.elu.default, "aten.elu", (nn.ELU(),)),
    ("hardswish", aten.hardswish.default, "aten.hardswish", (nn.Hardswish(inplace=True),)),
]
_FIXED: list[tuple[str, _OpOverload, str, tuple[float, float], tuple[_Forward, ...]]] = [
    ("hardsigmoid", aten.hardsigmoid.default, "aten.hardsigmoid", (0.0, 1.0), (nn.Hardsigmoid(),)),
    ("sigmoid", aten.sigmoid.default, "aten.sigmoid", (0.0, 1.0), (lambda y: y.sigmoid_(),)),
    ("tanh", aten.tanh.default, "aten.tanh", (-1.0, 1.0), (nn.Tanh(),)),
]


def _register() -> None:
    for name, ops, forwards in _SHARES:
        register(Pattern(name, (ops,), "shares_qparams", "aten.clamp", _lower_clamp, _examples(*forwards)))
    for name, op, kernel, forwards in _GENERAL:
        register(Pattern(name, ((op,),), "general", kernel, None, _examples(*forwards)))
    for name, op, kernel, output_range, forwards in _FIXED:
        register(Pattern(name, ((op,),), "fixed_qparams", kernel, None, _examples(*forwards),
                         output_range=output_range))


_register()
