"""Normalisations that are not folded into a conv: batch_norm 1d/2d/3d, layer_norm,
group_norm, instance_norm. Kind ``general`` (the output's range is new), reference form
``dq -> norm -> q``; weights and statistics stay float.

Eval-mode ``nn.BatchNorm*d`` arrives as ``aten._native_batch_norm_legit_no_training``,
which returns ``(out, mean, invstd)``, and ``getitem(·, 0)``: the pattern is that
two-node chain. A batch-norm right after a conv is folded into it by ``fold_bn``
before matching; these rows catch the others (after a relu, a linear, a pool).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import nn

from graphquant.patterns import Pattern, aten, register


class _Then(nn.Module):
    """``producer -> relu -> norm``: the relu keeps a batch-norm out of ``fold_bn``."""

    def __init__(self, producer: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.producer = producer
        self.relu = nn.ReLU()
        self.norm = norm
        for name, buffer in norm.named_buffers():  # batch-norm statistics that are not trivial
            if name == "running_mean":
                buffer.uniform_(0.2, 0.6)
            elif name == "running_var":
                buffer.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.relu(self.producer(x)))


def _examples(*cases: Callable[[], tuple[nn.Module, nn.Module, tuple[int, ...]]]):  # type: ignore[no-untyped-def]
    def examples() -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
        out: list[tuple[nn.Module, tuple[torch.Tensor, ...]]] = []
        for case in cases:
            producer, norm, shape = case()
            out.append((_Then(producer, norm), (torch.randn(shape),)))
        return out

    return examples


_BN = (aten._native_batch_norm_legit_no_training.default,)
for _name, _case in [
    ("batch_norm1d", lambda: (nn.Linear(8, 6), nn.BatchNorm1d(6), (1, 8))),
    ("batch_norm2d", lambda: (nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), (1, 3, 8, 8))),
    ("batch_norm3d", lambda: (nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4), (1, 3, 6, 6, 6))),
]:
    register(Pattern(_name, (_BN, (operator.getitem,)), "general",  # type: ignore[arg-type]
                     "aten._native_batch_norm_legit_no_training", None, _examples(_case)))

register(Pattern("layer_norm", ((aten.layer_norm.default,),), "general", "aten.layer_norm", None,
                 _examples(lambda: (nn.Linear(8, 16), nn.LayerNorm(16), (1, 5, 8)))))
register(Pattern("group_norm", ((aten.group_norm.default,),), "general", "aten.group_norm", None,
                 _examples(lambda: (nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), (1, 3, 8, 8)))))
register(Pattern("instance_norm", ((aten.instance_norm.default,),), "general", "aten.instance_norm", None,
                 _examples(lambda: (nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True), (1, 3, 8, 8)))))
