"""Embedding tables, weight-only (``nn.Embedding``, ``F.embedding`` -> ``graphquant::qembedding``;
``nn.EmbeddingBag``, ``F.embedding_bag`` -> ``graphquant::qembedding_bag``).

Only under a weight-only qconfig (``embedding_qconfig``: 8 bits, ``embedding_4bit_qconfig``:
4 bits), in ``quantize`` and ``quantize_dynamic`` alike. The table gets per-row float
qparams (scale and offset, torch.ao's ``float_qparams_weight_only_qconfig``): a row's whole
integer range covers that row's own values, so a rare token with a large row costs no
precision to the others. The inputs are indices, so nothing is observed; the output is
float32, and the next quantized op's input observer quantizes it as it would any float value.

``embedding_bag`` arrives as ``aten.embedding_bag.padding_idx`` (a 4-tuple) and
``getitem(·, 0)``; modes sum, mean and max, offsets, ``include_last_offset``,
``per_sample_weights`` (sum only, as in PyTorch) and ``padding_idx`` all reach the kernel.
A 2-d input (fixed-length bags) reaches the graph as a reshape and ``arange`` offsets.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphquant.graph import Match, op_args
from graphquant.patterns import Pattern, aten, register
from graphquant.patterns.context import KernelContext, QValue
from graphquant.quant_math import QParams


def _lower_embedding(ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams) -> fx.Node:
    w = ctx.rowwise_weight(match)
    indices = match.anchor.args[1]
    return ctx.call(torch.ops.graphquant.qembedding.default, (w.table, w.scale, w.offset, indices, w.bits))


def _lower_embedding_bag(ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams) -> fx.Node:
    w = ctx.rowwise_weight(match)
    args = op_args(match.anchor)
    # weight, indices, offsets, scale_grad_by_freq, mode, sparse, per_sample_weights, include_last_offset[, padding_idx]
    padding_idx = args[8] if len(args) > 8 and args[8] is not None else -1
    return ctx.call(
        torch.ops.graphquant.qembedding_bag.default,
        (w.table, w.scale, w.offset, args[1], args[2], args[4], args[6], args[7], padding_idx, w.bits),
    )


class _Embedding(nn.Module):
    def __init__(self, padding_idx: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 16, padding_idx=padding_idx)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.emb(indices)


class _FunctionalEmbedding(nn.Module):
    """``F.embedding`` on a parameter, as a tied or hand-rolled table would be."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(50, 32))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.weight)


class _Bag(nn.Module):
    """``nn.EmbeddingBag`` called with the inputs it is given (indices[, offsets[, per_sample_weights]])."""

    def __init__(self, mode: str, include_last_offset: bool = False) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(100, 16, mode=mode, include_last_offset=include_last_offset)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.bag(indices, offsets, per_sample_weights)


class _FunctionalBag(nn.Module):
    """``F.embedding_bag`` with ``padding_idx``: entries equal to it are left out of their bag."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(40, 16))
        self.mode = mode

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(indices, self.weight, offsets, mode=self.mode, padding_idx=3)


def _indices(*shape: int, rows: int = 100) -> torch.Tensor:
    return torch.randint(0, rows, shape)


def _embedding_examples() -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    return [
        (_Embedding(), (_indices(2, 7),)),
        (_Embedding(padding_idx=0), (torch.tensor([[0, 5, 9, 0], [1, 2, 99, 0]]),)),
        (_FunctionalEmbedding(), (_indices(3, 4, 5, rows=50),)),
    ]


def _bag_examples() -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    offsets = torch.tensor([0, 3, 3, 7])  # the second bag is empty
    return [
        (_Bag("mean"), (_indices(4, 5),)),  # 2-d input: fixed-length bags
        (_Bag("sum"), (_indices(10), offsets, torch.rand(10))),
        (_Bag("max", include_last_offset=True), (_indices(10), torch.tensor([0, 3, 3, 7, 10]))),
        (_FunctionalBag("mean"), (torch.tensor([3, 1, 3, 7, 3, 9, 0, 2]), torch.tensor([0, 2, 5]))),
        (_FunctionalBag("sum"), (torch.tensor([3, 1, 3, 7, 3, 9, 0, 2]), torch.tensor([0, 2, 5]))),
    ]


register(Pattern("embedding", ((aten.embedding.default,),), "weight_only", "qembedding", _lower_embedding,
                 _embedding_examples, activation_args=(), weight_arg=0,
                 doc="embedding table with per-row float qparams (8 or 4 bits), float output"))
_BAG = ((aten.embedding_bag.padding_idx, aten.embedding_bag.default), (operator.getitem,))
register(Pattern("embedding_bag", _BAG, "weight_only", "qembedding_bag", _lower_embedding_bag,  # type: ignore[arg-type]
                 _bag_examples, activation_args=(), weight_arg=0,
                 doc="embedding_bag (sum / mean / max) on a per-row float-qparams table, float output"))
