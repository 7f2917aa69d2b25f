"""Checks between passes: what each pass promises the next, checked on the graph itself.

- :func:`check_matches` (after ``annotate`` / ``insert_observers``, and after a copy): every
  ``Match`` in the graph's node meta names live nodes of this graph, its chain's nodes carrying it.
  A stale match (a node erased, or one of the graph the copy was made from) would lower the
  wrong nodes.
- :func:`check_lowered` (after ``lower``): no observer survives; every ``graphquant::`` call binds
  to its kernel record's schema (each argument without a default given, none unknown, tensors
  where the schema has tensors); a ``gemm`` kernel of a oneDNN graph reads a weight its record
  lists as packed (oneDNN kills the process on an unpacked one).

A failed check is graphquant's bug, not the user's: the error names the pass, the node and its
module path, and asks for a report.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from graphquant.errors import GraphQuantError, where
from graphquant.graph import MATCH, module_path
from graphquant.observers import Observer, SharedQParams
from graphquant.quantized import find_record
from graphquant.runtimes import KernelCall, kernel_calls


def _failed(after: str, node: fx.Node, what: str) -> GraphQuantError:
    return GraphQuantError(
        f"graphquant: internal check after {after} failed at {where(module_path(node), node.name)}: {what}. This is "
        "a graphquant bug; please report it with the model (graphquant.save of the float model's ExportedProgram "
        "helps), and keep that module float with qconfig_dict meanwhile"
    )


def check_matches(gm: fx.GraphModule, after: str) -> None:
    """Every match in ``gm`` points at live nodes of ``gm`` that carry it (module docstring)."""
    live = set(gm.graph.nodes)
    for node in gm.graph.nodes:
        match = node.meta.get(MATCH)
        if match is None:
            continue
        for member in (*match.nodes, *match.outputs):
            if member not in live:
                raise _failed(after, node, f"its match {match.pattern.name} names {member.name}, which is not a "
                                           "node of this graph")
        for member in match.nodes:  # the items a multi-output op's match reads (outputs) may match on their own
            if member.meta.get(MATCH) is not match:
                raise _failed(after, node, f"its match {match.pattern.name} names {member.name}, which carries "
                                           "another match")


def _wants_tensor(type_: Any) -> bool:
    """Whether a schema type holds tensors: ``Tensor``, ``Tensor?``, ``Tensor[]``."""
    if isinstance(type_, (torch.OptionalType, torch.ListType)):
        return _wants_tensor(type_.getElementType())
    return isinstance(type_, torch.TensorType)


def _tensor_like(value: Any, type_: Any) -> bool:
    """Whether ``value`` (an argument of a graph node) can be the tensor(s) the schema's ``type_`` asks for."""
    if isinstance(type_, torch.OptionalType):
        return value is None or _tensor_like(value, type_.getElementType())
    if isinstance(type_, torch.ListType):
        return isinstance(value, (list, tuple)) and all(isinstance(v, fx.Node) for v in value)
    return isinstance(value, fx.Node)


def _check_call(call: KernelCall, packed: dict[str, Any] | None, after: str) -> None:
    node, kernel = call.node, call.kernel
    arguments = kernel.op._schema.arguments
    if len(node.args) > len(arguments) or set(node.kwargs) - set(kernel.argument_names):
        raise _failed(after, node, f"graphquant::{kernel.name} gets arguments its schema does not have")
    missing = [a.name for a in arguments if a.name not in call.named]
    if missing:
        raise _failed(after, node, f"graphquant::{kernel.name} is not given {', '.join(missing)}")
    for argument, value in zip(arguments, call.args, strict=True):
        if _wants_tensor(argument.type) and not _tensor_like(value, argument.type):
            raise _failed(after, node, f"graphquant::{kernel.name}'s {argument.name} is {value!r}, not a graph value")
    weight = call.weight
    if kernel.gemm and packed is not None and (weight is None or str(weight.target) not in packed):
        raise _failed(after, node, f"graphquant::{kernel.name} on oneDNN reads a weight that is not packed")


def check_lowered(gm: fx.GraphModule, after: str = "lower") -> None:
    """No observer left, every kernel call fits its record (module docstring)."""
    for node in gm.graph.find_nodes(op="call_module"):
        if isinstance(gm.get_submodule(str(node.target)), (Observer, SharedQParams)):
            raise _failed(after, node, f"observer {node.target} survived lowering")
    record = find_record(gm)
    packed = record.packed if record is not None and record.backend == "onednn" and not record.debug else None
    for call in kernel_calls(gm.graph):
        _check_call(call, packed, after)
