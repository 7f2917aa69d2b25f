"""Ops returning several tensors, run on uint8 with their input's qparams (kind ``shares_qparams``).

``a, b = y.chunk(2, 1)``, ``v, i = y.max(1)`` and ``s, i = y.sort(1)`` reach the graph as one
node and an ``operator.getitem`` per item used::

    y -> split -> getitem_0 -> conv        y -> max.dim -> getitem_0 -> (values)
               └> getitem_1 -> add                    └> getitem_1 -> gather (indices)

Every value item is a copy of input values (a slice, or the values picked by an order
statistic), and quantization is monotone, so ``op(q(y)) == q(op(y))`` item by item with the
input's scale and zero point, and the indices of the uint8 op are those of the float op
on the dequantized input (ties broken alike: CPU ``max``/``sort``/``topk`` return the same
indices on uint8 and float32, checked in ``tests/test_multi_output.py``).

The design, and why:

- A pattern row names the op and, in ``Pattern.value_outputs``, which items carry values
  (``"all"`` for ``split``; ``(0,)`` for ``max``'s values beside its indices). The op is
  matched alone, and ``annotate`` lists the ``getitem`` nodes of the value items in
  ``Match.outputs``. The ``getitem`` nodes are where values leave the op, so they are where
  observers go: the passes already put an observer (here a shared-qparams marker) after a
  match's output and let every user read it, so with one per item each item's users are
  handled as any quantized value's are: a quantized op reads its uint8, a float op or the
  model output reads a ``dequantize`` (the reference graph's ``q -> dq`` pair after each item).
- Lowering builds the op once on the uint8 input and rewires every ``getitem`` to it: value
  items replace their ``quantize`` (no requantization: the qparams are the input's), index
  items replace their float twins, so indices keep flowing to their users unchanged.
- Items that are not used have no ``getitem``; an op whose indices alone are used has no
  value to quantize and stays float (the report says so), as does one whose input is float.

``tensor_split`` and ``chunk`` arrive as ``aten.slice`` / ``aten.split`` (see
:mod:`graphquant.patterns.reshape`). ``mode`` is not here: the most frequent uint8 value
is not the quantized most frequent float value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from graphquant.patterns import Pattern, aten, register
from graphquant.patterns.reshape import same_op_on_uint8

_Forward = Callable[[torch.Tensor], Any]


class _ConvThen(nn.Module):
    """``conv2d -> <op>`` on a small random input: the op reads the conv's (channels-last) uint8."""

    def __init__(self, forward: _Forward) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.then = forward

    def forward(self, x: torch.Tensor) -> Any:
        return self.then(self.conv(x))


class _ChunksIntoConvs(nn.Module):
    """``conv -> chunk``: one chunk into a conv, the other into the residual add it fuses with."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.left = nn.Conv2d(2, 2, 1)
        self.right = nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, 1)
        return F.relu(self.left(a) + b) + self.right(b)


def _unbind(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = y.unbind(1)
    return torch.stack([rows[0], rows[2]], 1), rows[3]  # rows[1] unused: it has no getitem


def _max_gather(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values, indices = y.max(1, keepdim=True)
    return values, indices, y.gather(1, indices)  # gather stays float and reads the indices


def _examples(*forwards: _Forward | type[nn.Module]):  # type: ignore[no-untyped-def]
    """``conv -> forward`` for each function; a module class is its own example."""

    def examples() -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
        return [(f() if isinstance(f, type) else _ConvThen(f), (torch.randn(1, 3, 8, 8),)) for f in forwards]

    return examples


# name, ops, value items (the others pass through), kernel, examples: items into a conv and a
# fused add, returned as model outputs, into float-only ops (exp, gather), some items unused
_ROWS: list[tuple[str, tuple[torch._ops.OpOverload, ...], tuple[int, ...] | Literal["all"], str,
                  tuple[_Forward | type[nn.Module], ...]]] = [
    ("split", (aten.split.Tensor, aten.split_with_sizes.default), "all", "aten.split",
     (_ChunksIntoConvs, lambda y: y.split([1, 3], 1), lambda y: torch.exp(y.split(3, 1)[1]))),
    ("unbind", (aten.unbind.int,), "all", "aten.unbind", (_unbind,)),
    ("max_dim", (aten.max.dim,), (0,), "aten.max.dim", (_max_gather, lambda y: y.max(dim=1)[0])),
    ("min_dim", (aten.min.dim,), (0,), "aten.min.dim", (lambda y: y.min(-1), lambda y: torch.min(y, 2, True).values)),
    ("sort", (aten.sort.default, aten.sort.stable), (0,), "aten.sort",
     (lambda y: y.sort(1, descending=True), lambda y: torch.sort(y.flatten(1), dim=-1, stable=True)[0])),
    ("topk", (aten.topk.default,), (0,), "aten.topk",
     (lambda y: y.flatten(1).topk(5, 1), lambda y: y.topk(2, 1, largest=False).values)),
    ("kthvalue", (aten.kthvalue.default,), (0,), "aten.kthvalue", (lambda y: y.kthvalue(2, 1),)),
    ("median_dim", (aten.median.dim,), (0,), "aten.median.dim", (lambda y: y.median(1),)),
    ("cummax", (aten.cummax.default,), (0,), "aten.cummax", (lambda y: y.cummax(2),)),
    ("cummin", (aten.cummin.default,), (0,), "aten.cummin", (lambda y: y.cummin(3).values,)),
]

for _name, _ops, _items, _kernel, _forwards in _ROWS:
    register(Pattern(_name, (_ops,), "shares_qparams", _kernel, same_op_on_uint8, _examples(*_forwards),
                     value_outputs=_items))

