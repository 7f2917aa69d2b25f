"""SmoothQuant at convert: move part of each smoothed linear input's range into its weight.

A value ``x`` read by linears whose qconfig has :class:`~graphquant.qconfig.SmoothQuant` was
observed per channel (:class:`~graphquant.observers.SmoothingObserver`). Here each such group
of linears gets one factor per input channel, ``s = max|x| ** alpha / max|w| ** (1 - alpha)``
(``max|w|`` over every weight of the group), its weights become ``w * s`` (new constants; the
float model's are not touched) and the observer's range becomes that of ``x / s``.

Where ``x`` is a LayerNorm's output that only the group reads (pre-LN transformers), ``1 / s`` is
folded into the LayerNorm's weight and bias (new constants too) and nothing is added at run time.
Elsewhere (post-LN BERT, whose LayerNorm output also feeds the residual; a GELU) the reference pass
multiplies ``x`` by ``1 / s`` before its per-tensor quantize: one elementwise pass (which Inductor
fuses into the quantize), the kernels unchanged::

    x -> obs(smoothing) -> linear(w)        x -> mul(1 / s) -> quantize_per_tensor -> qlinear(w * s)
    layer_norm(x, g, b) -> obs -> linear    layer_norm(x, g / s, b / s) -> quantize_per_tensor -> qlinear(w * s)

``alpha="auto"`` picks, per group, the alpha of least output error of the quantized group on the
observer's sample rows (each linear's squared error relative to its output's energy, summed), or
no smoothing when none beats it.
"""

from __future__ import annotations

import torch
from torch import fx

from graphquant.graph import MATCH, Match, add_attr, get_attr_value, is_constant, module_path
from graphquant.observers import SmoothingObserver
from graphquant.passes.insert_observers import is_observer
from graphquant.patterns.post_ops import POST_OP_TARGETS
from graphquant.qconfig import ObserverSpec
from graphquant.quant_math import dequantize, fake_quantize, quantize
from graphquant.report import Smoothing

_TINY = 1e-5  # no factor below this, none from an all-zero channel or weight column


def smoothing_factors(amax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``amax ** alpha / wmax ** (1 - alpha)`` per channel; 1 where either is zero."""
    s = amax.clamp(min=_TINY).pow(alpha) / wmax.clamp(min=_TINY).pow(1.0 - alpha)
    return torch.where((amax > 0) & (wmax > 0), s.clamp(min=_TINY), torch.ones_like(s)).float()


def fake_quantized_weight(w: torch.Tensor, spec: ObserverSpec) -> torch.Tensor:
    """``w`` as the int8 kernel sees it under the weight spec ``spec`` (what convert will quantize)."""
    observer = spec.create()
    observer(w)
    return fake_quantize(w, observer.qparams())


def _group_error(observer: SmoothingObserver, group: list[Match], weights: list[torch.Tensor],
                 alpha: float | None) -> float:
    """Output error of the quantized group with ``alpha`` (None: no smoothing), calibrated on the even
    sample rows and measured on the odd ones: errors on the rows that set the range flatter the
    alphas that fit it tightly (on all-MiniLM-L6-v2 they picked alpha 0.75-0.8, which lose to 0.6
    on held-out sentences). Each linear's error is relative to its output, per row, averaged."""
    fit, held = observer.samples[0::2], observer.samples[1::2]
    amax = fit.abs().amax(0)
    wmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    s = torch.ones_like(amax) if alpha is None else smoothing_factors(amax, wmax, alpha)
    qparams = observer.choose((fit / s).min(), (fit / s).max())
    xq = dequantize(quantize(held / s, qparams), qparams)
    error = 0.0
    for match, w in zip(group, weights, strict=True):
        want = held @ w.T
        got = xq @ fake_quantized_weight(w * s, match.qconfig.weight).T
        error += float(((got - want).pow(2).sum(1) / want.pow(2).sum(1).clamp(min=1e-30)).mean())
    return error


def _weight_node(match: Match) -> fx.Node | None:
    assert match.pattern.weight_arg is not None
    node = match.anchor.args[match.pattern.weight_arg]
    return node if is_constant(node) else None  # type: ignore[return-value]


def _fused_activation(gm: fx.GraphModule, value: fx.Node) -> str:
    """The linear whose output ``value`` (an activation) is, when the kernel graph fuses the
    activation into it (graphquant.passes.fuse.fold_activations), else ""."""
    if value.op != "call_function" or value.target not in POST_OP_TARGETS:
        return ""
    producer = value.args[0]
    while isinstance(producer, fx.Node) and is_observer(gm, producer):
        producer = producer.args[0]
    match = producer.meta.get(MATCH) if isinstance(producer, fx.Node) else None
    return (match.module_path or match.anchor.name) if match is not None and match.pattern.kernel == "qlinear" else ""


def _why_not(gm: fx.GraphModule, value: fx.Node, group: list[Match]) -> str:
    """Why the group cannot be smoothed, or ""."""
    smoothquant = group[0].qconfig.smoothquant
    linear = _fused_activation(gm, value)
    if linear and smoothquant is not None and not smoothquant.fused_activations:
        return (f"it is the {value.target} after {linear}, which the int8 linear applies before writing uint8 "
                "with one scale; smoothing would take it out of the kernel (SmoothQuant(fused_activations=True) "
                "does)")
    anchors = {m.anchor for m in group}
    for match in group:
        node = _weight_node(match)
        if node is None:
            return f"{match.module_path or match.anchor.name}: its weight is not a constant"
        readers = {u for n in gm.graph.nodes if n.op == "get_attr" and n.target == node.target for u in n.users}
        if not readers <= anchors:
            other = next(iter(readers - anchors))
            return (f"{match.module_path or match.anchor.name}: its weight is also read by {other.name} "
                    f"({module_path(other) or '<model>'}), which reads another input")
    return ""


def _choose_alpha(observer: SmoothingObserver, group: list[Match], weights: list[torch.Tensor]) -> float | None:
    """The group's alpha: fixed, or searched (None: smoothing does not help)."""
    smoothquant = group[0].qconfig.smoothquant
    assert smoothquant is not None
    if not smoothquant.search:
        return float(smoothquant.alpha)
    if observer.samples.shape[0] < 2:
        return None
    best, best_error = None, _group_error(observer, group, weights, None)
    for alpha in smoothquant.alphas:
        error = _group_error(observer, group, weights, alpha)
        if error < best_error:
            best, best_error = alpha, error
    return best


def _fold_into_layer_norm(gm: fx.GraphModule, value: fx.Node, observer_node: fx.Node, group: list[Match],
                          s: torch.Tensor) -> str:
    """Divide the LayerNorm producing ``value`` by ``s`` (new weight and bias constants) where only
    the group reads its output, it normalizes the last axis alone and has a constant weight; its
    name, or "" (not folded)."""
    if value.op != "call_function" or value.target != torch.ops.aten.layer_norm.default:
        return ""
    anchors = {m.anchor for m in group}
    if set(value.users) != {observer_node} or not set(observer_node.users) <= anchors:
        return ""
    args = list(value.args) + [None] * (4 - len(value.args))
    shape, weight, bias = args[1], args[2], args[3]
    if len(shape) != 1 or not is_constant(weight) or not (bias is None or is_constant(bias)):  # type: ignore[arg-type]
        return ""
    for index, constant in ((2, weight), (3, bias)):
        if constant is None:
            continue
        assert isinstance(constant, fx.Node)
        original = get_attr_value(gm, constant).detach()
        scaled = (original.float() / s).to(original.dtype)  # a bf16 LayerNorm keeps bf16 constants
        with gm.graph.inserting_before(value):
            args[index] = gm.graph.get_attr(add_attr(gm, str(constant.target) + "_smoothed", scaled))
        args[index].meta.update(constant.meta)  # type: ignore[union-attr]
    value.args = tuple(args)
    return value.name


def smooth(gm: fx.GraphModule, matches: list[Match]) -> list[Smoothing]:
    """Smooth every group of linears reading one :class:`SmoothingObserver` (in place); one report
    line per group, and one per smoothed linear whose input was already quantized."""
    lines = []
    for match in matches:
        observers = list(match.input_observers.values())
        if (match.qconfig.smoothquant is not None and match.pattern.kernel == "qlinear" and observers
                and not isinstance(gm.get_submodule(observers[0]), SmoothingObserver)):
            reason = "its input is the output of a quantized op: SmoothQuant needs a float input"
            lines.append(Smoothing(match.anchor.name, (match.module_path,), None, reason))
    for name, observer in gm.named_children():
        if not isinstance(observer, SmoothingObserver) or not observer.has_data:
            continue
        group = [m for m in matches if name in m.input_observers.values()]
        observer_node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
        value = observer_node.args[0]
        paths = tuple(m.module_path for m in group)
        reason = _why_not(gm, value, group)
        if reason:
            lines.append(Smoothing(str(value), paths, None, reason))
            continue
        nodes = [_weight_node(m) for m in group]
        weights = [get_attr_value(gm, n).detach().float() for n in nodes]  # type: ignore[arg-type]
        alpha = _choose_alpha(observer, group, weights)
        if alpha is None:
            lines.append(Smoothing(str(value), paths, None, "alpha search: no alpha has less output error than none"))
            continue
        amax = torch.maximum(observer.min_val.abs(), observer.max_val.abs())
        s = smoothing_factors(amax, torch.stack([w.abs().amax(0) for w in weights]).amax(0), alpha)
        observer.smoothing = s
        done: dict[str, str] = {}
        for match, node, w in zip(group, nodes, weights, strict=True):
            assert node is not None
            if node.target not in done:  # a linear called twice on this value: one smoothed weight
                done[str(node.target)] = add_attr(gm, str(node.target) + "_smoothed", (w * s).to(w.dtype))
            with gm.graph.inserting_before(match.anchor):
                smoothed = gm.graph.get_attr(done[str(node.target)])
            smoothed.meta.update(node.meta)
            match.anchor.replace_input_with(node, smoothed)
        observer.folded = bool(folded := _fold_into_layer_norm(gm, value, observer_node, group, s))
        lines.append(Smoothing(str(value), paths, alpha, "", float(s.min()), float(s.max()), folded))
    return lines
