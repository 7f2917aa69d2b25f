"""Convert a calibrated graph: observers become quantize/dequantize (reference), then
matched patterns become int8 kernels (kernel mode). Both modes start from one annotation.

Reference (``debug=True``), keeping float weights::

    x -> obs0 -> conv(w) -> relu -> obs1 -> y
    x -> q0 -> dq0 -> conv(dq(q(w))) -> relu -> q1 -> dq1 -> y

Kernel, from the reference graph: each match's ``dq -> ops -> q`` becomes one kernel
reading the uint8 input of its ``dq`` and writing the uint8 its ``q`` produced::

    x -> q0 -> qconv2d(relu) -> dq1 -> y
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from graphquant.errors import GraphQuantError
from graphquant.graph import (
    FLOAT_REASON,
    MATCH,
    QPARAMS,
    Match,
    activation_inputs,
    copy_meta,
    matches_of,
    module_path,
)
from graphquant.observers import Observer, SharedQParams
from graphquant.patterns.context import PACKED, KernelContext, QValue, WeightCache
from graphquant.quant_math import QParams
from graphquant.qconfig import resolve
from graphquant.report import ConversionReport, NodeReport

ops = torch.ops.graphquant
_BOOKKEEPING = {operator.getitem, torch.ops.aten.sym_size.int}


def observer_qparams(gm: fx.GraphModule) -> dict[str, QParams]:
    """qparams of every observer; an error naming those that saw no data."""
    empty, qparams = [], {}
    for name, module in gm.named_children():
        if isinstance(module, Observer):
            if not module.has_data:
                empty.append(module.where or name)
            else:
                qparams[name] = module.qparams()
    if empty:
        raise GraphQuantError(
            f"graphquant: convert before calibration: observers {'; '.join(empty)} saw no data. "
            "Run the prepared model on representative inputs first (graphquant.calibrate or run_fn)"
        )
    return qparams


def _q_dq(gm: fx.GraphModule, obs: fx.Node, qp: QParams) -> tuple[fx.Node, fx.Node]:
    """Replace an observer node by ``quantize -> dequantize`` with its qparams."""
    scale, zero_point = qp.scalar()
    with gm.graph.inserting_after(obs):
        q = gm.graph.call_function(
            ops.quantize_per_tensor.default, (obs.args[0], scale, zero_point, qp.qmin, qp.qmax, qp.dtype)
        )
    with gm.graph.inserting_after(q):
        dq = gm.graph.call_function(ops.dequantize_per_tensor.default, (q, scale, zero_point))
    for node in (q, dq):
        copy_meta(obs, node)
        node.meta[QPARAMS] = qp
    obs.replace_all_uses_with(dq)
    gm.graph.erase_node(obs)
    return q, dq


def _fake_quantize_weight(ctx: KernelContext, match: Match) -> None:
    """``w -> quantize_per_channel -> dequantize_per_channel -> conv`` on the float weight; an
    embedding table with float qparams: ``w -> quantize_float_qparams -> dequantize_float_qparams``."""
    assert match.pattern.weight_arg is not None
    w_node = match.anchor.args[match.pattern.weight_arg]
    _, qp = ctx.weights.get(ctx.gm, match)
    assert qp.axis is not None
    prefix = (match.module_path or match.anchor.name) + "_weight"
    scale = ctx.constant(prefix + "_scale", qp.scale)
    zero_point = ctx.constant(prefix + ("_offset" if qp.float_qparams else "_zero_point"), qp.zero_point)
    graph = ctx.gm.graph
    with graph.inserting_before(match.anchor):
        if qp.float_qparams:
            q = graph.call_function(ops.quantize_float_qparams.default, (w_node, scale, zero_point, qp.qmax))
            dq = graph.call_function(ops.dequantize_float_qparams.default, (q, scale, zero_point))
        else:
            q = graph.call_function(
                ops.quantize_per_channel.default, (w_node, scale, zero_point, qp.axis, qp.qmin, qp.qmax, qp.dtype)
            )
            dq = graph.call_function(ops.dequantize_per_channel.default, (q, scale, zero_point, qp.axis))
    for node in (q, dq):
        copy_meta(match.anchor, node)
    match.anchor.replace_input_with(w_node, dq)  # type: ignore[arg-type]


def _dynamic_reference(ctx: KernelContext, match: Match) -> None:
    """``x -> quantize_dynamic -> dequantize_dynamic -> linear(dq(q(w)))``.

    float16 weights: ``linear(x, w.half().float())``.
    """
    graph = ctx.gm.graph
    x = match.anchor.args[0]
    assert isinstance(x, fx.Node) and match.pattern.weight_arg is not None
    if match.qconfig.weight.dtype == torch.float16:
        ctx.weights.get_fp16(ctx.gm, match)  # warns once if the weight saturates
        w_node = match.anchor.args[match.pattern.weight_arg]
        limit = float(torch.finfo(torch.float16).max)
        with graph.inserting_before(match.anchor):
            clamped = graph.call_function(torch.ops.aten.clamp.default, (w_node, -limit, limit))
            half = graph.call_function(torch.ops.aten._to_copy.default, (clamped,), {"dtype": torch.float16})
            back = graph.call_function(torch.ops.aten._to_copy.default, (half,), {"dtype": torch.float32})
        match.anchor.replace_input_with(w_node, back)  # type: ignore[arg-type]
        return
    _fake_quantize_weight(ctx, match)
    per_token = match.qconfig.activation.observer == "dynamic_per_token"
    with graph.inserting_before(match.anchor):
        qd = graph.call_function(ops.quantize_dynamic.default, (x, per_token))
        parts = [graph.call_function(operator.getitem, (qd, i)) for i in range(3)]
        dq = graph.call_function(ops.dequantize_dynamic.default, tuple(parts))
    for node in (qd, *parts, dq):
        copy_meta(match.anchor, node)
    match.anchor.replace_input_with(x, dq)


def reference(
    gm: fx.GraphModule, matches: list[Match], ctx: KernelContext, qparams: dict[str, QParams]
) -> dict[fx.Node, fx.Node]:
    """Observers -> q/dq, weights -> fake-quantized. Returns the q node after each observed
    value."""
    quantized_at: dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, (Observer, SharedQParams)):
            source = module.source if isinstance(module, SharedQParams) else node.target
            observed = node.args[0]
            q, _ = _q_dq(gm, node, qparams[source])
            quantized_at[observed] = q
    for match in matches:
        if match.pattern.kind in ("weighted", "weight_only"):
            _fake_quantize_weight(ctx, match)
        elif match.pattern.kind == "dynamic":
            _dynamic_reference(ctx, match)
    return quantized_at


def _dynamic_input(match: Match) -> fx.Node:
    """The float input of a dynamic match in the reference graph (read from the graph, which
    earlier lowerings keep up to date): ``x`` of ``x -> quantize_dynamic -> getitem -> dequantize_dynamic``."""
    x = match.anchor.args[0]
    assert isinstance(x, fx.Node)
    if x.target is ops.dequantize_dynamic.default:
        x = x.args[0].args[0].args[0]  # type: ignore[union-attr]
    assert isinstance(x, fx.Node)
    return x


def kernel(gm: fx.GraphModule, matches: list[Match], ctx: KernelContext, quantized_at: dict[fx.Node, fx.Node]) -> None:
    """Each match's ``dq -> ops -> q`` becomes its pattern's kernel on uint8 values."""
    for match in matches:
        if match.pattern.lower_kernel is None:
            continue  # no int8 kernel: the reference form dq -> op -> q is the kernel graph
        ctx.match = match
        if match.pattern.kind in ("dynamic", "weight_only"):  # float out, no output quantize to replace
            dynamic = match.pattern.kind == "dynamic"
            float_in = [QValue(_dynamic_input(match), None)] if dynamic else []  # type: ignore[arg-type]
            new = match.pattern.lower_kernel(ctx, match, float_in, None)  # type: ignore[arg-type]
            new.meta[MATCH] = match
            match.output.replace_all_uses_with(new)
            continue
        inputs = []
        for dq in activation_inputs(match):
            assert dq.target is ops.dequantize_per_tensor.default, f"{match.pattern.name}: input {dq} not quantized"
            inputs.append(QValue(dq.args[0], dq.meta[QPARAMS]))  # type: ignore[arg-type]
        out_q = quantized_at[match.output]
        new = match.pattern.lower_kernel(ctx, match, inputs, out_q.meta[QPARAMS])
        new.meta[MATCH] = match
        new.meta[QPARAMS] = out_q.meta[QPARAMS]
        out_q.replace_all_uses_with(new)
        gm.graph.erase_node(out_q)


def drop_unused_state(gm: fx.GraphModule) -> None:
    """Delete parameters, buffers and submodules no node reads (float weights after lowering)."""
    gm.graph.eliminate_dead_code()
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    # int8 weights behind packed oneDNN weights are the saved state the packs are rebuilt from
    used |= {str(entry["int8"]) for entry in getattr(gm, PACKED, {}).values()}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            module = gm.get_submodule(owner)
            if leaf in module._parameters:
                del module._parameters[leaf]
            elif leaf in module._buffers:
                del module._buffers[leaf]
    gm.delete_all_unused_submodules()


def _report(gm: fx.GraphModule, qparams: dict[str, QParams], qconfig_dict: Any, mode: str, backend: str) -> ConversionReport:
    """A line per compute node: quantized (pattern, kernel, output qparams) or float and why."""
    report = ConversionReport(mode, backend)
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target in _BOOKKEEPING:
            continue
        path, op = module_path(node), str(node.target)
        match = node.meta.get(MATCH)
        if match is not None and match.pattern.kind in ("dynamic", "weight_only"):
            report.nodes.append(NodeReport(node.name, op, path, True, pattern=match.pattern.name,
                                           kernel=match.pattern.kernel, qconfig_key=match.qconfig_key))  # fmt: skip
        elif match is not None and match.output_observer is not None:
            source = match.output_observer
            module = gm.get_submodule(source)
            qp = qparams[module.source if isinstance(module, SharedQParams) else source]
            scale, zero_point = qp.scalar()
            report.nodes.append(NodeReport(node.name, op, path, True, pattern=match.pattern.name,
                                           kernel=match.pattern.kernel, qconfig_key=match.qconfig_key,
                                           scale=scale, zero_point=zero_point))  # fmt: skip
        else:
            report.nodes.append(NodeReport(node.name, op, path, False, reason=float_reason(node, qconfig_dict)))
    return report


def float_reason(node: fx.Node, qconfig_dict: Any) -> str:
    """Why a compute node stayed float."""
    if FLOAT_REASON in node.meta:
        return str(node.meta[FLOAT_REASON])
    resolved = resolve(qconfig_dict, module_path(node))
    if resolved.qconfig is None:
        return f"qconfig_dict[{resolved.key!r}] is None" if resolved.key is not None else "no qconfig_dict key applies"
    return f"no quantized pattern for {node.target}"


def lower(gm: fx.GraphModule, debug: bool, backend: str, qconfig_dict: Any) -> ConversionReport:
    """Convert a calibrated prepared graph in place: reference graph, then kernels unless ``debug``.

    Returns the conversion report.
    """
    qparams = observer_qparams(gm)
    report = _report(gm, qparams, qconfig_dict, "reference" if debug else "kernel", backend)
    float_out = ("dynamic", "weight_only")  # kinds without an output observer
    matches = [m for m in matches_of(gm) if m.output_observer is not None or m.pattern.kind in float_out]
    ctx = KernelContext(gm, backend, WeightCache())
    quantized_at = reference(gm, matches, ctx, qparams)
    if not debug:
        kernel(gm, matches, ctx, quantized_at)
    drop_unused_state(gm)
    gm.graph.lint()
    gm.recompile()
    return report
