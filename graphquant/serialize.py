"""Deployment: a quantized model saved as a ``.pt2`` program with a manifest, loaded back, or
written out as TorchScript.

oneDNN's packed weights are opaque tensors: ``torch.export.save`` and ``torch.jit.save``
cannot store them. Both forms therefore keep the plain int8 weight as the saved state and
pack it once when the model is loaded, never on a call:

- ``.pt2``: :func:`save` exports the *portable* graph, in which each kernel reads its int8
  weight buffer where it read the packed one (``qconv2d(x, ..., w_packed, ...)`` becomes
  ``qconv2d(x, ..., w_int8, ...)``). Each kernel node carries what packing needs (``x_scale``,
  ``x_zero_point``, ``w_scale``, ``stride``, ``padding``...), so :func:`load` repacks from
  the graph itself, for the weights the manifest lists as packed.
- TorchScript: :func:`to_torchscript` replaces every ``graphquant::`` op by a TorchScript
  function of aten / onednn ops computing what the kernel computes, and every packed
  weight by a small module whose ``__getstate__`` saves the int8 weight and whose
  ``__setstate__`` packs it again. ``torch.jit.load`` runs the result without graphquant.

The manifest (``model.pt2`` -> ``model.manifest.json``, also inside the ``.pt2``) lists every
compute node: quantized ones with pattern, ``qconfig_dict`` key, scale, zero point, kernel
and module path; float ones with the reason. JSON with sorted keys, so two runs diff cleanly.
"""

from __future__ import annotations

import copy
import json
import os
import typing
import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, fx, nn
from torch.export import Dim, ExportedProgram

from graphquant.api import LazyQuantized
from graphquant.capture import BATCH, MANIFEST_FILE
from graphquant.errors import GraphQuantError, where
from graphquant.graph import add_attr, example_shape, get_attr_value, module_path
from graphquant.inputs import INPUT_CHECK, InputSpec, input_specs, install_input_check
from graphquant.kernels import elementwise, embedding, onednn, x86
from graphquant.kernels.onednn import onednn_dilation
from graphquant.patterns.context import PACKED
from graphquant.qconfig import QConfig
from graphquant.quant_math import NATIVE_QUANTIZE, dynamic_qparams
from graphquant.report import ConversionReport, NodeReport

MANIFEST_FORMAT = "graphquant.manifest"
MANIFEST_VERSION = 1
# pack_conv's arguments besides the weight, all of them named arguments of the conv kernels
_CONV_PACK_ARGS = ("w_scale", "x_scale", "x_zero_point", "stride", "padding", "dilation", "groups")
_PACKS: dict[str, Callable[..., Tensor]] = {"pack_conv": onednn.pack_conv, "pack_linear": onednn.pack_linear}


# ---------------------------------------------------------------------------------------------
# the quantized model and its manifest


def _graph_module(qmodel: object) -> fx.GraphModule:
    """The converted ``GraphModule`` behind ``qmodel`` (a ``LazyQuantized`` once it has run)."""
    quantized = qmodel.quantized if isinstance(qmodel, LazyQuantized) else qmodel
    if quantized is None:
        raise GraphQuantError(
            "graphquant: this dynamic model has not run yet, so it has no graph to save: call it once on an "
            "example batch, or pass example_inputs to graphquant.quantize_dynamic"
        )
    if not isinstance(quantized, fx.GraphModule) or getattr(quantized, "graphquant_report", None) is None:
        raise GraphQuantError(
            "graphquant: expected a model returned by graphquant.convert / quantize / load, got "
            f"{type(qmodel).__name__}"
        )
    return quantized


def _inputs(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """The inputs as the manifest lists them: shape with ``"batch"`` for a dynamic batch, dtype."""
    spec = getattr(gm, "graphquant_input_spec", None)
    if spec is None or any(entry is None for entry in spec):
        raise GraphQuantError(
            "graphquant: only models whose inputs are all tensors can be saved or scripted; wrap the model so that "
            "its forward takes tensors only"
        )
    batch = getattr(gm, "graphquant_batch", None)
    # a fixed-shape capture: each input's own first size (embedding_bag's indices and offsets differ)
    sizes = getattr(gm, "graphquant_input_sizes", None) or [None] * len(spec)
    entries = []
    for (shape, dtype), size in zip(spec, sizes, strict=True):
        first = BATCH if batch is None else (batch if size is None else size)
        entries.append({"shape": [first, *shape], "dtype": str(dtype).removeprefix("torch.")})
    return entries


def manifest(qmodel: nn.Module) -> dict[str, Any]:
    """What was quantized and how, as JSON-ready data (see :func:`manifest_json`)."""
    gm = _graph_module(qmodel)
    report: ConversionReport = gm.graphquant_report  # type: ignore[assignment]
    qconfig_dict = getattr(gm, "graphquant_qconfig_dict", {})
    packed = {str(entry["int8"]): str(entry["pack"]) for entry in getattr(gm, PACKED, {}).values()}
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "torch": torch.__version__.split("+")[0],
        "backend": report.backend,
        "mode": report.mode,
        "inputs": _inputs(gm),
        "qconfig_dict": {key: None if qconfig is None else qconfig.to_dict() for key, qconfig in qconfig_dict.items()},
        "summary": {"quantized": len(report.quantized), "float": len(report.float_nodes)},
        "nodes": [asdict(node) for node in report.nodes],
        "packed_weights": packed,
        "x86": _x86_record(report),
    }


def _x86_record(report: ConversionReport) -> dict[str, Any]:
    """How the oneDNN GEMM / conv layers were quantized for x86 (kernels/x86.py): how many
    read 8-bit and how many 7-bit (``reduce_range``) activations, and whether the CPU that
    quantized the model saturates. :func:`load` reads it to tell the user what the loading
    CPU will do."""
    # one count per layer: the conv or linear node itself, not the activation or add fused into it
    bits = [node.activation_bits for node in report.nodes
            if node.quantized and node.activation_bits is not None and ("conv" in node.op or "linear" in node.op)]
    return {"layers_8bit": bits.count(8), "layers_7bit": bits.count(7),
            "quantized_on_saturating_cpu": report.backend == "onednn" and x86.saturates()}  # fmt: skip


def _warn_if_8bit_on_saturating_cpu(data: dict[str, Any], path: str) -> None:
    """One warning where this CPU saturates and the model has 8-bit layers: they stay exact, at
    about fp32 speed, and the option that avoids it is named."""
    layers = int(data.get("x86", {}).get("layers_8bit", 0))
    if layers and x86.saturates():
        warnings.warn(
            f"graphquant: {path}: this CPU's int8 kernels saturate (x86 without VNNI, or ONEDNN_MAX_CPU_ISA set), so "
            f"its {layers} int8 layers with 8-bit activations run as the exact float32 op over their int8 values "
            "(about fp32 speed; outputs are unchanged). For int8 kernels on such CPUs, quantize with "
            "graphquant.get_default_qconfig('x86', reduce_range=True) (7-bit activations)", stacklevel=3,
        )  # fmt: skip


def manifest_json(qmodel: nn.Module) -> str:
    """The manifest as text: indented, keys sorted, one trailing newline."""
    return json.dumps(manifest(qmodel), indent=2, sort_keys=True) + "\n"


def manifest_path(path: str | os.PathLike[str]) -> str:
    """Where the manifest of ``path`` lies: ``model.pt2`` -> ``model.manifest.json``."""
    text = os.fspath(path)
    return (text[: -len(".pt2")] if text.endswith(".pt2") else text) + ".manifest.json"


# ---------------------------------------------------------------------------------------------
# save


def check_writable(path: str | os.PathLike[str], what: str = "the model") -> None:
    """A ``GraphQuantError`` naming ``path`` and the way out, before any work, where ``path``
    cannot be written: its directory missing or not a directory, or ``path`` itself a directory
    (``torch.export.save`` would raise a bare ``RuntimeError`` after the export)."""
    text = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise GraphQuantError(f"graphquant: cannot write {what} to {text}: it is a directory; give a file name "
                              "such as model.pt2 inside it")  # fmt: skip
    if not os.path.isdir(parent):
        raise GraphQuantError(f"graphquant: cannot write {what} to {text}: directory {parent} does not exist; "
                              "create it first (os.makedirs) or choose another path")  # fmt: skip
    if not os.access(parent, os.W_OK):
        raise GraphQuantError(f"graphquant: cannot write {what} to {text}: directory {parent} is not writable")


def _named_args(node: fx.Node) -> dict[str, Any]:
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


def _is_graphquant_op(target: object) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "graphquant"


def _pack_args(gm: fx.GraphModule, node: fx.Node, pack: str) -> dict[str, Any]:
    """The packing arguments a kernel node carries (``w_scale`` read from its buffer)."""
    if pack == "pack_linear":
        return {}
    args = _named_args(node)
    missing = [name for name in _CONV_PACK_ARGS if name not in args]
    if missing:
        raise GraphQuantError(
            f"graphquant: {where(module_path(node), node.name)}: {node.target} names no {', '.join(missing)}, "
            "so its packed weight cannot be rebuilt from the graph"
        )
    out = {name: args[name] for name in _CONV_PACK_ARGS}
    out["w_scale"] = get_attr_value(gm, out["w_scale"])
    out["stride"], out["padding"], out["dilation"] = (list(out[k]) for k in ("stride", "padding", "dilation"))
    out["x_shape"] = example_shape(node.args[0])  # the layout hint, from the graph's recorded shapes
    return out


def _same_pack(recorded: dict[str, Any], rebuilt: dict[str, Any]) -> bool:
    """Whether a packing rebuilt from the graph computes what the recorded one does (the
    ``x_shape`` layout hint changes only speed)."""
    for name, value in rebuilt.items():
        if name == "x_shape":
            continue
        other = recorded.get(name)
        if isinstance(value, Tensor):
            if not (isinstance(other, Tensor) and torch.equal(value.float(), other.float())):
                return False
        elif (list(other) if isinstance(other, (list, tuple)) else other) != value:
            return False
    return True


def portable_graph_module(qmodel: nn.Module) -> fx.GraphModule:
    """The quantized graph with every packed oneDNN weight read as its plain int8 buffer.

    Shares the model's tensors. The kernels dispatch on the weight: with int8 weights this
    graph runs on the portable backend until :func:`load` packs them again. Each rebuilt
    packing is checked against the recorded one, so a kernel whose packing the graph cannot
    reproduce fails here, not after loading.
    """
    gm = _graph_module(qmodel)
    packed: dict[str, dict[str, Any]] = getattr(gm, PACKED, {})
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        if node.op == "call_function" and _is_graphquant_op(node.target):
            w = _named_args(node).get("w")
            if isinstance(w, fx.Node) and w.op == "get_attr" and w.target in packed:
                entry = packed[str(w.target)]
                if not _same_pack(entry, _pack_args(gm, node, str(entry["pack"]))):
                    raise GraphQuantError(
                        f"graphquant: {where(module_path(node), node.name)}: the packed weight {w.target} was packed "
                        "with arguments the kernel call does not carry; it cannot be saved and rebuilt"
                    )
    for node in graph.nodes:
        if node.op == "get_attr" and node.target in packed:
            node.target = str(packed[str(node.target)]["int8"])
    for node in list(graph.find_nodes(op="call_module", target=INPUT_CHECK)):
        graph.erase_node(node)  # export would trace it away; load installs it again from the manifest
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        portable = fx.GraphModule(gm, graph)
    for name in ("graphquant_input_spec", "graphquant_batch", "graphquant_input_sizes"):
        setattr(portable, name, getattr(gm, name, None))
    return portable


def _export_portable(gm: fx.GraphModule, inputs: list[dict[str, Any]]) -> ExportedProgram:
    """``torch.export`` of the portable graph, batch dimension dynamic as it was at capture."""
    examples, shapes = [], []
    for entry in inputs:
        batch = entry["shape"][0]
        examples.append(torch.zeros((2 if batch == BATCH else batch, *entry["shape"][1:]),
                                    dtype=getattr(torch, entry["dtype"])))  # fmt: skip
        shapes.append({0: Dim(BATCH, min=1, max=1 << 30)} if batch == BATCH else None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(gm, tuple(examples), dynamic_shapes=tuple(shapes))
    except Exception as error:
        raise GraphQuantError(f"graphquant: torch.export could not export the quantized graph: {error}") from error


def _plain_tuples(spec: pytree.TreeSpec) -> pytree.TreeSpec:
    """``spec`` with every ``torch.return_types`` node (what ``x.max(1)``, ``x.sort()`` return)
    a plain tuple: ``torch.export.save`` has no serialized name for them."""

    def plain(node: Any) -> Any:
        if type(node).__module__ == "torch.return_types":
            return tuple(plain(item) for item in node)
        if isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
            return type(node)(plain(item) for item in node)
        if isinstance(node, dict):
            return {key: plain(value) for key, value in node.items()}
        return node

    return pytree.tree_structure(plain(pytree.tree_unflatten(list(range(spec.num_leaves)), spec)))


def save(qmodel: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``qmodel`` as a ``.pt2`` program (int8 weights, no packed ones) and its manifest.

    The manifest goes beside it (``model.pt2`` -> ``model.manifest.json``) and inside it (extra
    file ``graphquant/manifest.json``). :func:`load` reads both the program and the manifest.
    A ``torch.return_types`` output (``return x.max(1)``) loads as a plain ``(values, indices)``
    tuple: ``torch.export.save`` cannot store those types.
    """
    gm = _graph_module(qmodel)
    check_writable(path)
    check_writable(manifest_path(path), "the manifest")
    data = manifest(gm)
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    portable = portable_graph_module(gm)
    codegen = portable.graph._codegen
    if isinstance(codegen, fx.graph._PyTreeCodeGen) and codegen.pytree_info.out_spec is not None:
        out_spec = _plain_tuples(codegen.pytree_info.out_spec)
        codegen.pytree_info = codegen.pytree_info._replace(out_spec=out_spec)
        portable._out_spec = out_spec
        portable.recompile()
    program = _export_portable(portable, data["inputs"])
    torch.export.save(program, path, extra_files={MANIFEST_FILE: text})
    with open(manifest_path(path), "w", encoding="utf-8") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------
# load


def _read_manifest(text: str, path: str) -> dict[str, Any]:
    if not text:
        raise GraphQuantError(
            f"graphquant: {path} was not written by graphquant.save (it has no {MANIFEST_FILE}); to quantize a float "
            "program pass it to graphquant.prepare or graphquant.quantize"
        )
    data = json.loads(text)
    if data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
        raise GraphQuantError(
            f"graphquant: {path} has manifest {data.get('format')} version {data.get('version')}; this graphquant "
            f"reads {MANIFEST_FORMAT} version {MANIFEST_VERSION}"
        )
    return data


def repack(gm: fx.GraphModule, packed_weights: dict[str, str]) -> None:
    """Pack the int8 weights named in ``packed_weights`` (buffer -> ``"pack_conv"`` / ``"pack_linear"``)
    once, from the arguments of the kernel nodes that read them, and point those nodes at the packs.

    ``x -> qconv2d(x, ..., w_int8, ...)`` becomes ``x -> qconv2d(x, ..., w_packed, ...)``; the int8
    buffer stays, as the state the next :func:`save` writes. A weight read with two different
    input qparams is packed twice, as convert packed it.
    """
    table: dict[str, dict[str, Any]] = getattr(gm, PACKED, {})
    setattr(gm, PACKED, table)
    made: dict[tuple[str, str], fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not _is_graphquant_op(node.target):
            continue
        w = _named_args(node).get("w")
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and w.target in packed_weights):
            continue
        pack = packed_weights[str(w.target)]
        args = _pack_args(gm, node, pack)
        key = (str(w.target), repr({k: v for k, v in args.items() if not isinstance(v, Tensor)}))
        if key not in made:
            value = _PACKS[pack](get_attr_value(gm, w), **args)
            name = add_attr(gm, str(w.target).removesuffix("_int8") + "_packed", value, buffer=False)
            with gm.graph.inserting_before(node), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # fx warns on get_attr of a non-buffer (the packed weight)
                made[key] = gm.graph.get_attr(name)
            table[name] = {"int8": str(w.target), "pack": pack, **args}
        node.replace_input_with(w, made[key])
    gm.graph.eliminate_dead_code()
    gm.recompile()


def load(path: str | os.PathLike[str]) -> fx.GraphModule:
    """A model saved by :func:`save`, its int8 weights packed for oneDNN once, here.

    Where this PyTorch has no oneDNN int8 ops the model stays portable (with a warning if
    it was saved from oneDNN kernels: outputs may then differ in the last rounding step).
    ``graphquant.report(model)`` works on the result as on the saved model.
    """
    text = os.fspath(path)
    extra = {MANIFEST_FILE: ""}
    try:
        program = torch.export.load(text, extra_files=extra)
    except FileNotFoundError as error:
        raise GraphQuantError(f"graphquant: no such .pt2 file: {text}") from error
    except Exception as error:
        raise GraphQuantError(f"graphquant: {text} is not a program torch.export.load can read: {error}") from error
    data = _read_manifest(extra[MANIFEST_FILE], text)
    gm = program.module()
    del program
    backend = data["backend"]
    if data["packed_weights"]:
        if onednn.available():
            repack(gm, data["packed_weights"])
            _warn_if_8bit_on_saturating_cpu(data, text)
        else:
            warnings.warn(f"graphquant: {text} was saved with oneDNN kernels; this PyTorch has none, so it runs on "
                          "the portable kernels", stacklevel=2)  # fmt: skip
            backend = "portable"
    first = data["inputs"][0]["shape"][0] if data["inputs"] else BATCH
    attributes = {
        "graphquant_report": ConversionReport(data["mode"], backend, [NodeReport(**node) for node in data["nodes"]]),
        "graphquant_backend": backend,
        "graphquant_debug": data["mode"] == "reference",
        "graphquant_qconfig_dict": {
            key: None if value is None else QConfig.from_dict(value) for key, value in data["qconfig_dict"].items()
        },
        "graphquant_input_spec": [
            (tuple(entry["shape"][1:]), getattr(torch, entry["dtype"])) for entry in data["inputs"]
        ],
        "graphquant_batch": None if first == BATCH else int(first),
        "graphquant_input_sizes": None if first == BATCH else [int(entry["shape"][0]) for entry in data["inputs"]],
    }
    for name, value in attributes.items():
        setattr(gm, name, value)
    install_input_check(gm, _manifest_specs(gm, data["inputs"]))
    return gm


def _manifest_specs(gm: fx.GraphModule, inputs: list[dict[str, Any]]) -> tuple[InputSpec, ...]:
    """The input check of a loaded model, from the manifest's inputs (CPU: the kernels' device)."""
    names = [node.name for node in gm.graph.find_nodes(op="placeholder")]
    specs = []
    for position, entry in enumerate(inputs):
        batch = entry["shape"][0] if entry["shape"] else None
        sizes = tuple(1 if i == 0 and batch == BATCH else int(size) for i, size in enumerate(entry["shape"]))
        name = names[position] if position < len(names) else f"arg{position}"
        specs.append(InputSpec(position, name, getattr(torch, entry["dtype"]), torch.device("cpu"), sizes,
                               batch == BATCH))  # fmt: skip
    return tuple(specs)


# ---------------------------------------------------------------------------------------------
# TorchScript kernels: what kernels/ops.py, onednn.py and portable.py compute, op for op, in
# TorchScript. Same aten / onednn calls in the same order, so outputs are bit-identical.

def _ts_quantize_per_tensor(
    x: Tensor, scale: float, zero_point: int, qmin: int, qmax: int, dtype: torch.dtype
) -> Tensor:
    q = x.to(torch.float32) / scale
    return q.round_().add_(zero_point).clamp_(qmin, qmax).to(dtype)


def _ts_quantize_per_tensor_native(
    x: Tensor, scale: float, zero_point: int, qmin: int, qmax: int, dtype: torch.dtype
) -> Tensor:
    """kernels.ops.native_quantize: torch's one-pass quantize, its integers copied out as plain ints."""
    if dtype != torch.uint8 and dtype != torch.int8:
        return _ts_quantize_per_tensor(x, scale, zero_point, qmin, qmax, dtype)
    qdtype = torch.quint8 if dtype == torch.uint8 else torch.qint8
    q = torch.quantize_per_tensor(x.to(torch.float32), scale, zero_point, qdtype).int_repr()
    full = (qmin, qmax) == (0, 255) if dtype == torch.uint8 else (qmin, qmax) == (-128, 127)
    return q if full else q.clamp_(qmin, qmax)


def _ts_dequantize_per_tensor(q: Tensor, scale: float, zero_point: int) -> Tensor:
    return ((q.to(torch.float32) - zero_point) * scale).contiguous()


def _ts_axis_shape(ndim: int, axis: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = -1
    return shape


def _ts_quantize_per_channel(
    x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, qmin: int, qmax: int, dtype: torch.dtype
) -> Tensor:
    shape = _ts_axis_shape(x.dim(), axis)
    q = torch.round(x.to(torch.float32) / scale.reshape(shape)) + zero_point.reshape(shape)
    return torch.clamp(q, qmin, qmax).to(dtype)


def _ts_dequantize_per_channel(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    shape = _ts_axis_shape(q.dim(), axis)
    return (q.to(torch.float32) - zero_point.reshape(shape).to(torch.float32)) * scale.reshape(shape)


def _ts_check(x: Tensor, x_zero_point: int, w: Tensor, w_scale: Tensor, bias: Tensor | None, out_zero_point: int,
              out_channels: int) -> None:  # fmt: skip
    """The checks both backends make before any arithmetic (oneDNN crashes on malformed input)."""
    if x.dtype != torch.uint8:
        raise ValueError("graphquant: int8 kernel activation must be uint8")
    if not w.is_mkldnn and w.dtype != torch.int8:
        raise ValueError("graphquant: int8 kernel weight must be packed or int8")
    if x_zero_point < 0 or x_zero_point > 255 or out_zero_point < 0 or out_zero_point > 255:
        raise ValueError("graphquant: uint8 zero points must lie in [0, 255]")
    if w_scale.dim() != 1 or w_scale.numel() != out_channels:
        raise ValueError("graphquant: w_scale must have one entry per output channel")
    if bias is not None:
        if bias.numel() != out_channels:
            raise ValueError("graphquant: bias must have one entry per output channel")


def _ts_conv_out_shape(x: Tensor, w: Tensor, stride: list[int], padding: list[int], dilation: list[int],
                       groups: int) -> list[int]:  # fmt: skip
    spatial = x.dim() - 2
    fits = x.dim() == w.dim() or (x.dim() == 3 and w.dim() == 4)  # oneDNN packs a conv1d weight as 2-d
    if x.dim() < 3 or x.dim() > 5 or not fits or groups < 1 or x.size(1) != w.size(1) * groups:
        raise ValueError("graphquant: conv input does not fit its weight")
    out = [x.size(0), w.size(0)]
    for i in range(spatial):
        k = w.size(w.dim() - spatial + i)
        size = (x.size(2 + i) + 2 * padding[i] - dilation[i] * (k - 1) - 1) // stride[i] + 1
        if size < 1:
            raise ValueError("graphquant: conv input is too small for its kernel")
        out.append(size)
    return out


def _ts_onednn_conv_call(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor,
                         bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                         scale: float, zero_point: int, dtype: torch.dtype | None, fused: str,
                         post_op_args: list[float], x_qmax: int, saturates: bool) -> Tensor:  # fmt: skip
    w_zero_point = torch.zeros(w.size(0), dtype=torch.int64)
    return x86.qconv_call(x, x_scale, x_zero_point, w, w_scale, w_zero_point, bias, stride, padding,
                          onednn_dilation(w, dilation), groups, scale, zero_point, dtype, fused,
                          post_op_args, x_qmax, saturates)  # fmt: skip


def _ts_clamp_on_grid(y: Tensor, post_op: str, args: list[float], scale: float, zero_point: int) -> Tensor:
    if post_op == "relu":
        return y.clamp_min_(zero_point)
    lo = x86.quantize_real(torch.tensor(args[0], dtype=torch.float32), scale, zero_point)
    hi = x86.quantize_real(torch.tensor(args[1], dtype=torch.float32), scale, zero_point)
    return y.clamp_(int(lo.item()), int(hi.item()))


def _ts_onednn_qconv_nd(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor,
                        bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                        out_scale: float, out_zero_point: int, post_op: str,
                        post_op_args: list[float], x_qmax: int, saturates: bool) -> Tensor:  # fmt: skip
    """kernels.onednn.qconv on a 2-d or 3-d conv."""
    if x.dim() == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    fuses = post_op in ["none", "relu", "hardtanh", "hardswish", "silu"]
    if post_op == "none" or (x.dim() == 4 and fuses):
        return _ts_onednn_conv_call(x, x_scale, x_zero_point, w, w_scale, bias, stride, padding, dilation, groups,
                                    out_scale, out_zero_point, None, post_op, post_op_args, x_qmax,
                                    saturates)  # fmt: skip
    if post_op == "relu" or post_op == "hardtanh":
        y = _ts_onednn_conv_call(x, x_scale, x_zero_point, w, w_scale, bias, stride, padding, dilation, groups,
                                 out_scale, out_zero_point, None, "none", post_op_args, x_qmax, saturates)  # fmt: skip
        return _ts_clamp_on_grid(y, post_op, post_op_args, out_scale, out_zero_point)
    v = _ts_onednn_conv_call(x, x_scale, x_zero_point, w, w_scale, bias, stride, padding, dilation, groups, 1.0, 0,
                             torch.float32, "none", post_op_args, x_qmax, saturates)  # fmt: skip
    return x86.quantize_real(x86.post_op_float(v, post_op, post_op_args), out_scale, out_zero_point)


def _ts_requantize(acc: Tensor, x_scale: float, w_scale: Tensor, bias: Tensor | None, out_scale: float,
                   out_zero_point: int, post_op: str, post_op_args: list[float], channel_axis: int,
                   accum: Tensor | None, float_out: bool = False) -> Tensor:  # fmt: skip
    """kernels.portable._requantize."""
    shape = _ts_axis_shape(acc.dim(), channel_axis)
    acc_scale = (w_scale.double() * x_scale).reshape(shape)
    if bias is not None:
        acc = acc + torch.round(bias.double().reshape(shape) / acc_scale)
    v = acc * acc_scale
    if accum is not None:
        v = v + accum
    if float_out:
        return x86.post_op_float(v, post_op, post_op_args).to(torch.float32)
    return x86.quantize_real(x86.post_op_float(v, post_op, post_op_args), out_scale, out_zero_point)


def _ts_conv_nd(x: Tensor, w: Tensor, stride: list[int], padding: list[int], dilation: list[int],
                groups: int) -> Tensor:  # fmt: skip
    if x.dim() == 3:
        return torch.conv1d(x, w, None, stride, padding, dilation, groups)
    if x.dim() == 4:
        return torch.conv2d(x, w, None, stride, padding, dilation, groups)
    return torch.conv3d(x, w, None, stride, padding, dilation, groups)


def _ts_qconv(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor, bias: Tensor | None,
              stride: list[int], padding: list[int], dilation: list[int], groups: int, out_scale: float,
              out_zero_point: int, post_op: str, post_op_args: list[float], x_qmax: int,
              saturates: bool) -> Tensor:  # fmt: skip
    """graphquant::qconv1d / qconv2d / qconv3d (``saturates``: :class:`SaturationProbe`'s answer)."""
    _ts_check(x, x_zero_point, w, w_scale, bias, out_zero_point, w.size(0))
    out_shape = _ts_conv_out_shape(x, w, stride, padding, dilation, groups)
    if not w.is_mkldnn:
        acc = _ts_conv_nd(x.double() - x_zero_point, w.double(), stride, padding, dilation, groups)
        return _ts_requantize(acc, x_scale, w_scale, bias, out_scale, out_zero_point, post_op, post_op_args, 1, None)
    if x.size(0) == 0:
        return x.new_empty(out_shape)
    if x.dim() == 3:  # oneDNN fuses post-ops into 2-d convs only: a conv1d runs as a conv2d of height 1
        y = _ts_onednn_qconv_nd(x.unsqueeze(2), x_scale, x_zero_point, w, w_scale, bias, [1] + stride, [0] + padding,
                                [1] + dilation, groups, out_scale, out_zero_point, post_op, post_op_args,
                                x_qmax, saturates)  # fmt: skip
        return y.squeeze(2)
    return _ts_onednn_qconv_nd(x, x_scale, x_zero_point, w, w_scale, bias, stride, padding, dilation, groups,
                               out_scale, out_zero_point, post_op, post_op_args, x_qmax, saturates)  # fmt: skip


def _ts_onednn_qconv_add_2d(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor,
                            bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
                            groups: int, accum: Tensor, accum_scale: float, accum_zero_point: int, out_scale: float,
                            out_zero_point: int, post_op: str, accum_donated: bool,
                            x_qmax: int, saturates: bool) -> Tensor:  # fmt: skip
    # oneDNN writes the sum into its accum: a private channels-last copy unless the graph donated it
    if accum_donated and accum.is_contiguous(memory_format=torch.channels_last):
        private = accum
    else:
        private = accum.clone(memory_format=torch.channels_last)
    w_zero_point = torch.zeros(w.size(0), dtype=torch.int64)
    return x86.qconv_add_call(x, x_scale, x_zero_point, w, w_scale, w_zero_point, private, bias, stride, padding,
                              onednn_dilation(w, dilation), groups, out_scale, out_zero_point, accum_scale,
                              accum_zero_point, post_op, x_qmax, saturates)  # fmt: skip


def _ts_qconv_add(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                  stride: list[int], padding: list[int], dilation: list[int], groups: int, accum: Tensor,
                  accum_scale: float, accum_zero_point: int, out_scale: float, out_zero_point: int,
                  post_op: str, accum_donated: bool, x_qmax: int, saturates: bool) -> Tensor:  # fmt: skip
    """graphquant::qconv1d_add / qconv2d_add: ``post_op(conv(x) + accum)``."""
    _ts_check(x, x_zero_point, w, w_scale, bias, out_zero_point, w.size(0))
    if post_op != "none" and post_op != "relu":
        raise ValueError("graphquant::qconv_add: only relu follows the residual sum")
    out_shape = _ts_conv_out_shape(x, w, stride, padding, dilation, groups)
    if accum.dtype != torch.uint8 or accum.shape != out_shape:
        raise ValueError("graphquant::qconv_add: accum must be uint8 of the output's shape")
    if accum_zero_point < 0 or accum_zero_point > 255:
        raise ValueError("graphquant::qconv_add: uint8 zero points must lie in [0, 255]")
    if not w.is_mkldnn:
        acc = _ts_conv_nd(x.double() - x_zero_point, w.double(), stride, padding, dilation, groups)
        other = (accum.double() - accum_zero_point) * accum_scale
        return _ts_requantize(acc, x_scale, w_scale, bias, out_scale, out_zero_point, post_op, [], 1, other)
    if x.dim() == 3:
        y = _ts_onednn_qconv_add_2d(x.unsqueeze(2), x_scale, x_zero_point, w, w_scale, bias, [1] + stride,
                                    [0] + padding, [1] + dilation, groups, accum.unsqueeze(2), accum_scale,
                                    accum_zero_point, out_scale, out_zero_point, post_op,
                                    accum_donated, x_qmax, saturates)  # fmt: skip
        return y.squeeze(2)
    if x.dim() != 4:
        raise ValueError("graphquant::qconv_add: oneDNN fuses the residual sum into 1-d and 2-d convs only")
    if x.size(0) == 0:
        return accum.new_empty(out_shape)
    return _ts_onednn_qconv_add_2d(x, x_scale, x_zero_point, w, w_scale, bias, stride, padding, dilation, groups,
                                   accum, accum_scale, accum_zero_point, out_scale, out_zero_point,
                                   post_op, accum_donated, x_qmax, saturates)  # fmt: skip


def _ts_qconv_transpose(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor,
                        bias: Tensor | None, stride: list[int], padding: list[int], output_padding: list[int],
                        groups: int, dilation: list[int], out_scale: float, out_zero_point: int, post_op: str,
                        post_op_args: list[float]) -> Tensor:  # fmt: skip
    """graphquant::qconv_transposeNd (portable on both backends)."""
    if x.dtype != torch.uint8 or w.dtype != torch.int8:
        raise ValueError("graphquant::qconv_transpose: wants a uint8 activation and an int8 weight")
    if x.dim() != w.dim() or x.dim() < 3 or x.dim() > 5 or x.size(1) != w.size(0):
        raise ValueError("graphquant::qconv_transpose: input does not fit its weight")
    channel_shape = [1, -1] + [1] * (x.dim() - 2)
    xs = (x.double() - x_zero_point) * (w_scale.double() * x_scale).reshape(channel_shape)
    wd = w.double()
    if x.dim() == 3:
        v = torch.conv_transpose1d(xs, wd, None, stride, padding, output_padding, groups, dilation)
    elif x.dim() == 4:
        v = torch.conv_transpose2d(xs, wd, None, stride, padding, output_padding, groups, dilation)
    else:
        v = torch.conv_transpose3d(xs, wd, None, stride, padding, output_padding, groups, dilation)
    if bias is not None:
        v = v + bias.double().reshape(channel_shape)
    return x86.quantize_real(x86.post_op_float(v, post_op, post_op_args), out_scale, out_zero_point)


def _ts_qlinear(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                out_scale: float, out_zero_point: int, post_op: str, post_op_args: list[float],
                float_out: bool, x_qmax: int, saturates: bool) -> Tensor:  # fmt: skip
    """graphquant::qlinear. A packed weight is stored transposed, ``(in, out)``."""
    if float_out:
        out_scale, out_zero_point = 1.0, 0
    if not w.is_mkldnn:
        _ts_check(x, x_zero_point, w, w_scale, bias, out_zero_point, w.size(0))
        acc = F.linear(x.double() - x_zero_point, w.double())
        return _ts_requantize(acc, x_scale, w_scale, bias, out_scale, out_zero_point, post_op, post_op_args, -1,
                              None, float_out)  # fmt: skip
    in_features, out_features = w.size(0), w.size(1)
    _ts_check(x, x_zero_point, w, w_scale, bias, out_zero_point, out_features)
    if x.dim() < 1 or x.size(-1) != in_features:
        raise ValueError("graphquant::qlinear: input does not end in the weight's in_features")
    if x.numel() == 0:
        shape = list(x.shape[:-1])
        shape.append(out_features)
        return x.new_empty(shape, dtype=torch.float32 if float_out else torch.uint8)
    w_zero_point = torch.zeros(out_features, dtype=torch.int64)
    out_dtype: torch.dtype | None = torch.float32 if float_out else None
    return x86.qlinear_call(x.contiguous(), x_scale, x_zero_point, w, w_scale, w_zero_point, bias, out_scale,
                            out_zero_point, out_dtype, post_op, post_op_args, x_qmax, saturates)  # fmt: skip


def _ts_quantize_uint8_math(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return torch.clamp(torch.round(x.to(torch.float32) / scale) + zero_point, 0, 255).to(torch.uint8)


if NATIVE_QUANTIZE:  # the scripted code calls whichever is bound: quant_math.native_quantize or the math

    def _ts_quantize_uint8(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        s, zp = float(scale.item()), int(zero_point.item())
        if not (s > 0.0 and s < float("inf") and zp >= 0 and zp <= 255):  # a NaN or inf batch: the math path
            return _ts_quantize_uint8_math(x, scale, zero_point)
        return torch.quantize_per_tensor(x.to(torch.float32), s, zp, torch.quint8).int_repr()

else:
    _ts_quantize_uint8 = _ts_quantize_uint8_math


def _ts_quantize_dynamic(x: Tensor, per_token: bool, qmax: int) -> tuple[Tensor, Tensor, Tensor]:
    """quant_math.quantize_dynamic_tensor (its qparams: quant_math.dynamic_qparams itself)."""
    scale, zero_point = dynamic_qparams(x, per_token, qmax)
    if per_token:
        q = (x.to(torch.float32) / scale).round_().clamp_(-(qmax + 1) // 2, qmax // 2).to(torch.int8)
        return q, scale, zero_point
    q = _ts_quantize_uint8(x, scale, zero_point)
    return (q.clamp_max_(qmax) if qmax < 255 else q), scale, zero_point


def _ts_dequantize_dynamic(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return (q.to(torch.float32) - zero_point.to(torch.float32)) * scale


def _ts_qlinear_dynamic(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None, per_token: bool,
                        post_op: str, post_op_args: list[float], x_qmax: int, saturates: bool) -> Tensor:
    """graphquant::qlinear_dynamic: float32 in and out, int8 GEMM inside, then the post-op."""
    out_features = w.size(1) if w.is_mkldnn else w.size(0)
    in_features = w.size(0) if w.is_mkldnn else w.size(1)
    if x.dtype != torch.float32 or x.dim() < 1 or x.size(-1) != in_features:
        raise ValueError("graphquant::qlinear_dynamic: input must be float32 ending in the weight's in_features")
    if x.numel() == 0:
        shape = list(x.shape[:-1])
        shape.append(out_features)
        return x.new_empty(shape)
    x = x.contiguous()
    if w.is_mkldnn and per_token:  # kernels.dynamic: int8 shifted into uint8, zero point 128 (7-bit: 64)
        shift = 128 if x_qmax > 127 else 64
        row_scale, _ = dynamic_qparams(x, True, x_qmax)
        qu = (x.to(torch.float32) / row_scale).round_().add_(shift).clamp_(0, x_qmax).to(torch.uint8)
        y = x86.qlinear_call(qu, 1.0, shift, w, w_scale, torch.zeros(out_features, dtype=torch.int64), None, 1.0, 0,
                             torch.float32, "none", [], x_qmax, saturates)  # fmt: skip
        y.mul_(row_scale)
        if bias is not None:
            y.add_(bias)
        return x86.post_op_float(y, post_op, post_op_args)
    q, scale, zero_point = _ts_quantize_dynamic(x, per_token, x_qmax)
    if w.is_mkldnn:
        return x86.qlinear_dynamic_call(q, scale, zero_point, w, w_scale, torch.zeros(out_features, dtype=torch.int64),
                                        bias, post_op, post_op_args, x_qmax, saturates)  # fmt: skip
    acc = F.linear(q.double() - zero_point.double(), w.double())
    y = (acc * (scale.double() * w_scale.double())).float()
    if bias is not None:
        y.add_(bias)
    return x86.post_op_float(y, post_op, post_op_args)


def _ts_check_input(x: Tensor, position: int, name: str, dtype: torch.dtype, device: str, sizes: list[int],
                    dynamic_batch: bool, batch_of: Tensor, captured: str, cast: str) -> None:  # fmt: skip
    """inputs.InputCheck, one input: ``batch_of`` is the first input with a dynamic batch."""
    where = "graphquant: <model> input " + str(position) + " (" + name + ")"
    captured = "the model was captured with " + captured
    if x.dtype != dtype:
        raise ValueError(where + " has the wrong dtype; " + captured + ". Cast it with " + name + cast)
    if str(x.device) != device:
        raise ValueError(where + " is on " + str(x.device) + "; " + captured + ". Move it with " + name + ".to('"
                         + device + "')")  # fmt: skip
    shape = x.shape
    if len(shape) != len(sizes):
        raise ValueError(where + " is " + str(len(shape)) + "-d with shape " + str(shape) + "; " + captured
                         + ". Pass inputs of that rank, or re-quantize with example inputs of that shape")  # fmt: skip
    if len(shape) > 0 and shape[0] == 0:
        raise ValueError(where + " has batch size 0 (shape " + str(shape) + "); " + captured
                         + ". Skip empty batches: there is nothing to compute")  # fmt: skip
    for dim in range(len(shape)):
        if dim == 0 and dynamic_batch:
            if shape[0] != batch_of.size(0):
                raise ValueError(where + " has batch size " + str(shape[0]) + ", but an earlier input has "
                                 + str(batch_of.size(0)) + "; give every input the same batch size")  # fmt: skip
        elif shape[dim] != sizes[dim]:
            raise ValueError(where + " has shape " + str(shape) + ": dimension " + str(dim) + " must be "
                             + str(sizes[dim]) + ", got " + str(shape[dim]) + "; " + captured
                             + ". Pass inputs of that shape, or re-quantize with example inputs of that shape")


fx.node.has_side_effect(_ts_check_input)  # no users: kept through dead-code elimination


def _ts_input_checks(graph: fx.Graph, specs: tuple[InputSpec | None, ...], inputs: list[Any]) -> None:
    """One ``_ts_check_input`` call per tensor input, where ``_input_check`` was."""
    first = None
    for spec, x in zip(specs, inputs, strict=True):
        if spec is None:
            continue
        if spec.dynamic_batch and first is None:
            first = x
        cast = ".float()" if spec.dtype == torch.float32 else f".to({spec.dtype})"
        graph.call_function(_ts_check_input, (x, spec.position, spec.name, spec.dtype, str(spec.device),
                                              list(spec.sizes), spec.dynamic_batch, first if first is not None else x,
                                              spec.describe(), cast))  # fmt: skip


def _ts_linear_fp16(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    if w.dtype != torch.float16:
        raise ValueError("graphquant::linear_fp16: weight must be float16")
    return F.linear(x, w.float(), bias)


# twins that call oneDNN's GEMM / conv: their last argument is SaturationProbe's answer (kernels.x86)
_ASK_SATURATION = {"qconv1d", "qconv2d", "qconv3d", "qconv1d_add", "qconv2d_add", "qlinear", "qlinear_dynamic"}
# graphquant op name -> its TorchScript twin
TORCHSCRIPT_KERNELS: dict[str, Any] = {
    "quantize_per_tensor": _ts_quantize_per_tensor_native if NATIVE_QUANTIZE else _ts_quantize_per_tensor,
    "dequantize_per_tensor": _ts_dequantize_per_tensor,
    "quantize_per_channel": _ts_quantize_per_channel,
    "dequantize_per_channel": _ts_dequantize_per_channel,
    "qconv1d": _ts_qconv,
    "qconv2d": _ts_qconv,
    "qconv3d": _ts_qconv,
    "qconv1d_add": _ts_qconv_add,
    "qconv2d_add": _ts_qconv_add,
    "qconv_transpose1d": _ts_qconv_transpose,
    "qconv_transpose2d": _ts_qconv_transpose,
    "qconv_transpose3d": _ts_qconv_transpose,
    "qlinear": _ts_qlinear,
    "quantize_dynamic": _ts_quantize_dynamic,
    "dequantize_dynamic": _ts_dequantize_dynamic,
    "qlinear_dynamic": _ts_qlinear_dynamic,
    "linear_fp16": _ts_linear_fp16,
    **elementwise.TORCHSCRIPT,
    **embedding.TORCHSCRIPT,
}


def _ts_pack_conv(w: Tensor, w_scale: Tensor, x_scale: float, x_zero_point: int, stride: list[int],
                  padding: list[int], dilation: list[int], groups: int, x_shape: list[int]) -> Tensor:  # fmt: skip
    """kernels.onednn.pack_conv (``x_shape`` empty: no layout hint)."""
    hint: list[int] | None = None
    if len(x_shape) > 0:
        hint = x_shape
    return torch.ops.onednn.qconv_prepack(w.contiguous(), w_scale.float(), x_scale, x_zero_point, stride, padding,
                                          onednn_dilation(w, dilation), groups, hint)  # fmt: skip


ConvState = tuple[Tensor, Tensor, float, int, list[int], list[int], list[int], int, list[int], bool]


class PackedConvWeight(nn.Module):
    """A oneDNN conv weight in a TorchScript module: saved as int8, packed again on load.

    (No class-level attribute annotations: TorchScript cannot read them as strings.)
    """

    def __init__(self, w_int8: Tensor, w_scale: Tensor, x_scale: float, x_zero_point: int, stride: list[int],
                 padding: list[int], dilation: list[int], groups: int, x_shape: list[int],
                 packed: Tensor) -> None:  # fmt: skip
        super().__init__()
        self.w_int8, self.w_scale, self.x_scale, self.x_zero_point = w_int8, w_scale, x_scale, x_zero_point
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.x_shape = x_shape  # pack_conv's layout hint, [] for none
        self.packed = packed

    def forward(self) -> Tensor:
        return self.packed

    @torch.jit.export
    def __getstate__(self) -> ConvState:
        return (self.w_int8, self.w_scale, self.x_scale, self.x_zero_point, self.stride, self.padding, self.dilation,
                self.groups, self.x_shape, self.training)  # fmt: skip

    @torch.jit.export
    def __setstate__(self, state: ConvState) -> None:
        self.w_int8, self.w_scale, self.x_scale, self.x_zero_point = state[0], state[1], state[2], state[3]
        self.stride, self.padding, self.dilation, self.groups = state[4], state[5], state[6], state[7]
        self.x_shape, self.training = state[8], state[9]
        self.packed = _ts_pack_conv(self.w_int8, self.w_scale, self.x_scale, self.x_zero_point, self.stride,
                                    self.padding, self.dilation, self.groups, self.x_shape)  # fmt: skip


# the one attribute whose value cannot tell TorchScript its type (an empty list: no hint)
PackedConvWeight.__annotations__ = {"x_shape": typing.List[int]}  # noqa: UP006


class PackedLinearWeight(nn.Module):
    """A oneDNN linear weight in a TorchScript module: saved as int8, packed again on load."""

    def __init__(self, w_int8: Tensor, packed: Tensor) -> None:
        super().__init__()
        self.w_int8 = w_int8
        self.packed = packed

    def forward(self) -> Tensor:
        return self.packed

    @torch.jit.export
    def __getstate__(self) -> tuple[Tensor, bool]:
        return self.w_int8, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[Tensor, bool]) -> None:
        self.w_int8 = state[0]
        self.training = state[1]
        self.packed = torch.ops.onednn.qlinear_prepack(self.w_int8.contiguous(), None)


# ---------------------------------------------------------------------------------------------
# TorchScript out

# runtime shape assertions export adds; TorchScript checks shapes in the kernels themselves
_ASSERTS = {
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch.ops.aten.sym_constrain_range.default,
}


def _packed_weight_module(gm: fx.GraphModule, packed_name: str, entry: dict[str, Any]) -> nn.Module:
    w_int8 = getattr(gm, str(entry["int8"]))
    packed = getattr(gm, packed_name)
    if entry["pack"] == "pack_linear":
        return PackedLinearWeight(w_int8, packed)
    x_shape = entry.get("x_shape")
    return PackedConvWeight(w_int8, entry["w_scale"].float(), float(entry["x_scale"]), int(entry["x_zero_point"]),
                            list(entry["stride"]), list(entry["padding"]), list(entry["dilation"]),
                            int(entry["groups"]), [int(n) for n in x_shape] if x_shape and w_int8.dim() == 4 else [],
                            packed)  # fmt: skip


def _script_target(node: fx.Node) -> Any:
    """What the TorchScript graph calls for ``node``: the twin of a graphquant op, the overload
    packet of an ATen op (TorchScript has no ``aten.add.Tensor`` spelling; it picks the
    overload by argument types), or the function itself."""
    target = node.target
    if target is torch.ops.higher_order.cond:
        raise GraphQuantError(
            f"graphquant: {where(module_path(node), node.name)}: an `if` on a tensor (torch.cond) has no TorchScript "
            "form here; save the model with graphquant.save, or trace the float model before quantizing it"
        )
    if _is_graphquant_op(target):
        name = target._opname  # type: ignore[union-attr]
        if name not in TORCHSCRIPT_KERNELS:
            raise GraphQuantError(
                f"graphquant: {where(module_path(node), node.name)}: graphquant::{name} has no TorchScript form yet; "
                f"save the model with graphquant.save, or keep that module float with "
                f"qconfig_dict={{{module_path(node)!r}: None}}"
            )
        return TORCHSCRIPT_KERNELS[name]
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket
    return target


def _flat_inputs(gm: fx.GraphModule) -> None:
    in_spec = getattr(gm, "_in_spec", None)
    if in_spec is None:
        return
    args_spec = in_spec.children()[0] if in_spec.num_children == 2 else in_spec
    if in_spec.num_children == 2 and in_spec.children()[1].num_leaves:
        raise GraphQuantError("graphquant: to_torchscript takes models called with positional tensors, not keywords")
    if any(not child.is_leaf() for child in args_spec.children()):
        raise GraphQuantError("graphquant: to_torchscript takes models whose inputs are tensors, not nested structures")


def _scriptable_graph(gm: fx.GraphModule) -> tuple[nn.Module, fx.Graph]:
    """A root module and a graph TorchScript compiles: plain positional inputs, no export guards,
    twins for graphquant ops, packed weights behind :class:`PackedConvWeight` / :class:`PackedLinearWeight`."""
    _inputs(gm)
    _flat_inputs(gm)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            _script_target(node)  # refuses torch.cond and graphquant ops without a twin, naming the node
    packed: dict[str, dict[str, Any]] = getattr(gm, PACKED, {})
    root, graph = nn.Module(), fx.Graph()
    env: dict[fx.Node, Any] = {}
    names: dict[str, str] = {}
    probes: dict[bool, fx.Node] = {}  # a SaturationProbe call per kind, made where the first twin needs it

    def saturates(node: fx.Node) -> fx.Node | bool:
        if not packed:  # portable kernels only: nothing saturates
            return False
        named = _named_args(node)
        weight, groups = named.get("w"), named.get("groups", 1)
        depthwise = isinstance(weight, fx.Node) and weight.op == "get_attr" and isinstance(groups, int) and \
            x86.is_depthwise(get_attr_value(gm, weight), groups)  # fmt: skip
        if depthwise not in probes:
            name = "x86_saturation_depthwise" if depthwise else "x86_saturation"
            root.add_module(name, x86.SaturationProbe(depthwise))
            probes[depthwise] = graph.call_module(name, ())
        return probes[depthwise]

    def attribute(target: str, make: Any) -> str:
        if target not in names:
            names[target] = target.replace(".", "_")
            while hasattr(root, names[target]):
                names[target] += "_"
            value = make()
            if isinstance(value, nn.Module):
                root.add_module(names[target], value)
            else:
                root.register_buffer(names[target], value.detach())
        return names[target]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
        elif node.op == "get_attr":
            target = str(node.target)
            if target in packed:
                name = attribute(target, lambda t=target: _packed_weight_module(gm, t, packed[t]))
                env[node] = graph.call_module(name, ())
                continue
            value = get_attr_value(gm, node)
            if not isinstance(value, Tensor):
                raise GraphQuantError(f"graphquant: {node.name} reads {type(value).__name__} {target}; "
                                      "to_torchscript handles tensors only")  # fmt: skip
            env[node] = graph.get_attr(attribute(target, lambda v=value: v))
        elif node.op == "call_module":
            specs = input_specs(gm) if node.target == INPUT_CHECK else None
            if specs is not None:
                _ts_input_checks(graph, specs, [env[arg] for arg in node.args])
            elif node.target != "_guards_fn":  # export's input checks: TorchScript checks shapes in the kernels
                raise GraphQuantError(f"graphquant: {node.name} calls submodule {node.target}; to_torchscript "
                                      "handles flat graphs only")  # fmt: skip
        elif node.op == "call_function":
            if node.target in _ASSERTS:
                continue
            args, kwargs = node.args, node.kwargs
            if _is_graphquant_op(node.target):  # the twins take every argument, defaults filled in
                args, kwargs = tuple(_named_args(node).values()), {}
            args, kwargs = fx.map_arg(args, lambda n: env[n]), fx.map_arg(kwargs, lambda n: env[n])
            if _is_graphquant_op(node.target) and node.target._opname in _ASK_SATURATION:  # type: ignore[union-attr]
                args = (*args, saturates(node))
            env[node] = graph.call_function(_script_target(node), args, kwargs)
        elif node.op == "output":
            flat = fx.map_arg(node.args[0], lambda n: env[n])
            out_spec = getattr(gm, "_out_spec", None)
            graph.output(pytree.tree_unflatten(list(flat), out_spec) if out_spec is not None else flat)
    return root, graph


def to_torchscript(qmodel: nn.Module) -> torch.jit.ScriptModule:
    """``qmodel`` as a ``torch.jit.ScriptModule`` of aten and onednn ops only.

    ``torch.jit.save`` writes it with int8 weights; ``torch.jit.load`` packs them again and
    runs it in a process that never imports graphquant (a libtorch deployment), with
    outputs bit-identical to ``qmodel``'s. Both backends are supported: the portable
    kernels are pure aten, like their originals. An ``if`` on a tensor (``torch.cond``,
    from a scripted input) is refused.
    """
    gm = _graph_module(qmodel)
    root, graph = _scriptable_graph(gm)
    module = fx.GraphModule(root, graph, class_name="GraphQuantModule")
    module.graph.eliminate_dead_code()  # what only the dropped assertions read
    module.recompile()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.script(module)
    except Exception as error:
        raise GraphQuantError(f"graphquant: TorchScript could not compile the quantized graph: {error}") from error
