"""Model -> ``torch.fx.GraphModule`` via ``torch.export``, with a module path on every node.

Normalised once here so passes and patterns see one ATen spelling per op:
``nn.Conv2d``, ``F.conv2d`` and ``torch.conv2d`` all arrive as ``aten.conv2d.default``;
in-place ops (``relu_``, ``add_``) arrive functional (``run_decompositions`` with an
empty table functionalises without decomposing conv and linear).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Sequence

import torch
from torch import fx, nn
from torch.export import Dim

from graphquant.errors import GraphQuantError
from graphquant.graph import MODULE_PATH, MODULE_TYPE, add_attr, get_attr_value

BATCH = "batch"


def check_capturable(model: object) -> nn.Module:
    """The model, or a ``GraphQuantError`` saying why it cannot be captured."""
    if not isinstance(model, nn.Module):
        raise GraphQuantError(
            f"graphquant: expected a torch.nn.Module to quantize, got {type(model).__name__}; "
            "wrap a function in an nn.Module whose forward calls it"
        )
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise GraphQuantError(
                f"graphquant: {name or '<model>'} ({type(module).__name__}) is in training mode; "
                "post-training quantization folds batch-norm statistics, call model.eval() first"
            )
    return model


def _batch_examples(example_inputs: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any]:
    """Examples with batch >= 2 (export specialises size-1 dims) and their dynamic shapes."""
    grown, shapes = [], []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            if x.shape[0] == 1:
                x = x.expand(2, *x.shape[1:]).clone()
            shapes.append({0: Dim(BATCH, min=1, max=1 << 30)} if x.shape[0] > 0 else None)
        else:
            shapes.append(None)
        grown.append(x)
    return tuple(grown), tuple(shapes)


def _export(model: nn.Module, example_inputs: tuple[Any, ...]) -> torch.export.ExportedProgram:
    """Export with a dynamic batch dimension; fall back to static shapes if the model fixes it."""
    grown, shapes = _batch_examples(example_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(model, grown, dynamic_shapes=shapes)
        except Exception as dyn_error:  # noqa: BLE001 - retried with static shapes below
            try:
                ep = torch.export.export(model, tuple(example_inputs))
            except Exception as error:
                raise GraphQuantError(
                    f"graphquant: torch.export could not capture {type(model).__name__}: {error}. "
                    "Data-dependent control flow cannot be captured; move it out of forward or "
                    "keep that submodule float and call it outside the quantized model"
                ) from error
            warnings.warn(
                f"graphquant: captured {type(model).__name__} with a fixed batch size "
                f"({str(dyn_error).splitlines()[0][:200]})",
                stacklevel=3,
            )
            return ep


def _module_path(node: fx.Node, paths: set[str]) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", ""
    path, kind = list(stack.values())[-1]
    path = str(path).split("@")[0]  # a module called twice appears as "relu@1"
    if path not in paths:  # export's placeholder stacks name no module of the model
        return "", ""
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    return path, kind.rpartition(".")[2]


def _matmul_to_linear(gm: fx.GraphModule) -> None:
    """``matmul(x, W)`` with a constant 2-d ``W`` becomes ``linear(x, W.T)`` so that one
    pattern covers both; a weight used twice gets one transposed copy."""
    transposed: dict[str, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.matmul.default:
            continue
        w = node.args[1]
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            continue
        value = get_attr_value(gm, w)
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
            continue
        if w.target not in transposed:
            name = add_attr(gm, str(w.target) + "_t", value.detach().t().contiguous())
            with gm.graph.inserting_before(node):
                transposed[str(w.target)] = gm.graph.get_attr(name)
        node.target = torch.ops.aten.linear.default
        node.args = (node.args[0], transposed[str(w.target)])
    gm.graph.eliminate_dead_code()
    gm.recompile()


def capture(model: nn.Module, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Export ``model`` on ``example_inputs`` into a functional ATen ``GraphModule``.

    The batch dimension is dynamic (captured at batch 1, runs at batch 8). Every
    ``call_function`` node carries ``meta[MODULE_PATH]``. The model's parameters are
    shared, not copied: passes never write into them.
    """
    check_capturable(model)
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    ep = _export(model, tuple(example_inputs)).run_decompositions({})
    gm = ep.module()
    paths = {name for name, _ in model.named_modules()}
    for node in gm.graph.nodes:
        path, kind = _module_path(node, paths)
        node.meta[MODULE_PATH] = path
        node.meta[MODULE_TYPE] = kind
    _matmul_to_linear(gm)
    gm.graphquant_input_spec = [
        (tuple(x.shape[1:]), x.dtype) if isinstance(x, torch.Tensor) else None for x in example_inputs
    ]
    return gm


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy, so that ``inplace=False`` never touches the user's model."""
    return copy.deepcopy(model)
