"""Fold eval-mode batch-norm into the preceding convolution.

``x -> conv(w, b) -> batch_norm(mean, var, gamma, beta) -> y`` becomes
``x -> conv(w', b') -> y`` with ``w' = w * gamma / sqrt(var + eps)`` per output channel
and ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from graphquant.graph import add_attr, get_attr_value, is_constant

aten = torch.ops.aten
_CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
_BN = aten._native_batch_norm_legit_no_training.default


def _foldable(bn: fx.Node) -> fx.Node | None:
    """The conv feeding ``bn`` if the pair can be folded, else None."""
    conv = bn.args[0]
    if not (isinstance(conv, fx.Node) and conv.op == "call_function" and conv.target in _CONVS):
        return None
    if len(conv.users) != 1 or not is_constant(conv.args[1]):
        return None
    bias = conv.args[2] if len(conv.args) > 2 else None
    if bias is not None and not is_constant(bias):
        return None
    if not all(a is None or is_constant(a) for a in bn.args[1:5]):
        return None
    # only output 0 (the normalised tensor) may be used; eval batch-norm's stats outputs are empty
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in bn.users):
        return None
    return conv


@torch.no_grad()
def folded_weight_bias(
    w: torch.Tensor, b: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
    gamma: torch.Tensor | None, beta: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w', b')`` of the conv that computes ``batch_norm(conv(x, w, b))``."""
    inv_std = torch.rsqrt(var.double() + eps)
    factor = inv_std if gamma is None else gamma.double() * inv_std
    shape = [-1] + [1] * (w.dim() - 1)
    w_folded = (w.double() * factor.reshape(shape)).to(w.dtype)
    b0 = torch.zeros_like(mean, dtype=torch.float64) if b is None else b.double()
    b_folded = (b0 - mean.double()) * factor + (0.0 if beta is None else beta.double())
    return w_folded, b_folded.to(w.dtype)


def _fold_one(gm: fx.GraphModule, conv: fx.Node, bn: fx.Node) -> None:
    def value(a: object) -> torch.Tensor | None:
        return None if a is None else get_attr_value(gm, a)  # type: ignore[arg-type]

    w_node = conv.args[1]
    bias_node = conv.args[2] if len(conv.args) > 2 else None
    _, gamma, beta, mean, var, _momentum, eps = bn.args
    w, b = folded_weight_bias(value(w_node), value(bias_node), value(mean), value(var),  # type: ignore[arg-type]
                              value(gamma), value(beta), float(eps))  # type: ignore[arg-type]
    prefix = str(w_node.target).rpartition(".")[0] or conv.name  # type: ignore[union-attr]
    with gm.graph.inserting_before(conv):
        new_w = gm.graph.get_attr(add_attr(gm, prefix + "_folded_weight", w))
        new_b = gm.graph.get_attr(add_attr(gm, prefix + "_folded_bias", b))
    args = list(conv.args)
    args[1] = new_w
    if len(args) > 2:
        args[2] = new_b
    else:
        args.append(new_b)
    conv.args = tuple(args)
    for user in list(bn.users):
        user.replace_all_uses_with(conv)
        gm.graph.erase_node(user)
    gm.graph.erase_node(bn)


def fold_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every eval batch-norm that directly follows a conv with constant weights.

    New weights are registered on ``gm``; the model's own parameters are never written.
    """
    for bn in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _BN]:
        conv = _foldable(bn)
        if conv is not None:
            _fold_one(gm, conv, bn)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
