"""Convert a calibrated graph: observers become quantize/dequantize (reference), then
matched patterns become int8 kernels (kernel mode). Both modes start from one annotation.

Reference (``debug=True``), keeping float weights::

    x -> obs0 -> conv(w) -> relu -> obs1 -> y
    x -> q0 -> dq0 -> conv(dq(q(w))) -> relu -> q1 -> dq1 -> y

Kernel, from the reference graph: each match's ``dq -> ops -> q`` becomes one kernel
reading the uint8 input of its ``dq`` and writing the uint8 its ``q`` produced::

    x -> q0 -> qconv2d(relu) -> dq1 -> y

Float output at the border: a match whose pattern can return float (``float_output``:
linear) and whose output only float ops read (a residual add and LayerNorm kept float, the
model output) is not quantized at its output in either graph: the reference keeps the float
result, the kernel writes float32 directly. Quantizing there would round a value that is
dequantized at once; on all-MiniLM-L6-v2 with only the linears int8 that rounding took the
sentence embeddings' cosine from 0.993 to 0.949.

An op returning several tensors is rewired item by item: the reference
``q0 -> dq0 -> max -> getitem_0 -> q1 -> dq1``, ``max -> getitem_1 -> indices`` becomes
``q0 -> max(uint8) -> getitem_0 -> dq1``, ``max(uint8) -> getitem_1 -> indices``.
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
    constant_node,
    copy_meta,
    get_attr_value,
    matches_of,
    module_path,
    node_qconfig,
)
from graphquant.kernels import registry, x86
from graphquant.observers import Observer, SharedQParams, SmoothingObserver
from graphquant.passes.bias_correction import correct_bias
from graphquant.passes.fuse import donate_accumulators, fold_activations, share_gemms
from graphquant.passes.smooth import smooth
from graphquant.patterns.context import KernelContext, QValue, WeightCache
from graphquant.patterns.dynamic_linear import asymmetric_rows
from graphquant.qconfig import activation_qmax
from graphquant.quant_math import QParams
from graphquant.quantized import packed_weights
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
    """Replace an observer node by ``quantize -> dequantize`` with its qparams. A smoothed input
    (SmoothQuant, graphquant.passes.smooth) is multiplied by ``1 / s`` first — one elementwise pass
    that Inductor fuses into the quantize; a per-channel quantize at ``scale * s`` measured 4-30x
    slower than the two passes (BERT-base shapes) — and its readers' weights carry ``s``; where
    ``1 / s`` was folded into the LayerNorm before, nothing is added."""
    scale, zero_point = qp.scalar()
    module = gm.get_submodule(str(obs.target))
    x, last = obs.args[0], obs
    if isinstance(module, SmoothingObserver) and module.smoothing.numel() and not module.folded:
        inverse = constant_node(gm, str(obs.target) + "_inverse_smoothing", (1.0 / module.smoothing).float())
        with gm.graph.inserting_after(obs):
            x = last = gm.graph.call_function(torch.ops.aten.mul.Tensor, (x, inverse))
        copy_meta(obs, last)
    with gm.graph.inserting_after(last):
        q = gm.graph.call_function(ops.quantize_per_tensor.default, (x, scale, zero_point, qp.qmin, qp.qmax, qp.dtype))
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
        qmax = activation_qmax(match.qconfig.activation, ctx.backend == "onednn" and x86.saturates())
        kwargs: dict[str, Any] = {"qmax": qmax} if qmax < 255 else {}
        if per_token and asymmetric_rows(match, x):
            kwargs["asymmetric"] = True
        qd = graph.call_function(ops.quantize_dynamic.default, (x, per_token), kwargs)
        parts = [graph.call_function(operator.getitem, (qd, i)) for i in range(3)]
        dq = graph.call_function(ops.dequantize_dynamic.default, tuple(parts))
    for node in (qd, *parts, dq):
        copy_meta(match.anchor, node)
    match.anchor.replace_input_with(x, dq)


def _reads_quantized(gm: fx.GraphModule, user: fx.Node) -> bool:
    """Whether ``user`` of an output observer consumes the value quantized."""
    if user.op == "call_module" and isinstance(gm.get_submodule(str(user.target)), SharedQParams):
        return True
    match = user.meta.get(MATCH)
    return match is not None and (match.output_observer is not None or match.pattern.kind == "dynamic")


def float_output_observers(gm: fx.GraphModule, matches: list[Match]) -> set[str]:
    """Output observers of ``float_output`` matches that no quantized op reads."""
    names = set()
    for match in matches:
        if not match.pattern.float_output or match.output_observer is None:
            continue
        observer = next((u for u in match.output.users if u.op == "call_module"
                         and str(u.target) == match.output_observer), None)
        if observer is not None and not any(_reads_quantized(gm, u) for u in observer.users):
            names.add(match.output_observer)
    return names


def reference(
    gm: fx.GraphModule,
    matches: list[Match],
    ctx: KernelContext,
    qparams: dict[str, QParams],
    float_outputs: set[str] = frozenset(),  # type: ignore[assignment]
) -> dict[fx.Node, fx.Node]:
    """Observers -> q/dq, weights -> fake-quantized. Returns the q node after each observed
    value. Observers in ``float_outputs`` are dropped: their value stays float."""
    quantized_at: dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        if str(node.target) in float_outputs:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
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
        if match.outputs:
            _lower_items(ctx, match, inputs, quantized_at)
            continue
        out_q = quantized_at.get(match.output)
        if out_q is None:  # float output at the border: the kernel writes float32
            new = match.pattern.lower_kernel(ctx, match, inputs, None)  # type: ignore[arg-type]
            new.meta[MATCH] = match
            match.output.replace_all_uses_with(new)
            continue
        new = match.pattern.lower_kernel(ctx, match, inputs, out_q.meta[QPARAMS])
        new.meta[MATCH] = match
        new.meta[QPARAMS] = out_q.meta[QPARAMS]
        new = _clamp_to_grid(gm, match, new)
        out_q.replace_all_uses_with(new)
        gm.graph.erase_node(out_q)


def _clamp_to_grid(gm: fx.GraphModule, match: Match, new: fx.Node) -> fx.Node:
    """``new`` clamped to its grid's ``qmax`` where the grid ends below the dtype's (``reduce_range``:
    0..127). The kernels round onto 0..255; the reference graph's quantize clamps at 127, and a
    value above 127 would take the two-call path on x86 CPUs without VNNI. Ops that pass their
    input's integers through (``shares_qparams``) cannot leave the grid and get no clamp.

    ``x -> qconv2d -> y`` becomes ``x -> qconv2d -> clamp_max(127) -> y``.
    """
    qparams: QParams = new.meta[QPARAMS]
    if match.pattern.kind == "shares_qparams" or qparams.dtype != torch.uint8 or qparams.qmax >= 255:
        return new
    with gm.graph.inserting_after(new):
        clamped = gm.graph.call_function(torch.ops.aten.clamp_max.default, (new, qparams.qmax))
    copy_meta(new, clamped)
    clamped.meta[QPARAMS] = qparams
    return clamped


def _lower_items(ctx: KernelContext, match: Match, inputs: list[QValue], quantized_at: dict[fx.Node, fx.Node]) -> None:
    """Every ``getitem`` of a multi-output op reads the uint8 op instead: a value item replaces
    its ``quantize`` (same qparams: the op preserves values), an index item its float twin."""
    assert match.pattern.lower_kernel is not None
    graph = ctx.gm.graph
    new = match.pattern.lower_kernel(ctx, match, inputs, quantized_at[match.output].meta[QPARAMS])
    last = new
    for item in list(match.anchor.users):
        with graph.inserting_after(last):
            last = graph.call_function(operator.getitem, (new, item.args[1]))
        copy_meta(item, last)
        if item in match.outputs:
            out_q = quantized_at[item]
            last.meta[QPARAMS] = out_q.meta[QPARAMS]
            if item is match.output:  # the node holding the match's value, as a kernel's output does
                last.meta[MATCH] = match
            out_q.replace_all_uses_with(last)
            graph.erase_node(out_q)
        else:
            item.replace_all_uses_with(last)


def drop_unused_state(gm: fx.GraphModule) -> None:
    """Delete parameters, buffers and submodules no node reads (float weights after lowering)."""
    gm.graph.eliminate_dead_code()
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    # int8 weights behind packed oneDNN weights are the saved state the packs are rebuilt from
    packed = packed_weights(gm)
    for name in [name for name in packed if name not in used]:  # packs merged away (share_gemms)
        del packed[name]
        if hasattr(gm, name):
            delattr(gm, name)
    used |= {str(entry["int8"]) for entry in packed.values()}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            module = gm.get_submodule(owner)
            if leaf in module._parameters:
                del module._parameters[leaf]
            elif leaf in module._buffers:
                del module._buffers[leaf]
    gm.delete_all_unused_submodules()


def _report(
    gm: fx.GraphModule, qparams: dict[str, QParams], mode: str, backend: str, float_outputs: set[str],
    costs: dict[str, float | None],
) -> ConversionReport:
    """A line per compute node: quantized (pattern, kernel, output qparams) or float and why; a GEMM
    whose input went to 7 bits on this CPU (``reduce_range="auto"``) with what that cost its input."""
    report = ConversionReport(mode, backend)
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target in _BOOKKEEPING:
            continue
        path, op = module_path(node), str(node.target)
        match = node.meta.get(MATCH)
        bits = activation_bits(gm, match) if match is not None and backend == "onednn" else None
        depthwise = bits is not None and depthwise_conv(gm, node)
        source = _input_source(gm, match) if bits == 7 and node is match.anchor else None
        cost = costs.get(source) if source is not None else None
        if match is not None and match.pattern.kind in ("dynamic", "weight_only"):
            report.nodes.append(NodeReport(node.name, op, path, True, pattern=match.pattern.name,
                                           kernel=match.pattern.kernel, qconfig_key=match.qconfig_key,
                                           activation_bits=bits))
        elif match is not None and match.output_observer in float_outputs:
            report.nodes.append(NodeReport(node.name, op, path, True, pattern=match.pattern.name,
                                           kernel=match.pattern.kernel, qconfig_key=match.qconfig_key,
                                           activation_bits=bits, depthwise=depthwise, bits_cost_db=cost))
        elif match is not None and match.output_observer is not None:
            source = match.output_observer
            module = gm.get_submodule(source)
            qp = qparams[module.source if isinstance(module, SharedQParams) else source]
            scale, zero_point = qp.scalar()
            report.nodes.append(NodeReport(node.name, op, path, True, pattern=match.pattern.name,
                                           kernel=match.pattern.kernel, qconfig_key=match.qconfig_key,
                                           scale=scale, zero_point=zero_point, activation_bits=bits,
                                           depthwise=depthwise, bits_cost_db=cost))
        else:
            report.nodes.append(NodeReport(node.name, op, path, False, reason=float_reason(node)))
    return report


def depthwise_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is an ``aten.conv{1,2,3}d`` with one input and one output channel per group,
    which oneDNN runs with a kernel of its own (kernels.x86.is_depthwise)."""
    if node.target not in (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default,
                           torch.ops.aten.conv3d.default) or len(node.args) < 7:
        return False
    weight, groups = node.args[1], node.args[6]
    if not isinstance(weight, fx.Node) or weight.op != "get_attr" or not isinstance(groups, int):
        return False
    return x86.is_depthwise(get_attr_value(gm, weight), groups)


def _input_source(gm: fx.GraphModule, match: Match) -> str | None:
    """The observer whose qparams a match's first activation input carries (through a shared-qparams
    marker), or None (dynamic: quantized per batch)."""
    for observer in match.input_observers.values():
        module = gm.get_submodule(observer)
        return module.source if isinstance(module, SharedQParams) else observer
    return None


def activation_bits(gm: fx.GraphModule, match: Match) -> int | None:
    """7 or 8: the calibrated grid of the uint8 activation a oneDNN GEMM or conv reads (7 with
    ``reduce_range``), which picks its path on x86 CPUs without VNNI; None for other kernels."""
    if match.pattern.kernel not in registry.names(gemm=True):
        return None
    source = _input_source(gm, match)
    if source is not None:
        return 7 if getattr(gm.get_submodule(source), "reduce_range", False) is True else 8
    return 7 if activation_qmax(match.qconfig.activation, x86.saturates()) <= 127 else 8  # dynamic: per batch


def resolve_auto_ranges(gm: fx.GraphModule, matches: list[Match], backend: str) -> dict[str, float | None]:
    """Each observer of ``reduce_range="auto"`` takes the 7-bit grid where a oneDNN GEMM or conv that
    saturates on this CPU reads its value (x86 without VNNI: one exact int8 call there, where 8 bits run
    as the float32 op over the integers at about fp32 speed; kernels/x86.py), else the full grid.
    Returns, for each observer put on 7 bits, what that costs its value: the SQNR difference of the
    best 8-bit and 7-bit ranges of its histogram (None for observers without one)."""
    readers: dict[str, list[Match]] = {}
    for match in matches:
        source = _input_source(gm, match)
        if source is not None and match.pattern.kernel in registry.names(gemm=True):
            readers.setdefault(source, []).append(match)
    costs: dict[str, float | None] = {}
    for name, module in gm.named_children():
        if not isinstance(module, Observer) or module.reduce_range != "auto":
            continue
        seven = backend == "onednn" and any(x86.saturates(depthwise_conv(gm, m.anchor)) for m in readers.get(name, []))
        module.use_reduce_range(seven)
        if seven:
            sqnr = getattr(module, "expected_sqnr_db", None)
            full, reduced = (sqnr(False), sqnr(True)) if sqnr is not None else (None, None)
            costs[name] = None if full is None or reduced is None else full - reduced
    return costs


def float_reason(node: fx.Node) -> str:
    """Why a compute node stayed float."""
    if FLOAT_REASON in node.meta:
        return str(node.meta[FLOAT_REASON])
    resolved = node_qconfig(node)
    if resolved.qconfig is None:
        return f"qconfig_dict[{resolved.key!r}] is None" if resolved.key is not None else "no qconfig_dict key applies"
    return f"no quantized pattern for {node.target}"


def lower(gm: fx.GraphModule, debug: bool, backend: str, fuse: bool = True) -> ConversionReport:
    """Convert a calibrated prepared graph in place: reference graph, then kernels unless ``debug``.

    ``fuse=False`` leaves out the rewrites of :mod:`graphquant.passes.fuse` (numerics compares
    each node's own output). Returns the conversion report.
    """
    costs = resolve_auto_ranges(gm, matches_of(gm), backend)  # first: every later range is on its grid
    smoothing = smooth(gm, matches_of(gm))  # before qparams: it sets the smoothed inputs' ranges
    corrected = correct_bias(gm, matches_of(gm))  # after smoothing: it corrects the smoothed weights
    qparams = observer_qparams(gm)
    float_out = ("dynamic", "weight_only")  # kinds without an output observer
    matches = [m for m in matches_of(gm) if m.output_observer is not None or m.pattern.kind in float_out]
    float_outputs = float_output_observers(gm, matches)
    report = _report(gm, qparams, "reference" if debug else "kernel", backend, float_outputs, costs)
    report.smoothing, report.bias_correction = smoothing, corrected
    ctx = KernelContext(gm, backend, WeightCache())
    quantized_at = reference(gm, matches, ctx, qparams, float_outputs)
    if not debug:
        kernel(gm, matches, ctx, quantized_at)
        if fuse:
            fold_activations(gm)
            if backend == "onednn":
                share_gemms(gm)
    drop_unused_state(gm)  # dead code out first: a dead reader of an accum would block its donation
    if not debug and fuse:
        donate_accumulators(gm)
    gm.graph.lint()
    gm.recompile()
    return report
