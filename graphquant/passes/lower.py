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
import warnings
from typing import Any, cast

import torch
from torch import fx

from graphquant.errors import GraphQuantError
from graphquant.graph import (
    FLOAT_REASON,
    MATCH,
    QPARAMS,
    Match,
    activation_inputs,
    add_attr,
    copy_meta,
    get_attr_value,
    matches_of,
    module_path,
)
from graphquant.kernels import onednn
from graphquant.observers import Observer, SharedQParams
from graphquant.patterns.context import PACKED, KernelContext, QValue, WeightCache
from graphquant.patterns.post_ops import POST_OP_TARGETS, post_op
from graphquant.qconfig import resolve
from graphquant.quant_math import QParams
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
                         and str(u.target) == match.output_observer), None)  # fmt: skip
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
        out_q.replace_all_uses_with(new)
        gm.graph.erase_node(out_q)


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


def fuse_float_activations(gm: fx.GraphModule) -> int:
    """``qlinear(float_out) -> activation -> quantize`` becomes one ``qlinear`` with the
    activation as its post-op, writing uint8; ``qlinear_dynamic -> activation`` one
    ``qlinear_dynamic`` with the post-op. Returns how many were fused.

    The activation was kept float (its module has no qconfig, as in the linears-only recipe
    for a transformer's FFN: ``dense -> gelu -> dense``), but its output is rounded right
    away for the next int8 linear. oneDNN applies the activation to the float result before
    its one rounding, so the fused call computes what the reference graph does,
    ``linear -> gelu -> quantize``, without the float32 tensor in between (four times the
    bytes of the uint8 one, at batch 50 on all-MiniLM-L6-v2 39 MB per layer) and without
    the separate activation and quantize passes over it.
    """
    gm.graph.eliminate_dead_code()
    fused = 0
    for node in list(gm.graph.nodes):
        if node.target is ops.qlinear_dynamic.default and len(node.users) == 1:
            fused += _fuse_dynamic_activation(gm, node)
            continue
        if node.target is not ops.qlinear.default or len(node.users) != 1:
            continue
        float_out = len(node.args) > 10 and bool(node.args[10])  # schema: post_op_args=[], float_out=False
        if not float_out or node.args[8] != "none":
            continue
        act = next(iter(node.users))
        if act.op != "call_function" or act.target not in POST_OP_TARGETS or act.args[0] is not node:
            continue
        quantizes = list(act.users)
        if not quantizes or any(q.target is not ops.quantize_per_tensor.default for q in quantizes):
            continue
        grids = {tuple(q.args[1:]) for q in quantizes}  # (scale, zero_point, qmin, qmax, dtype)
        if len(grids) != 1:
            continue
        scale, zero_point, qmin, qmax, dtype = grids.pop()
        if (qmin, qmax, dtype) != (0, 255, torch.uint8):  # the kernel's uint8 output spans 0..255
            continue
        name, scalars = post_op(act)
        with gm.graph.inserting_before(act):
            new = gm.graph.call_function(ops.qlinear.default, (*node.args[:6], scale, zero_point, name, scalars, False))
        copy_meta(node, new)
        new.meta[QPARAMS] = quantizes[0].meta.get(QPARAMS)
        for q in quantizes:
            q.replace_all_uses_with(new)
            gm.graph.erase_node(q)
        gm.graph.erase_node(act)
        gm.graph.erase_node(node)
        fused += 1
    return fused


def _fuse_dynamic_activation(gm: fx.GraphModule, node: fx.Node) -> int:
    """``qlinear_dynamic -> activation`` becomes ``qlinear_dynamic(post_op=...)``: both are float32
    out, and the per-tensor kernel applies the activation inside oneDNN's GEMM call."""
    act = next(iter(node.users))
    if len(node.args) > 5 or act.op != "call_function" or act.target not in POST_OP_TARGETS or act.args[0] is not node:
        return 0
    name, scalars = post_op(act)
    with gm.graph.inserting_before(act):
        new = gm.graph.call_function(ops.qlinear_dynamic.default, (*node.args, name, scalars))
    copy_meta(node, new)
    act.replace_all_uses_with(new)
    gm.graph.erase_node(act)
    gm.graph.erase_node(node)
    return 1


# views a slice of a shared GEMM's output may travel through on its way to a float op
_VIEWS = {
    torch.ops.aten.view.default,
    torch.ops.aten.permute.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten.squeeze.dim,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.expand.default,
    torch.ops.aten.select.int,
    torch.ops.aten.t.default,
}


def _shared_gemm_key(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, ...] | None:
    """What linears must share to run as one GEMM with their weights side by side: the input,
    its qparams (or per-token scheme), float32 out without a post-op; packed oneDNN weights."""
    packed = getattr(gm, PACKED, {})
    if node.kwargs:
        return None
    if node.target is ops.qlinear.default and len(node.args) == 11:
        x, x_scale, x_zero_point, w, w_scale, bias, _, _, post_op, _, float_out = node.args
        key: tuple[Any, ...] = ("static", x, x_scale, x_zero_point)
        if not float_out or post_op != "none":
            return None
    elif node.target is ops.qlinear_dynamic.default and len(node.args) == 5:
        x, w, w_scale, bias, per_token = node.args
        key = ("dynamic", x, per_token)
    else:
        return None
    weights = (w, w_scale) + ((bias,) if bias is not None else ())
    if not all(isinstance(n, fx.Node) and n.op == "get_attr" for n in weights):
        return None
    if packed.get(str(cast(fx.Node, w).target), {}).get("pack") != "pack_linear":
        return None
    return key


def _weight_part(gm: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """int8 weight (out, in), its scales and float bias of a qlinear / qlinear_dynamic node."""
    w, w_scale, bias = cast(
        "tuple[fx.Node, fx.Node, fx.Node | None]",
        node.args[3:6] if node.target is ops.qlinear.default else node.args[1:4],
    )
    int8 = getattr(gm, str(getattr(gm, PACKED)[str(w.target)]["int8"]))
    return int8, get_attr_value(gm, w_scale), get_attr_value(gm, bias) if bias is not None else None


def _get_attr(gm: fx.GraphModule, prefix: str, value: torch.Tensor, buffer: bool = True) -> fx.Node:
    name = add_attr(gm, prefix, value, buffer)
    with gm.graph.inserting_before(next(iter(gm.graph.nodes))), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx warns on get_attr of a non-buffer (the packed weight)
        return gm.graph.get_attr(name)


def share_gemms(gm: fx.GraphModule) -> int:
    """Linears reading the same input become one GEMM over their weights side by side.

    Attention's query, key and value projections read one hidden state: three oneDNN calls,
    and in dynamic mode three per-batch quantizes of the same tensor. One call with the
    three int8 weights concatenated along the output features computes the same numbers —
    the weight scales are per output channel, the input and its qparams are shared, each
    output feature is its own dot product — and each former output is a slice of the last
    dimension. Only float32-out linears without a post-op share (a uint8 output would need
    one output grid for all). ``aten.view`` nodes reading the slices become ``aten.reshape``
    (the same view where the strides allow it; a slice is not contiguous). Returns how many
    linears were merged away.
    """
    groups: dict[tuple[Any, ...], list[fx.Node]] = {}
    for node in gm.graph.nodes:
        key = _shared_gemm_key(gm, node)
        if key is not None:
            groups.setdefault(key, []).append(node)
    merged = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        parts = [_weight_part(gm, n) for n in members]
        widths = [int8.shape[0] for int8, _, _ in parts]
        int8 = torch.cat([p[0] for p in parts])
        w_scale = torch.cat([p[1] for p in parts])
        biases = [p[2] if p[2] is not None else torch.zeros(width) for p, width in zip(parts, widths, strict=True)]
        bias = torch.cat(biases) if any(p[2] is not None for p in parts) else None
        first = members[0]
        prefix = f"{module_path(first) or first.name}_shared_gemm_weight"
        int8_node = _get_attr(gm, prefix + "_int8", int8)
        packed_node = _get_attr(gm, prefix + "_packed", onednn.pack_linear(int8), buffer=False)
        getattr(gm, PACKED)[packed_node.target] = {"int8": int8_node.target, "pack": "pack_linear"}
        scale_node = _get_attr(gm, prefix + "_scale", w_scale)
        bias_node = _get_attr(gm, prefix + "_bias", bias) if bias is not None else None
        if first.target is ops.qlinear.default:
            args = (*first.args[:3], packed_node, scale_node, bias_node, *first.args[6:])
        else:
            args = (first.args[0], packed_node, scale_node, bias_node, first.args[4])
        with gm.graph.inserting_before(first):
            shared = gm.graph.call_function(cast(Any, first.target), args)
        copy_meta(first, shared)
        shared.meta.pop("val", None)
        start, cursor = 0, shared
        for node, width in zip(members, widths, strict=True):
            with gm.graph.inserting_after(cursor):
                part = gm.graph.call_function(torch.ops.aten.slice.Tensor, (shared, -1, start, start + width))
            cursor = part
            copy_meta(node, part)
            node.replace_all_uses_with(part)
            gm.graph.erase_node(node)
            _reshape_views(part)
            start += width
        merged += len(members) - 1
    return merged


def _reshape_views(node: fx.Node) -> None:
    """``aten.view`` downstream of ``node`` through view ops becomes ``aten.reshape``."""
    todo = [node]
    while todo:
        for user in list(todo.pop().users):
            if user.target is torch.ops.aten.view.default:
                user.target = torch.ops.aten.reshape.default
            if user.target in _VIEWS or user.target is torch.ops.aten.reshape.default:
                todo.append(user)


_CONV_ADDS = (ops.qconv1d_add.default, ops.qconv2d_add.default)
_ACCUM = 10  # qconvNd_add's accum argument


def _fresh_output(node: fx.Node) -> bool:
    """``node`` is a graphquant op: its output is a new tensor, aliasing no other value of
    the graph (a donated qconv_add's output is its accum, which nothing else reads)."""
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target.namespace == "graphquant")  # fmt: skip


def _ancestors(node: fx.Node, stop: int, order: dict[fx.Node, int]) -> set[fx.Node]:
    """The nodes ``node`` depends on, down to position ``stop`` in the graph."""
    seen: set[fx.Node] = set()
    todo = list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n in seen or order[n] <= stop:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def donate_accumulators(gm: fx.GraphModule) -> int:
    """Let each ``qconvNd_add`` whose ``accum`` nothing reads afterwards take the sum in place.

    oneDNN's sum post-op writes into its accum, so the kernel copies it (ResNet-50: one uint8
    copy per bottleneck block, 11 ms of a 100 ms call at batch 8). The copy is not needed when
    ``accum`` is a graphquant op's fresh output and every other reader of it is a graphquant op
    this conv depends on (so any order that respects the graph's data flow — the interpreter's,
    TorchScript's — has run them): the identity of a ResNet block, read by the block's first
    conv and its join. Not when ``accum`` is also the conv's input, a graph output or an input
    of the model. Returns how many were donated.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    donated = 0
    for node in gm.graph.nodes:
        if node.target not in _CONV_ADDS or len(node.args) != _ACCUM + 6 or node.kwargs:
            continue
        accum = node.args[_ACCUM]
        if not isinstance(accum, fx.Node) or not _fresh_output(accum) or node.args[0] is accum:
            continue
        others = [u for u in accum.users if u is not node]
        if any(not _fresh_output(u) for u in others):
            continue
        if others and not set(others) <= _ancestors(node, order[accum], order):
            continue
        node.args = (*node.args, True)
        donated += 1
    return donated


def drop_unused_state(gm: fx.GraphModule) -> None:
    """Delete parameters, buffers and submodules no node reads (float weights after lowering)."""
    gm.graph.eliminate_dead_code()
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    # int8 weights behind packed oneDNN weights are the saved state the packs are rebuilt from
    packed = getattr(gm, PACKED, {})
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
    gm: fx.GraphModule, qparams: dict[str, QParams], qconfig_dict: Any, mode: str, backend: str, float_outputs: set[str]
) -> ConversionReport:
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
        elif match is not None and match.output_observer in float_outputs:
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


def lower(gm: fx.GraphModule, debug: bool, backend: str, qconfig_dict: Any, fuse: bool = True) -> ConversionReport:
    """Convert a calibrated prepared graph in place: reference graph, then kernels unless ``debug``.

    ``fuse=False`` leaves float activations after linears unfolded and every residual accum
    intact (numerics compares each node's own output). Returns the conversion report.
    """
    qparams = observer_qparams(gm)
    float_out = ("dynamic", "weight_only")  # kinds without an output observer
    matches = [m for m in matches_of(gm) if m.output_observer is not None or m.pattern.kind in float_out]
    float_outputs = float_output_observers(gm, matches)
    report = _report(gm, qparams, qconfig_dict, "reference" if debug else "kernel", backend, float_outputs)
    ctx = KernelContext(gm, backend, WeightCache())
    quantized_at = reference(gm, matches, ctx, qparams, float_outputs)
    if not debug:
        kernel(gm, matches, ctx, quantized_at)
        if fuse:
            fuse_float_activations(gm)
            if backend == "onednn":
                share_gemms(gm)
    drop_unused_state(gm)  # dead code out first: a dead reader of an accum would block its donation
    if not debug and fuse:
        donate_accumulators(gm)
    gm.graph.lint()
    gm.recompile()
    return report
