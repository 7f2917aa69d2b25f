"""Match the pattern table against the graph, once, and write a ``Match`` on each node.

``x -> conv -> relu -> y`` gets ``meta[MATCH]`` on ``conv`` and ``relu`` pointing at one
``Match(conv2d_relu, ...)``. Nodes whose module's qconfig is ``None`` are not matched.
Observer insertion and lowering read these records; nothing searches the graph again.
"""

from __future__ import annotations

from typing import Mapping

from torch import fx

from graphquant.graph import MATCH, Match, activation_inputs, is_float_tensor, module_path
from graphquant.patterns import Pattern, patterns_for
from graphquant.qconfig import QConfig, resolve


def _chain(node: fx.Node, pattern: Pattern) -> tuple[fx.Node, ...] | None:
    """The nodes ``pattern`` matches starting at ``node``, or None."""
    nodes = [node]
    for alternatives in pattern.ops[1:]:
        users = list(nodes[-1].users)
        if len(users) != 1:
            return None
        nxt = users[0]
        if nxt.op != "call_function" or nxt.target not in alternatives or MATCH in nxt.meta:
            return None
        if nxt.args[0] is not nodes[-1]:
            return None
        nodes.append(nxt)
    return tuple(nodes)


def _float_io(nodes: tuple[fx.Node, ...], pattern: Pattern) -> bool:
    """Only float32 tensors become uint8: index tensors, masks and tuples stay as they are."""
    if pattern.kind != "shares_qparams" and not is_float_tensor(nodes[-1]):
        return False
    probe = Match(pattern, nodes, None, "", "")  # type: ignore[arg-type]
    return all(is_float_tensor(a) for a in activation_inputs(probe)) and bool(activation_inputs(probe))


def annotate(gm: fx.GraphModule, qconfig_dict: Mapping[str, QConfig | None], dynamic: bool = False) -> list[Match]:
    """Write a ``Match`` into ``node.meta[MATCH]`` for every pattern occurrence; return them in graph order.

    The anchor's module path decides the qconfig; a chain is matched only if every node
    in it has a qconfig (a fused relu in a float submodule stops the fusion).
    """
    matches: list[Match] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or MATCH in node.meta:
            continue
        for pattern in patterns_for(node.target, dynamic):
            nodes = _chain(node, pattern)
            if nodes is None or not _float_io(nodes, pattern):
                continue
            resolved = [resolve(qconfig_dict, module_path(n)) for n in nodes]
            if any(r.qconfig is None for r in resolved):
                continue
            qconfig, key = resolved[0].qconfig, resolved[0].key
            assert qconfig is not None and key is not None
            match = Match(pattern, nodes, qconfig, key, module_path(node))
            for n in nodes:
                n.meta[MATCH] = match
            matches.append(match)
            break
    return matches
