"""Match the pattern table against the graph, once, and write a ``Match`` on each node.

``x -> conv -> relu -> y`` gets ``meta[MATCH]`` on ``conv`` and ``relu`` pointing at one
``Match(conv2d_relu, ...)``. Nodes whose module's qconfig is ``None`` are not matched.
An op returning several tensors, ``split -> getitem_0, getitem_1``, is matched alone; its
``getitem`` nodes reading quantized items become ``Match.outputs`` (they carry no record).
Observer insertion and lowering read these records; nothing searches the graph again.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from graphquant.graph import (
    FLOAT_REASON,
    MATCH,
    Match,
    activation_inputs,
    is_constant,
    is_float_tensor,
    module_path,
    node_qconfig,
)
from graphquant.patterns import Pattern, patterns_for


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    """Whether two values surely have one shape and dtype (symbolic batch sizes included)."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)) or va.dtype != vb.dtype:
        return False
    return va.dim() == vb.dim() and all(statically_known_true(x == y) for x, y in zip(va.shape, vb.shape, strict=True))


def _links(node: fx.Node, prev: fx.Node, pattern: Pattern, position: int) -> bool:
    """Whether the chain continues from ``prev`` into ``node``: through its first arg or, at a
    join (``pattern.chain_inputs``), through any named arg, whose others then must be values of
    ``prev``'s shape."""
    joins = [index for at, index in pattern.chain_inputs if at == position]
    if not joins:
        return bool(node.args) and node.args[0] is prev
    named = [node.args[i] if i < len(node.args) else None for i in joins]
    if sum(arg is prev for arg in node.args) != 1 or (prev not in named and node.args[0] is not prev):
        return False  # add(conv, conv) has no second input to join
    return all(arg is prev or (isinstance(arg, fx.Node) and _same_shape(arg, prev)) for arg in named)


def _chain(node: fx.Node, pattern: Pattern) -> tuple[fx.Node, ...] | None:
    """The nodes ``pattern`` matches starting at ``node``, or None."""
    nodes = [node]
    for position, alternatives in enumerate(pattern.ops[1:], start=1):
        users = list(nodes[-1].users)
        if len(users) != 1:
            return None
        nxt = users[0]
        if nxt.op != "call_function" or nxt.target not in alternatives or MATCH in nxt.meta:
            return None
        if not _links(nxt, nodes[-1], pattern, position):
            return None
        nodes.append(nxt)
    return tuple(nodes)


def _value_outputs(node: fx.Node, pattern: Pattern) -> tuple[fx.Node, ...] | None:
    """The ``getitem`` users of a multi-output op that read ``pattern.value_outputs``, by item
    index; None if something else reads the tuple (then the op stays float)."""
    users = list(node.users)
    if any(u.op != "call_function" or u.target is not operator.getitem for u in users):
        return None
    wanted = pattern.value_outputs
    chosen = [u for u in users if wanted == "all" or u.args[1] in wanted]  # type: ignore[operator]
    return tuple(sorted(chosen, key=lambda u: int(u.args[1])))  # type: ignore[arg-type]


def _float_io(nodes: tuple[fx.Node, ...], outputs: tuple[fx.Node, ...], pattern: Pattern) -> bool:
    """Only float32 tensors become uint8: index tensors, masks and tuples stay as they are. A
    weight-only pattern reads indices and a float32 table that is a parameter, and gives float32."""
    if pattern.kind != "shares_qparams" and not is_float_tensor(nodes[-1]):
        return False
    if pattern.kind == "weight_only":
        assert pattern.weight_arg is not None
        weight = nodes[0].args[pattern.weight_arg]
        return is_constant(weight) and is_float_tensor(weight)
    if not all(is_float_tensor(out) for out in outputs):
        return False
    probe = Match(pattern, nodes, None, "", "")  # type: ignore[arg-type]
    return all(is_float_tensor(a) for a in activation_inputs(probe)) and bool(activation_inputs(probe))


def _weight_only_reason(pattern: Pattern, key: str, path: str) -> str:
    """Why a pattern did not match under a qconfig of the other family (weight-only or not)."""
    if pattern.kind == "weight_only":
        return (f"embedding tables are quantized by a weight-only qconfig only; to quantize this one use "
                f"qconfig_dict={{{path!r}: graphquant.embedding_qconfig}}")
    return (f"qconfig_dict[{key!r}] is weight-only (embedding tables); give {path or 'this module'!r} a static or "
            "dynamic qconfig to quantize it")


def annotate(gm: fx.GraphModule, dynamic: bool = False) -> list[Match]:
    """Write a ``Match`` into ``node.meta[MATCH]`` for every pattern occurrence; return them in
    the graph order of their outputs.

    The anchor's qconfig (stamped at capture: ``graph.node_qconfig``) is the match's; a chain is
    matched only if every node in it has a qconfig (a fused relu in a float submodule stops the fusion). Output order
    puts every producer before its consumers: in ``conv2 -> add(., shortcut(x))`` the
    shortcut conv's anchor comes after conv2's, its output before the add.
    """
    matches: list[Match] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or MATCH in node.meta:
            continue
        for pattern in patterns_for(node.target, dynamic):
            nodes = _chain(node, pattern)
            outputs = () if pattern.value_outputs is None or nodes is None else _value_outputs(node, pattern)
            if nodes is None or outputs is None or not _float_io(nodes, outputs, pattern):
                continue
            resolved = [node_qconfig(n) for n in nodes]
            if any(r.qconfig is None for r in resolved):
                continue
            qconfig, key = resolved[0].qconfig, resolved[0].key
            assert qconfig is not None and key is not None
            if (pattern.kind == "weight_only") != qconfig.is_weight_only:
                node.meta[FLOAT_REASON] = _weight_only_reason(pattern, key, module_path(node))
                continue
            node.meta.pop(FLOAT_REASON, None)
            match = Match(pattern, nodes, qconfig, key, module_path(node), outputs=outputs)
            for n in nodes:
                n.meta[MATCH] = match
            matches.append(match)
            break
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    return sorted(matches, key=lambda match: position[match.output])
