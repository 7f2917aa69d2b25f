"""Insert observer modules where the annotated matches need activation statistics.

``x -> conv -> relu -> flatten -> linear -> y`` becomes
``x -> obs0 -> conv -> relu -> obs1 -> flatten -> shared(obs1) -> linear -> obs2 -> y``.
A weighted match observes each activation input (reusing the producer's output
observer) and its output. A ``shares_qparams`` match whose input is observed gets a
:class:`~graphquant.observers.SharedQParams` marker; otherwise it stays float.
"""

from __future__ import annotations

from torch import fx

from graphquant.graph import FLOAT_REASON, MATCH, Match, copy_meta
from graphquant.observers import Observer, SharedQParams

OBSERVER_PREFIX = "observer_"


def is_observer(gm: fx.GraphModule, node: object) -> bool:
    """Whether ``node`` calls an observer or a shared-qparams marker."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and isinstance(gm.get_submodule(str(node.target)), (Observer, SharedQParams))
    )


def _source_observer(gm: fx.GraphModule, node: fx.Node) -> str:
    """Name of the observer whose qparams ``node`` (an observer or a marker) carries."""
    module = gm.get_submodule(str(node.target))
    return module.source if isinstance(module, SharedQParams) else str(node.target)


def _add_observer(gm: fx.GraphModule, after: fx.Node, module: object) -> fx.Node:
    name = f"{OBSERVER_PREFIX}{len([n for n in gm._modules if n.startswith(OBSERVER_PREFIX)])}"
    gm.add_submodule(name, module)  # type: ignore[arg-type]
    with gm.graph.inserting_after(after):
        node = gm.graph.call_module(name, (after,))
    copy_meta(after, node)
    return node


def _observe_output(gm: fx.GraphModule, match: Match, module: object) -> fx.Node:
    """Put an observer after the match's output; every user now reads the observed value."""
    out = match.output
    obs = _add_observer(gm, out, module)
    out.replace_all_uses_with(obs, delete_user_cb=lambda user: user is not obs)
    return obs


def _observe_input(gm: fx.GraphModule, match: Match, index: int, seen: dict[fx.Node, fx.Node]) -> str:
    """Observer name for activation arg ``index`` of the anchor; only this edge is rewired."""
    arg = match.anchor.args[index]
    assert isinstance(arg, fx.Node)
    if is_observer(gm, arg):
        return _source_observer(gm, arg)
    if arg not in seen:  # a float value feeding two quantized ops gets one observer
        seen[arg] = _add_observer(gm, arg, match.qconfig.activation.create())
    match.anchor.replace_input_with(arg, seen[arg])
    return str(seen[arg].target)


def insert_observers(gm: fx.GraphModule, matches: list[Match]) -> fx.GraphModule:
    """Insert observers for ``matches`` (from ``annotate``, in graph order)."""
    seen: dict[fx.Node, fx.Node] = {}
    for match in matches:
        if match.pattern.kind == "shares_qparams":
            arg = match.anchor.args[0]
            if not is_observer(gm, arg):
                match.anchor.meta.pop(MATCH)  # input is float: so is this op
                match.anchor.meta[FLOAT_REASON] = "input is not quantized"
                continue
            source = _source_observer(gm, arg)  # type: ignore[arg-type]
            match.input_observers[0] = source
            match.output_observer = str(_observe_output(gm, match, SharedQParams(source)).target)
            continue
        for index in match.pattern.activation_args:
            match.input_observers[index] = _observe_input(gm, match, index, seen)
        match.output_observer = str(_observe_output(gm, match, match.qconfig.activation.create()).target)
    gm.graph.lint()
    gm.recompile()
    return gm
