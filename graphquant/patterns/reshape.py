"""Value-preserving ops run on uint8 with their input's qparams (kind ``shares_qparams``).

Each output value is one of the input values (or a copy of one), so quantization
commutes with the op: ``op(q(x)) == q(op(x))`` with the same scale and zero point. The
kernel graph runs the same ATen op on the uint8 tensor.

``flatten`` and most ``reshape`` calls reach the graph as ``aten.view``. On uint8 they
lower to ``aten.reshape``: int8 convs return channels-last tensors, which ``view``
cannot always reinterpret, while ``reshape`` gives the same values either way.
``x.contiguous()`` and ``nn.Dropout`` in eval reach the graph as ``aten.clone`` (or not
at all); ``x.expand_as(y)`` as ``aten.expand``; ``x.narrow`` and ``x[a:b]`` as
``aten.slice``; ``x.mT`` and ``x.t()`` as ``aten.transpose`` / ``aten.t``.

``x.tensor_split(...)`` arrives as ``aten.slice`` calls. Ops returning several tensors
(``chunk`` and ``split``, ``unbind``, ``max``/``min`` with indices, ``sort``, ``topk``) arrive
as one node and ``getitem`` nodes: they are in :mod:`graphquant.patterns.multi_output`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import fx, nn

from graphquant.graph import Match
from graphquant.patterns import Pattern, aten, register
from graphquant.patterns.context import KernelContext, QValue
from graphquant.quant_math import QParams


def same_op_on_uint8(ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams) -> fx.Node:
    """The anchor's own op and arguments, applied to the uint8 input."""
    node = ctx.call(match.anchor.target, (inputs[0].node, *match.anchor.args[1:]))
    node.kwargs = dict(match.anchor.kwargs)  # clone(memory_format=...) takes it by keyword only
    return node


def _lower_reshape(ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams) -> fx.Node:
    return ctx.call(aten.reshape.default, (inputs[0].node, *match.anchor.args[1:]))


class _ConvFlattenLinear(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.how == "flatten":
            y = torch.flatten(y, 1)
        elif self.how == "reshape":
            y = y.reshape(y.shape[0], -1)
        else:
            y = y.view(y.shape[0], -1)
        return self.fc(y)


def _reshape_examples() -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    return [(_ConvFlattenLinear(how), (torch.randn(1, 3, 8, 8),)) for how in ("flatten", "reshape", "view")]


register(Pattern("reshape", ((aten.view.default, aten._unsafe_view.default, aten.reshape.default),),
                 "shares_qparams", "aten.reshape", _lower_reshape, _reshape_examples))


# The conv output (N, 4, H, W) is channels-last uint8 on the oneDNN backend: each op
# below is checked on that layout. ``y`` is the conv output.
_SHAPE_OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "permute": lambda y: y.permute(0, 2, 3, 1),
    "transpose": lambda y: y.transpose(1, 2).mT[0, 0].t(),
    "squeeze": lambda y: y[:, :1, :1].squeeze(1).unsqueeze(0).squeeze((0,)).squeeze(),
    "unsqueeze": lambda y: y.unsqueeze(1)[:, None],
    "select": lambda y: y[:, 2],
    "slice": lambda y: y[:, 1:3, ::2].narrow(3, 1, 4),
    "contiguous_dropout": lambda y: nn.functional.dropout(y.permute(0, 2, 3, 1).contiguous(), 0.5, training=False),
    "repeat": lambda y: y.repeat(1, 2, 1, 1),
    "expand": lambda y: y[:, :1].expand(-1, 3, -1, -1),
    "repeat_interleave": lambda y: torch.repeat_interleave(y, 2, dim=1),
    "detach": lambda y: y.detach(),
}


class _ConvThen(nn.Module):
    """``conv -> <shape op>``: the shape op runs on the conv's uint8 output."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SHAPE_OPS[self.how](self.conv(x))


def _examples(*hows: str):  # type: ignore[no-untyped-def]
    def examples() -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
        return [(_ConvThen(how), (torch.randn(1, 3, 8, 8),)) for how in hows]

    return examples


for _name, _ops, _kernel, _hows in [
    ("permute", (aten.permute.default,), "aten.permute", ("permute",)),
    ("transpose", (aten.transpose.int, aten.t.default), "aten.transpose", ("transpose",)),
    ("squeeze", (aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims), "aten.squeeze", ("squeeze",)),
    ("unsqueeze", (aten.unsqueeze.default,), "aten.unsqueeze", ("unsqueeze",)),
    ("select", (aten.select.int,), "aten.select", ("select",)),
    ("slice", (aten.slice.Tensor,), "aten.slice", ("slice",)),
    ("clone", (aten.clone.default,), "aten.clone", ("contiguous_dropout",)),
    ("repeat", (aten.repeat.default,), "aten.repeat", ("repeat",)),
    ("expand", (aten.expand.default,), "aten.expand", ("expand",)),
    ("repeat_interleave", (aten.repeat_interleave.self_int,), "aten.repeat_interleave", ("repeat_interleave",)),
    ("detach", (aten.detach.default,), "aten.detach", ("detach",)),
]:
    register(Pattern(_name, (_ops,), "shares_qparams", _kernel, same_op_on_uint8, _examples(*_hows)))
