"""Model -> ``torch.fx.GraphModule`` via ``torch.export``, with a module path on every node.

Three kinds of input reach the same graph:

- an ``nn.Module``: exported with its example inputs;
- a ``torch.jit.script`` or ``torch.jit.trace`` module: converted to an fx graph by
  ``torch._export.converter`` (a private API, kept behind this module), each node tagged with
  the module path TorchScript recorded in its scope, then exported like an ``nn.Module``;
- an ``ExportedProgram`` (or a ``.pt2`` file holding one): re-exported from ``ep.module()``,
  which keeps its module paths, with a dynamic batch dimension where the program allows it.

Normalised once here so passes and patterns see one ATen spelling per op:
``nn.Conv2d``, ``F.conv2d``, ``torch.conv2d`` and a traced ``aten._convolution`` all arrive
as ``aten.conv2d.default``; in-place ops (``relu_``, ``add_``) arrive functional
(``run_decompositions`` with an empty table functionalises without decomposing conv and linear).
"""

from __future__ import annotations

import copy
import inspect
import io
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim, ExportedProgram

from graphquant.errors import CaptureError, GraphQuantError
from graphquant.graph import MODULE_PATH, MODULE_TYPE, QCONFIG, add_attr, get_attr_value, node_qconfig
from graphquant.inputs import install_input_check, specs_from_examples
from graphquant.qconfig import QConfig, Resolved, resolve

BATCH = "batch"
# extra file inside a .pt2 that graphquant.save wrote (the manifest); capture refuses such a program
MANIFEST_FILE = "graphquant/manifest.json"

Model = nn.Module | ExportedProgram
_BATCH_NORMS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")


def _is_batch_norm(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    # a scripted or traced BatchNorm keeps its class name, not its class
    return isinstance(module, torch.jit.ScriptModule) and getattr(module, "original_name", "") in _BATCH_NORMS


def check_capturable(model: object) -> Model:
    """The model, or a ``GraphQuantError`` saying why it cannot be captured."""
    if isinstance(model, ExportedProgram):
        return model
    if not isinstance(model, nn.Module):
        raise GraphQuantError(
            f"graphquant: expected a torch.nn.Module, a TorchScript module, an ExportedProgram or a .pt2 path "
            f"to quantize, got {type(model).__name__}; wrap a function in an nn.Module whose forward calls it"
        )
    for name, module in model.named_modules():
        if _is_batch_norm(module) and module.training:
            kind = getattr(module, "original_name", type(module).__name__)
            raise GraphQuantError(
                f"graphquant: {name or '<model>'} ({kind}) is in training mode; "
                "post-training quantization folds batch-norm statistics, call model.eval() first"
            )
    return model


def read_program(path: str | os.PathLike[str]) -> tuple[ExportedProgram, str]:
    """A ``.pt2`` file's ``ExportedProgram`` and the graphquant manifest inside it ("" if none),
    with clear errors for a missing or unreadable file."""
    extra = {MANIFEST_FILE: ""}
    try:
        ep = torch.export.load(path, extra_files=extra)
    except FileNotFoundError as error:
        raise GraphQuantError(f"graphquant: no such .pt2 file: {os.fspath(path)}") from error
    except Exception as error:
        raise GraphQuantError(
            f"graphquant: {os.fspath(path)} is not a program torch.export.load can read: {error}"
        ) from error
    return ep, extra[MANIFEST_FILE]


def load_program(path: str | os.PathLike[str]) -> ExportedProgram:
    """A float ``ExportedProgram`` from a ``.pt2`` file (``torch.export.save``)."""
    ep, manifest = read_program(path)
    if manifest:
        raise GraphQuantError(
            f"graphquant: {os.fspath(path)} is a quantized program written by graphquant.save; "
            "load it with graphquant.load instead of quantizing it again"
        )
    return ep


def module_paths(model: Model) -> dict[str, str]:
    """Module path -> class name of every submodule a ``qconfig_dict`` key may name.

    An ``ExportedProgram`` has no module objects: its paths come from the module stacks
    export recorded on its nodes.
    """
    if isinstance(model, ExportedProgram):
        paths = {"": "ExportedProgram"}
        for node in model.graph.nodes:
            for path, kind in (node.meta.get("nn_module_stack") or {}).values():
                path = str(path).split("@")[0]
                kind = kind if isinstance(kind, str) else getattr(kind, "__qualname__", str(kind))
                paths.setdefault(path, kind.rpartition(".")[2])
        return paths
    return {name: getattr(m, "original_name", type(m).__name__) for name, m in model.named_modules()}


def module_tree(model: Model) -> nn.Module:
    """An ``nn.Module`` whose ``named_modules()`` are the paths ``qconfig_dict`` keys may name:
    the model itself, or for an ``ExportedProgram`` an empty module per recorded path."""
    if not isinstance(model, ExportedProgram):
        return model
    root = nn.Module()
    for path in sorted(module_paths(model), key=lambda p: p.count(".")):
        if not path:
            continue
        parent = root
        *owners, leaf = path.split(".")
        for name in owners:
            if not hasattr(parent, name):
                parent.add_module(name, nn.Module())
            parent = getattr(parent, name)
        if not hasattr(parent, leaf):
            parent.add_module(leaf, nn.Module())
    return root


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


def _export(model: nn.Module, example_inputs: tuple[Any, ...], name: str | None = None) -> tuple[ExportedProgram, bool]:
    """Export with a dynamic batch dimension; fall back to static shapes if the model fixes it.

    Returns the program and whether its batch dimension is dynamic.
    """
    name = name or type(model).__name__
    grown, shapes = _batch_examples(example_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(model, grown, dynamic_shapes=shapes), True
        except Exception as dyn_error:  # noqa: BLE001 - retried with static shapes below
            try:
                ep = torch.export.export(model, tuple(example_inputs))
            except Exception as error:
                raise CaptureError(
                    f"graphquant: torch.export could not capture {name}: {error}. "
                    "Data-dependent control flow cannot be captured: with partial='auto' (the default) graphquant "
                    "quantizes the parts that export and runs the rest eager; or move it out of forward"
                ) from error
            reason = str(dyn_error).splitlines()[0][:200]
    # outside the block above, which silences export's own warnings (it used to silence this one too)
    warnings.warn(f"graphquant: captured {name} with a fixed batch size ({reason})", stacklevel=3)
    return ep, False


def _scope_path(scope: str) -> tuple[str, str]:
    """``Net::/torch.nn.modules.conv.Conv2d::layer1/...::conv1`` -> ``("layer1.conv1", "Conv2d")``."""
    segments = [segment.rpartition("::") for segment in scope.split("/")[1:]]
    path = ".".join(name for _, _, name in segments)
    kind = segments[-1][0].rpartition(".")[2] if segments else ""
    return path, kind


def _fresh_copy(model: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """A copy with its own compiled code: the converter inlines the ``forward`` graph it is given,
    in place, and a ``copy.deepcopy`` shares that graph with the user's module (whose module
    scopes, and so the module paths of a second conversion, would be gone)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.save / load: deprecated, still ours to read
        torch.jit.save(model, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer)


def _script_to_graph(model: torch.jit.ScriptModule, example_inputs: tuple[Any, ...]) -> fx.GraphModule:
    """A scripted or traced module as an fx graph of ATen calls, each node's
    ``meta["nn_module_stack"]`` naming the module TorchScript recorded it in.

    ``torch._export.converter`` is private API (torch 2.13); this is the only place that uses it.
    """
    from torch._export import converter

    class ScopedGraphConverter(converter.TS2FXGraphConverter):  # type: ignore[misc]
        def convert_node(self, node: torch._C.Node) -> None:
            before = set(self.fx_graph.nodes)
            super().convert_node(node)
            path, kind = _scope_path(node.scopeName())
            for new in self.fx_graph.nodes:
                if new not in before:
                    new.meta["nn_module_stack"] = {path: (path, kind)} if path else {}

    name = getattr(model, "original_name", type(model).__name__)
    try:
        ts = converter.TS2EPConverter(_fresh_copy(model), example_inputs)
        if ts.name_to_constant:
            raise GraphQuantError(
                f"graphquant: {name} holds TorchScript objects ({', '.join(sorted(ts.name_to_constant))}), "
                "e.g. already-quantized packed weights; quantize the float model instead"
            )
        blocks, attribute_fqns = converter.get_block_to_lifted_attrs(ts.ts_graph)
        graph_converter = ScopedGraphConverter(
            ts.ts_graph, ts.name_to_param, ts.name_to_buffer, blocks, ts.name_to_non_tensor_attributes,
            ts.name_to_constant, attribute_fqns,
        )
        gm = graph_converter.convert()
        converter.replace_quantized_ops_with_standard_ops(gm)
    except GraphQuantError:
        raise
    except Exception as error:
        raise GraphQuantError(
            f"graphquant: could not convert the TorchScript module {name} to a graph: {error}. "
            "Pass the nn.Module itself, or a torch.jit.trace of it"
        ) from error
    return gm


def stamp_qconfig(gm: fx.GraphModule, qconfig_dict: Mapping[str, QConfig | None], prefix: str = "") -> None:
    """Resolve the qconfig of every compute node's module path once, as capture records the path
    itself: ``node.meta[QCONFIG]`` (:func:`graphquant.graph.node_qconfig`), which every later pass
    reads; nodes that passes add take their source's (``graph.copy_meta``). ``prefix``: the path of
    the captured module in the model ``qconfig_dict`` is keyed by (a region of partial mode)."""
    resolved: dict[str, Resolved] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            path = str(node.meta.get(MODULE_PATH, ""))
            if path not in resolved:
                resolved[path] = resolve(qconfig_dict, f"{prefix}.{path}".strip(".") if prefix else path)
            node.meta[QCONFIG] = resolved[path]


def check_control_flow(gm: fx.GraphModule) -> None:
    """A ``GraphQuantError`` for an ``if`` on a tensor (``torch.cond``) in a module that is to be
    quantized (its stamped qconfig); with ``qconfig_dict={path: None}`` it stays in the graph, in float."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.higher_order.cond:
            path = str(node.meta.get(MODULE_PATH, ""))
            if node_qconfig(node).qconfig is not None:
                kind = node.meta.get(MODULE_TYPE) or "module"
                raise GraphQuantError(
                    f"graphquant: {path or '<model>'} ({kind}, node {node.name}): an `if` on a tensor value in a "
                    "scripted module (torch.cond) cannot be quantized. Trace the model with torch.jit.trace (the if "
                    f"is resolved for the example input), or keep it float with qconfig_dict={{{path!r}: None}}"
                )


def _module_path(node: fx.Node, paths: Mapping[str, str]) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", ""
    path, kind = list(stack.values())[-1]
    path = str(path).split("@")[0]  # a module called twice appears as "relu@1"
    if path not in paths:  # export's placeholder stacks name no module of the model
        return "", ""
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    return path, kind.rpartition(".")[2]


_CONV_ND = {1: torch.ops.aten.conv1d.default, 2: torch.ops.aten.conv2d.default, 3: torch.ops.aten.conv3d.default}
_CONV_TRANSPOSE_ND = {
    1: torch.ops.aten.conv_transpose1d.default,
    2: torch.ops.aten.conv_transpose2d.input,
    3: torch.ops.aten.conv_transpose3d.input,
}


def _convolution_to_conv_nd(gm: fx.GraphModule) -> None:
    """``aten.convolution`` (what a traced ``_convolution`` becomes) -> ``aten.convNd`` or
    ``aten.conv_transposeNd``, the spelling an ``nn.Module`` export gives."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.convolution.default:
            continue
        x, w, b, stride, padding, dilation, transposed, output_padding, groups = node.args
        dim = len(stride)
        if transposed:
            node.target = _CONV_TRANSPOSE_ND[dim]
            node.args = (x, w, b, stride, padding, output_padding, groups, dilation)
        else:
            node.target = _CONV_ND[dim]
            node.args = (x, w, b, stride, padding, dilation, groups)
    gm.recompile()


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


def _program(model: Model, example_inputs: tuple[Any, ...]) -> tuple[ExportedProgram, bool]:
    """Export ``model`` (an ``nn.Module``, a TorchScript module or an ``ExportedProgram``)."""
    if isinstance(model, ExportedProgram):
        return _export(model.module(), example_inputs, name="the ExportedProgram")
    if isinstance(model, torch.jit.ScriptModule):
        name = getattr(model, "original_name", type(model).__name__)
        grown, _ = _batch_examples(example_inputs)
        return _export(_script_to_graph(model, grown), example_inputs, name=name)
    return _export(model, example_inputs)


def _views_to_reshape(gm: fx.GraphModule) -> None:
    """``aten.view`` becomes ``aten.reshape``: export records ``reshape`` as ``view`` when the
    traced strides allow it, but quantized regions change strides (int8 convs return
    channels-last, ``dequantize`` returns contiguous tensors). After functionalisation no
    value is written through a view, so ``reshape`` computes the same."""
    views = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in views:
            node.target = torch.ops.aten.reshape.default
    gm.recompile()


def _drop_identity_clones(gm: fx.GraphModule) -> None:
    """Remove ``aten.clone`` nodes that only copy: ``nn.Dropout`` in eval and ``x.clone()``.

    In a functional graph nothing writes into a value after it is made, so a clone that
    keeps the layout (no ``memory_format`` other than ``preserve_format``) computes what its
    input holds: on MiniLM at batch 50 the two dropout copies per layer took 15% of a call.
    Kept: ``clone(memory_format=...)`` (``.contiguous()``, whose layout a later ``view`` may
    rely on), a clone the graph returns (the caller may write into its result, which must not
    be an input or a weight), and every clone of a graph that mutates anything.
    """
    calls = [node for node in gm.graph.nodes if node.op == "call_function"]
    if any(getattr(getattr(node.target, "_schema", None), "is_mutable", False) for node in calls):
        return
    keep = (None, torch.preserve_format)
    for node in calls:
        if (node.target is torch.ops.aten.clone.default and node.kwargs.get("memory_format") in keep
                and isinstance(node.args[0], fx.Node) and all(user.op != "output" for user in node.users)):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()


_CONV_DIMS = {torch.ops.aten.conv1d.default: 1, torch.ops.aten.conv2d.default: 2, torch.ops.aten.conv3d.default: 3}


def _pad_mode_value(node: fx.Node) -> tuple[str, object]:
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    return str(mode), node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)


def _fold_zero_padding(gm: fx.GraphModule) -> None:
    """Padding the graph need not copy: ``aten.pad`` by nothing is dropped, and a symmetric
    zero pad that only a convolution reads becomes that convolution's own padding.

    TensorFlow-style "same" padding (the ``transformers`` MobileNetV2) puts an ``aten.pad``
    before every convolution: 34 of its 52 add nothing, 13 are ``(1, 1, 1, 1)`` before a 3x3
    convolution; each was a copy of its input. ``conv(pad(x, p, 0.0), padding=q)`` is
    ``conv(x, padding=q + p)`` exactly (the int8 kernels pad with the zero point, the real 0).
    Kept: asymmetric, non-zero, reflect / replicate / circular padding; a pad read by anything
    else or returned; every pad of a graph that mutates anything.
    """
    calls = [node for node in gm.graph.nodes if node.op == "call_function"]
    if any(getattr(getattr(node.target, "_schema", None), "is_mutable", False) for node in calls):
        return
    for node in calls:
        if node.target is not torch.ops.aten.pad.default or not isinstance(node.args[0], fx.Node):
            continue
        if any(user.op == "output" for user in node.users):
            continue
        pad = [int(p) for p in node.args[1]]
        if all(p == 0 for p in pad):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            continue
        mode, value = _pad_mode_value(node)
        conv = next(iter(node.users)) if len(node.users) == 1 else None
        dims = _CONV_DIMS.get(conv.target) if conv is not None else None  # type: ignore[call-overload]
        if conv is None or dims is None or mode != "constant" or value not in (None, 0, 0.0) or conv.kwargs:
            continue
        if conv.args[0] is not node or len(pad) != 2 * dims or min(pad) < 0:
            continue
        # pad runs from the last dimension backwards: (left, right) of the last, then the one before
        sides = [(pad[2 * i], pad[2 * i + 1]) for i in range(dims)][::-1]
        if any(left != right for left, right in sides):
            continue
        args = list(conv.args) + [None, [1] * dims, [0] * dims, [1] * dims, 1][len(conv.args) - 2:]
        padding = [int(p) for p in args[4]]
        padding = padding * dims if len(padding) == 1 else padding
        args[4] = [p + left for p, (left, _) in zip(padding, sides, strict=True)]
        conv.args = (node.args[0], *args[1:])
        gm.graph.erase_node(node)
    gm.recompile()


def _forward_names(model: Model) -> list[str]:
    """The names of ``forward``'s parameters, for messages about example inputs (best effort)."""
    forward = getattr(model, "forward", None)
    try:
        parameters = [] if forward is None else list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):  # a TorchScript method may have no Python signature
        return []
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        return []  # forward(*args): the graph's names say more
    return [p.name for p in parameters]


def capture(model: Model, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Export ``model`` on ``example_inputs`` into a functional ATen ``GraphModule``.

    The batch dimension is dynamic (captured at batch 1, runs at batch 8). Every
    ``call_function`` node carries ``meta[MODULE_PATH]``. The model's parameters are
    shared, not copied: passes never write into them.

    The result checks its inputs on every call against what was captured (:mod:`graphquant.inputs`:
    each input's dtype, device and sizes, the batch dynamic or fixed), and that check is where
    everything downstream reads the captured inputs from (:func:`graphquant.inputs.input_specs`).
    """
    check_capturable(model)
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    specs_from_examples(example_inputs, _forward_names(model), False)  # refuses a batch of 0 and non-float32 floats
    ep, dynamic = _program(model, tuple(example_inputs))
    gm = ep.run_decompositions({}).module()
    names = _forward_names(model)  # the user's names; the graph renames some (``input`` -> ``input_1``)
    placeholders = [node.name for node in gm.graph.find_nodes(op="placeholder")]
    install_input_check(gm, specs_from_examples(example_inputs, names if len(names) == len(placeholders) else
                                                placeholders, dynamic))
    paths = module_paths(model)
    for node in gm.graph.nodes:
        path, kind = _module_path(node, paths)
        node.meta[MODULE_PATH] = path
        node.meta[MODULE_TYPE] = kind
    _convolution_to_conv_nd(gm)
    _matmul_to_linear(gm)
    _views_to_reshape(gm)
    _drop_identity_clones(gm)
    _fold_zero_padding(gm)
    return gm


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy, so that ``inplace=False`` never touches the user's model."""
    return copy.deepcopy(model)
