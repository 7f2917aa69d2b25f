"""Rewrites of a kernel graph that change how it runs, not what it computes.

Run by :func:`graphquant.passes.lower.lower` after lowering, unless ``fuse=False``
(numerics compares every node's own output, which these rewrites merge or overwrite):

- :func:`fold_activations`: a float activation between a linear and the quantize after it
  becomes the linear's post-op (the same single rounding);
- :func:`share_gemms`: linears reading one input (attention's query, key, value) run as one
  GEMM over their weights side by side (bit-identical);
- :func:`donate_accumulators`: a residual join whose accum nothing reads afterwards lets
  oneDNN write the sum into it instead of into a copy (bit-identical).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import fx

from graphquant.graph import QPARAMS, constant_node, copy_meta, get_attr_value, module_path, named_args
from graphquant.kernels import onednn
from graphquant.patterns.post_ops import POST_OP_TARGETS, post_op
from graphquant.quantized import packed_weights

ops = torch.ops.graphquant
aten = torch.ops.aten


def fold_activations(gm: fx.GraphModule) -> int:
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
        if (qmin, dtype) != (0, torch.uint8) or qmax not in (127, 255):  # the kernel writes uint8 on 0..255
            continue
        name, scalars = post_op(act)
        x_qmax = named_args(node)["x_qmax"]
        with gm.graph.inserting_before(act):
            new = gm.graph.call_function(ops.qlinear.default, (*node.args[:6], scale, zero_point, name, scalars, False,
                                                               x_qmax))
            out = new if qmax == 255 else gm.graph.call_function(aten.clamp_max.default, (new, qmax))  # a 7-bit grid
        for n in {new, out}:
            copy_meta(node, n)
            n.meta[QPARAMS] = quantizes[0].meta.get(QPARAMS)
        for q in quantizes:
            q.replace_all_uses_with(out)
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
        new = gm.graph.call_function(ops.qlinear_dynamic.default, (*node.args, name, scalars), dict(node.kwargs))
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
    packed = packed_weights(gm)
    if set(node.kwargs) - {"x_qmax"} or any(user.op == "output" for user in node.users):
        return None  # a returned output stays its own contiguous tensor
    if node.target is ops.qlinear.default and len(node.args) == 11:
        x, x_scale, x_zero_point, w, w_scale, bias, _, _, post_op, _, float_out = node.args
        key: tuple[Any, ...] = ("static", x, x_scale, x_zero_point, node.kwargs.get("x_qmax", 255))
        if not float_out or post_op != "none":
            return None
    elif node.target is ops.qlinear_dynamic.default and len(node.args) == 5:
        x, w, w_scale, bias, per_token = node.args
        key = ("dynamic", x, per_token, node.kwargs.get("x_qmax", 255))
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
    int8 = getattr(gm, str(packed_weights(gm)[str(w.target)]["int8"]))
    return int8, get_attr_value(gm, w_scale), get_attr_value(gm, bias) if bias is not None else None


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
        int8_node = constant_node(gm, prefix + "_int8", int8)
        packed_node = constant_node(gm, prefix + "_packed", onednn.pack_linear(int8), buffer=False)
        packed_weights(gm)[str(packed_node.target)] = {"int8": int8_node.target, "pack": "pack_linear"}
        scale_node = constant_node(gm, prefix + "_scale", w_scale)
        bias_node = constant_node(gm, prefix + "_bias", bias) if bias is not None else None
        if first.target is ops.qlinear.default:
            args = (*first.args[:3], packed_node, scale_node, bias_node, *first.args[6:])
        else:
            args = (first.args[0], packed_node, scale_node, bias_node, first.args[4])
        with gm.graph.inserting_before(first):
            shared = gm.graph.call_function(cast(Any, first.target), args, dict(first.kwargs))
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


def _fresh_output(node: fx.Node) -> bool:
    """``node`` is a graphquant op or the clamp of a 7-bit grid after one: its output is a new tensor,
    aliasing no other value of the graph (a donated qconv_add writes into its accum, which nothing
    reads afterwards)."""
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and (
        node.target.namespace == "graphquant" or node.target is aten.clamp_max.default)


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
    copy per bottleneck block, 16 a call, about 2 ms of 165 at batch 8). The copy is not needed when
    ``accum`` is a graphquant op's fresh output and every other reader of it is a graphquant op
    this conv depends on (so any order that respects the graph's data flow — the interpreter's,
    TorchScript's — has run them): the identity of a ResNet block, read by the block's first
    conv and its join. Not when ``accum`` is also the conv's input, a graph output or an input
    of the model. Returns how many were donated.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    donated = 0
    for node in gm.graph.nodes:
        if node.target not in _CONV_ADDS:
            continue
        named = named_args(node)
        accum = named["accum"]
        if named["accum_donated"] or not isinstance(accum, fx.Node) or not _fresh_output(accum) or (
                named["x"] is accum):
            continue
        others = [u for u in accum.users if u is not node]
        if any(not _fresh_output(u) for u in others):
            continue
        if others and not set(others) <= _ancestors(node, order[accum], order):
            continue
        named["accum_donated"] = True
        node.args, node.kwargs = tuple(named.values()), {}
        donated += 1
    return donated
