"""Insert observer modules where the annotated matches need activation statistics.

``x -> conv -> relu -> flatten -> linear -> y`` becomes
``x -> obs0 -> conv -> relu -> obs1 -> flatten -> shared(obs1) -> linear -> obs2 -> y``.

- weighted (conv, linear): each activation input is observed (reusing the producer's
  output observer) and so is the output; always quantized.
- general / fixed_qparams (add, cat, sigmoid): with the qconfig's ``ops="chains"`` (the default)
  quantized only when every activation input is written in uint8 by an int8 op that writes uint8
  whatever its readers (a conv, an int8 add or pool; not a linear, which writes float32 where only
  float ops read it): int8 there adds no rounding (:func:`_chain_reason`); with ``ops="all"`` when at
  least one activation input already is quantized, the others then getting input observers. The
  output gets its own observer (fixed range for fixed_qparams).
- shares_qparams (flatten, max_pool, relu): quantized only when the input is (with ``ops="chains"``,
  written in uint8 whatever its readers, as above: a reshape of a linear's float32 output stays
  float); the output gets a :class:`~graphquant.observers.SharedQParams` marker naming the input's
  observer.
  An op returning several tensors gets one marker after each ``getitem`` of a value item:
  ``x -> obs0 -> split -> getitem_i -> shared(obs0)``; its indices stay unobserved.
- dynamic and weight_only (embeddings): nothing is observed.
"""

from __future__ import annotations

from torch import fx, nn

from graphquant.graph import FLOAT_REASON, MATCH, Match, activation_inputs, copy_meta, module_path
from graphquant.kernels import registry
from graphquant.observers import ChannelMeans, FixedQParamsObserver, Observer, SharedQParams, SmoothingObserver

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


class _Namer:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.count = sum(1 for name in gm._modules if name.startswith(OBSERVER_PREFIX))

    def __call__(self) -> str:
        self.count += 1
        return f"{OBSERVER_PREFIX}{self.count - 1}"


def _add_observer(gm: fx.GraphModule, after: fx.Node, module: nn.Module, name: str) -> fx.Node:
    setattr(module, "graphquant_where", f"{name} (output of {after.name} in {module_path(after) or '<model>'})")  # noqa: B010
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(after):
        node = gm.graph.call_module(name, (after,))
    copy_meta(after, node)
    return node


def _observe_output(gm: fx.GraphModule, out: fx.Node, module: nn.Module, name: str) -> fx.Node:
    """Put an observer after a match's output ``out``; every user now reads the observed value."""
    obs = _add_observer(gm, out, module, name)
    out.replace_all_uses_with(obs, delete_user_cb=lambda user: user is not obs)
    return obs


def _smoothed(match: Match) -> bool:
    """Whether the match is a linear its qconfig smooths (SmoothQuant)."""
    return match.qconfig.smoothquant is not None and match.pattern.kernel == "qlinear"


def _input_observer(match: Match) -> nn.Module:
    if not _smoothed(match):
        return match.qconfig.activation.create()
    spec, smoothquant = match.qconfig.activation, match.qconfig.smoothquant
    assert smoothquant is not None
    reduce_range = dict(spec.options).get("reduce_range", False)
    return SmoothingObserver(spec.dtype, spec.symmetric, reduce_range, smoothquant.rows if smoothquant.search else 0)


def _observe_input(gm: fx.GraphModule, match: Match, arg: fx.Node, seen: dict[tuple[fx.Node, bool], fx.Node],
                   name: _Namer) -> str:
    """Observer name for activation input ``arg`` of the match; only its edges into the match are rewired.

    A float value feeding two quantized ops gets one observer; linears smoothed by SmoothQuant share
    one of their own (a :class:`SmoothingObserver`), which other readers of the value do not share."""
    if is_observer(gm, arg):
        return _source_observer(gm, arg)
    key = (arg, _smoothed(match))
    if key not in seen:
        seen[key] = _add_observer(gm, arg, _input_observer(match), name())
    for node in match.nodes:  # the anchor, and a join reading arg later in the chain (conv(x) + x)
        node.replace_input_with(arg, seen[key])
    return str(seen[key].target)


def bias_corrected(match: Match) -> bool:
    """Whether ``match`` asks for bias correction and its kernel takes it (its record's flag: convs and
    linears, whose input channels lie on axis 1 and on the last axis)."""
    kernel = registry.KERNELS.get(match.pattern.kernel)
    return match.qconfig.bias_correction and kernel is not None and kernel.bias_corrected


def _track_means(gm: fx.GraphModule, match: Match) -> None:
    """The observer (or shared-qparams marker) of the match's input also records its channel means
    (bias correction)."""
    observer = gm.get_submodule(str(activation_inputs(match)[0].target))  # the marker itself, not its source
    if isinstance(observer, ChannelMeans):
        observer.track_channel_means(-1 if match.pattern.kernel == "qlinear" else 1)


def _chain_reason(gm: fx.GraphModule, match: Match, inputs: list[fx.Node], uint8: set[str]) -> str:
    """Why an op of a ``QConfig(ops="chains")`` stays float, or "" where it runs in int8: each activation
    input must be written in uint8 by an int8 op that writes uint8 whatever its readers (``uint8``: the
    observers of such values). Elsewhere int8 would round a value float keeps exact: a residual stream,
    a linear's float32 output (its kernel writes float32 where only float ops read it)."""
    for arg in inputs:
        if is_observer(gm, arg) and _source_observer(gm, arg) in uint8:
            continue
        producer = arg.args[0] if is_observer(gm, arg) else arg
        source = producer.meta.get(MATCH) if isinstance(producer, fx.Node) else None
        if source is not None and source.pattern.float_output:
            what = f"the float32 output of {source.pattern.name} {source.module_path or source.anchor.name}"
        elif isinstance(producer, fx.Node) and producer.op == "placeholder":
            what = f"the model input {producer.name}"
        else:
            what = f"a float value ({getattr(producer, 'name', producer)})"
        return (f"kept float (qconfig ops='chains'): its input is {what}, so int8 here would add a rounding; "
                "QConfig(ops='all') quantizes it")
    return ""


def _keep_float(match: Match, reason: str) -> None:
    for node in match.nodes:
        node.meta.pop(MATCH, None)
        node.meta[FLOAT_REASON] = reason


def insert_observers(gm: fx.GraphModule, matches: list[Match]) -> fx.GraphModule:
    """Insert observers for ``matches`` (from ``annotate``, in graph order)."""
    seen: dict[tuple[fx.Node, bool], fx.Node] = {}
    uint8: set[str] = set()  # observers of values an int8 op writes in uint8 whatever its readers
    name = _Namer(gm)
    for match in matches:
        inputs = activation_inputs(match)
        kind = match.pattern.kind
        if kind in ("dynamic", "weight_only"):
            continue  # weights are quantized at convert, activations per batch or not at all: nothing to observe
        if kind != "weighted" and not any(is_observer(gm, a) for a in inputs):
            _keep_float(match, "input is not quantized")
            continue
        reason = _chain_reason(gm, match, inputs, uint8) if kind != "weighted" and match.qconfig.ops == "chains" else ""
        if reason:
            _keep_float(match, reason)
            continue
        if match.pattern.value_outputs is not None and not match.outputs:
            _keep_float(match, "only its indices are used: it has no quantized value to produce")
            continue
        if kind == "shares_qparams":
            source = _source_observer(gm, inputs[0])
            match.input_observers[inputs[0].name] = source
            markers = [_observe_output(gm, out, SharedQParams(source), name()) for out in match.value_nodes]
            match.output_observer = str(markers[0].target)
            continue
        for arg in inputs:
            match.input_observers[arg.name] = _observe_input(gm, match, arg, seen, name)
        if bias_corrected(match):
            _track_means(gm, match)
        if kind == "fixed_qparams":
            assert match.pattern.output_range is not None
            observer: nn.Module = FixedQParamsObserver(*match.pattern.output_range)
        else:
            observer = match.qconfig.activation.create()
        match.output_observer = str(_observe_output(gm, match.output, observer, name()).target)
        if not match.pattern.float_output:  # a linear may write float32: its readers cannot count on uint8
            uint8.add(match.output_observer)
    gm.graph.lint()
    gm.recompile()
    return gm
