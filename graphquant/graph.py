"""Meta keys, the Pattern and Match records, and the small node helpers shared by passes and patterns.

Nothing here imports patterns/ or passes/: both import this module, one way."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import fx, nn

from graphquant.qconfig import Resolved

if TYPE_CHECKING:
    from graphquant.qconfig import QConfig

# node.meta keys graphquant writes
MODULE_PATH = "graphquant_module_path"  # str: path of the module that called the node
MODULE_TYPE = "graphquant_module_type"  # str: class name of that module
MATCH = "graphquant_match"  # Match: set on every node a pattern matched
QPARAMS = "graphquant_qparams"  # QParams: set on quantize / dequantize nodes at convert
FLOAT_REASON = "graphquant_float_reason"  # str: why a matched node stays float
QCONFIG = "graphquant_qconfig"  # Resolved: the qconfig of the node's module path, stamped once at capture


Kind = Literal["weighted", "shares_qparams", "general", "fixed_qparams", "dynamic", "weight_only"]
WEIGHT_KINDS = ("weighted", "dynamic", "weight_only")  # kinds that name a weight_arg and quantize it


@dataclass(frozen=True)
class Pattern:
    """One quantizable pattern.

    ``ops[i]`` lists the ATen overloads accepted at position ``i`` of the chain; each
    node but the last must have the next as its only user. ``kernel`` is the op name
    the kernel graph shows (what ``check_graph_mode_op`` looks for). ``lower_kernel``
    builds the int8 node from the uint8 inputs (in the order of ``activation_args``, a
    list argument such as ``cat``'s contributing each element); ``None`` keeps the
    reference form. ``output_range`` is the fixed output range of a ``fixed_qparams``
    pattern. ``examples`` give modules and inputs that exercise the pattern, for the
    tests and the coverage table.

    ``chain_inputs`` names activation inputs read by later nodes of the chain, as
    ``(chain position, arg index)`` pairs: ``conv -> add`` has ``((1, 0), (1, 1))``, the
    residual ``other`` of ``add(conv, other)`` or ``add(other, conv)``. The chain may enter
    such a node through any of its named args; the others are observed like the anchor's
    inputs and reach ``lower_kernel`` after them (each node once: in ``conv(x) + x`` the one
    input ``x`` stands for both). They must have the shape of the value they join, since a
    fused join accumulates into the output (no broadcasting).

    ``value_outputs`` marks an op returning several tensors, which the graph reads through
    ``operator.getitem`` nodes: the item indices that carry the input's values (``(0,)`` for
    ``max.dim``'s values beside its indices), or ``"all"`` (``split``). Such a pattern is one
    op of kind ``shares_qparams``; its ``lower_kernel`` returns the op on uint8 and lowering
    reads every item from it. ``None``: the op returns one tensor.
    """

    name: str
    ops: tuple[tuple[torch._ops.OpOverload, ...], ...]
    kind: Kind
    kernel: str
    # (ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams) -> fx.Node:
    # patterns.LowerKernel spells it out
    lower_kernel: Callable[..., fx.Node] | None
    examples: Callable[[], Sequence[tuple[nn.Module, tuple[torch.Tensor, ...]]]]
    activation_args: tuple[int, ...] = (0,)
    weight_arg: int | None = None
    bias_arg: int | None = None
    output_range: tuple[float, float] | None = None
    chain_inputs: tuple[tuple[int, int], ...] = ()
    value_outputs: tuple[int, ...] | Literal["all"] | None = None
    doc: str = ""
    # lower_kernel takes out=None and then returns float32: used when only float ops read the output
    float_output: bool = False

    def __post_init__(self) -> None:
        if not self.ops or any(not alternatives for alternatives in self.ops):
            raise ValueError(f"graphquant: pattern {self.name} matches nothing")
        if (self.kind in WEIGHT_KINDS) != (self.weight_arg is not None):
            raise ValueError(
                f"graphquant: pattern {self.name}: {'/'.join(WEIGHT_KINDS)} patterns, only they, name a weight_arg"
            )
        if (self.kind == "fixed_qparams") != (self.output_range is not None):
            raise ValueError(f"graphquant: pattern {self.name}: fixed_qparams patterns and only they set output_range")
        if self.kind in WEIGHT_KINDS and self.lower_kernel is None:
            raise ValueError(f"graphquant: pattern {self.name} needs a kernel lowering")
        if any(not 0 < position < len(self.ops) for position, _ in self.chain_inputs):
            raise ValueError(f"graphquant: pattern {self.name}: chain_inputs name positions after the anchor")
        if self.value_outputs is not None and (len(self.ops) != 1 or self.kind != "shares_qparams"):
            # one shared scale for every item: other kinds would need an observer per item
            raise ValueError(f"graphquant: pattern {self.name}: value_outputs is for one shares_qparams op")


@dataclass(eq=False)
class Match:
    """One occurrence of a pattern in the graph, written once by ``annotate``.

    ``nodes`` are the matched nodes in graph order; ``nodes[0]`` is the anchor (the conv,
    the linear) and ``nodes[-1]`` produces the pattern's output. For an op returning several
    tensors (``pattern.value_outputs``), ``outputs`` are the ``getitem`` nodes reading the
    items that carry quantized values, by item index; its other items (indices) pass through.
    """

    pattern: Pattern
    nodes: tuple[fx.Node, ...]
    qconfig: QConfig
    qconfig_key: str
    module_path: str
    # filled by insert_observers: observer node names feeding each activation input, and the output's
    input_observers: dict[str, str] = field(default_factory=dict)  # input node name -> observer
    output_observer: str | None = None  # of several outputs, the first's (all share one scale)
    outputs: tuple[fx.Node, ...] = ()

    @property
    def anchor(self) -> fx.Node:
        return self.nodes[0]

    @property
    def output(self) -> fx.Node:
        """The node producing the pattern's value: ``nodes[-1]``, or the first of ``outputs``."""
        return self.outputs[0] if self.outputs else self.nodes[-1]

    @property
    def value_nodes(self) -> tuple[fx.Node, ...]:
        """Every node carrying a quantized value of the pattern: ``outputs``, or ``(nodes[-1],)``."""
        return self.outputs or (self.nodes[-1],)


def activation_inputs(match: Match) -> list[fx.Node]:
    """The anchor's activation inputs, in ``pattern.activation_args`` order, list args
    flattened, then those of later chain nodes (``pattern.chain_inputs``, skipping the arg
    the chain enters through); each node once; scalars and missing optional args are skipped."""
    nodes: list[fx.Node] = []
    for index in match.pattern.activation_args:
        if index >= len(match.anchor.args):
            continue
        arg = match.anchor.args[index]
        for item in arg if isinstance(arg, (list, tuple)) else [arg]:
            if isinstance(item, fx.Node) and item not in nodes:
                nodes.append(item)
    for position, index in match.pattern.chain_inputs:
        node = match.nodes[position]
        item = node.args[index] if index < len(node.args) else None
        if isinstance(item, fx.Node) and item is not match.nodes[position - 1] and item not in nodes:
            nodes.append(item)
    return nodes


def is_float_tensor(node: object) -> bool:
    """Whether a node produces one float32 tensor (what uint8 activations can stand for)."""
    if not isinstance(node, fx.Node):
        return False
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype == torch.float32


def example_shape(node: object) -> list[int] | None:
    """The shape of ``node``'s tensor as captured, a symbolic batch (dimension 0) read as 1; None
    where the graph does not record it or another dimension is symbolic. A packing hint only."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    shape = []
    for i, size in enumerate(val.shape):
        if isinstance(size, int):
            shape.append(size)
        elif i == 0:
            shape.append(1)
        else:
            return None
    return shape


def module_path(node: fx.Node) -> str:
    """Path of the module that called ``node`` (``""`` for the root)."""
    return str(node.meta.get(MODULE_PATH, ""))


def node_qconfig(node: fx.Node) -> Resolved:
    """The qconfig of the module that called ``node`` and the ``qconfig_dict`` key it came from, as
    stamped at capture (``capture.stamp_qconfig``); float (no key) for a node nothing stamped."""
    resolved = node.meta.get(QCONFIG)
    return resolved if isinstance(resolved, Resolved) else Resolved(None, None)


def get_attr_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The tensor a ``get_attr`` node reads."""
    if node.op != "get_attr":
        raise ValueError(f"graphquant: {node.name} is not a get_attr node")
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def is_constant(node: Any) -> bool:
    """Whether an argument is a parameter/buffer read (a weight, not an activation)."""
    return isinstance(node, fx.Node) and node.op == "get_attr"


def add_attr(gm: fx.GraphModule, prefix: str, value: torch.Tensor, buffer: bool = True) -> str:
    """Register ``value`` on ``gm`` under a fresh name starting with ``prefix``; return it.

    Buffers are saved in the ``state_dict``; ``buffer=False`` keeps plain attributes
    (packed oneDNN weights, which cannot be saved).
    """
    prefix = prefix.replace(".", "_")
    name, i = prefix, 0
    while hasattr(gm, name):
        i += 1
        name = f"{prefix}_{i}"
    if buffer:
        gm.register_buffer(name, value)
    else:
        setattr(gm, name, value)
    return name


def constant_node(gm: fx.GraphModule, prefix: str, value: torch.Tensor, buffer: bool = True) -> fx.Node:
    """A ``get_attr`` node, first in the graph, reading ``value`` registered under a fresh name
    (:func:`add_attr`; ``buffer=False`` for packed oneDNN weights)."""
    name = add_attr(gm, prefix, value, buffer)
    with gm.graph.inserting_before(next(iter(gm.graph.nodes))), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx warns on get_attr of a non-buffer (the packed weight)
        return gm.graph.get_attr(name)


def copy_meta(src: fx.Node, dst: fx.Node) -> None:
    """Give ``dst`` the module path and qconfig of ``src`` (new nodes belong to the module they replace)."""
    for key in (MODULE_PATH, MODULE_TYPE, QCONFIG, "val", "stack_trace"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def op_args(node: fx.Node) -> list[Any]:
    """All positional arguments of an ATen call, with the schema's defaults filled in.

    Export leaves out trailing defaults (``conv2d(x, w, b)`` means stride 1, padding 0).
    """
    schema = node.target._schema  # type: ignore[union-attr]
    args = list(node.args)
    for arg in schema.arguments[len(args):]:
        if arg.name in node.kwargs:
            args.append(node.kwargs[arg.name])
        elif arg.has_default_value():
            args.append(arg.default_value)
        else:
            break
    return args


def matches_of(gm: fx.GraphModule) -> list[Match]:
    """The Match records in ``gm``'s node meta, in graph order, each once."""
    seen: dict[int, Match] = {}
    for node in gm.graph.nodes:
        match = node.meta.get(MATCH)
        if match is not None and node is match.anchor:
            seen.setdefault(id(match), match)
    return list(seen.values())


def rebind_matches(gm: fx.GraphModule) -> None:
    """After a deep copy, point each Match at the copied nodes (looked up by name)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    fresh: dict[int, Match] = {}
    for node in gm.graph.nodes:
        old = node.meta.get(MATCH)
        if old is None:
            continue
        if id(old) not in fresh:
            new = Match(old.pattern, tuple(by_name[n.name] for n in old.nodes), old.qconfig, old.qconfig_key,
                        old.module_path, dict(old.input_observers), old.output_observer,
                        tuple(by_name[n.name] for n in old.outputs))
            fresh[id(old)] = new
        node.meta[MATCH] = fresh[id(old)]


def named_args(node: fx.Node) -> dict[str, Any]:
    """A ``graphquant::`` call's arguments by schema name, defaults filled in."""
    values: dict[str, Any] = {}
    for i, arg in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if i < len(node.args):
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
    return values


def is_graphquant_op(target: object) -> bool:
    """Whether ``target`` is one of graphquant's ``torch.ops.graphquant`` kernels."""
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "graphquant"
