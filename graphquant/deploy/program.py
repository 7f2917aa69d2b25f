"""Deployment as a ``.pt2`` program: a quantized model saved with its manifest and loaded back
(:func:`save`, :func:`load`). The TorchScript form is :mod:`graphquant.torchscript`.

oneDNN's packed weights are opaque tensors: ``torch.export.save`` cannot store them. The saved
state is the plain int8 weight, packed once when the model is loaded, never on a call:
:func:`save` exports the *portable* graph, in which each kernel reads its int8 weight buffer
where it read the packed one (``qconv2d(x, ..., w_packed, ...)`` becomes
``qconv2d(x, ..., w_int8, ...)``). Each kernel node carries what packing needs (``x_scale``,
``x_zero_point``, ``w_scale``, ``stride``, ``padding``...), so :func:`load` repacks from the
graph itself, for the weights the manifest lists as packed.

The manifest (``model.pt2`` -> ``model.manifest.json``, also inside the ``.pt2``) lists every
compute node: quantized ones with pattern, ``qconfig_dict`` key, scale, zero point, kernel
and module path; float ones with the reason. JSON with sorted keys, so two runs diff cleanly.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, fx, nn
from torch.export import Dim, ExportedProgram

from graphquant.api import LazyQuantized
from graphquant.capture import BATCH, MANIFEST_FILE, read_program
from graphquant.errors import GraphQuantError, where
from graphquant.graph import add_attr, example_shape, get_attr_value, is_graphquant_op, module_path, named_args
from graphquant.inputs import INPUT_CHECK, InputSpec, input_specs, install_input_check
from graphquant.kernels import onednn, x86
from graphquant.qconfig import QConfig
from graphquant.quantized import QuantizedRecord, attach, record_of
from graphquant.report import ConversionReport, NodeReport, bias_lines, smoothing_lines
from graphquant.runtimes import install_direct_calls

MANIFEST_FORMAT = "graphquant.manifest"
MANIFEST_VERSION = 1
# pack_conv's arguments besides the weight, all of them named arguments of the conv kernels
_CONV_PACK_ARGS = ("w_scale", "x_scale", "x_zero_point", "stride", "padding", "dilation", "groups")
_PACKS: dict[str, Callable[..., Tensor]] = {"pack_conv": onednn.pack_conv, "pack_linear": onednn.pack_linear}


# ---------------------------------------------------------------------------------------------
# the quantized model and its manifest


def graph_module(qmodel: object) -> fx.GraphModule:
    """The converted ``GraphModule`` behind ``qmodel`` (a ``LazyQuantized`` once it has run)."""
    quantized = qmodel.quantized if isinstance(qmodel, LazyQuantized) else qmodel
    if quantized is None:
        raise GraphQuantError(
            "graphquant: this dynamic model has not run yet, so it has no graph to save: call it once on an "
            "example batch, or pass example_inputs to graphquant.quantize_dynamic"
        )
    record_of(quantized)  # a converted model, or the error that says what to pass
    if not isinstance(quantized, fx.GraphModule):
        raise GraphQuantError(
            f"graphquant: this {type(qmodel).__name__} was quantized region by region (it does not export whole); "
            "it has no one graph: save it with graphquant.save (an archive of its regions)"
        )
    return quantized


def input_records(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """The inputs as the manifest lists them: shape with ``"batch"`` for a dynamic batch, dtype."""
    specs = input_specs(gm)
    if specs is None or any(spec is None for spec in specs):
        raise GraphQuantError(
            "graphquant: only models whose inputs are all tensors can be saved or scripted; wrap the model so that "
            "its forward takes tensors only"
        )
    return [{"shape": [BATCH, *spec.sizes[1:]] if spec.dynamic_batch else list(spec.sizes),
             "dtype": str(spec.dtype).removeprefix("torch.")} for spec in specs if spec is not None]


def manifest(qmodel: nn.Module) -> dict[str, Any]:
    """What was quantized and how, as JSON-ready data (see :func:`manifest_json`)."""
    gm = graph_module(qmodel)
    record = record_of(gm)
    report, qconfig_dict = record.report, record.qconfig_dict
    packed = {str(entry["int8"]): str(entry["pack"]) for entry in record.packed.values()}
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "torch": torch.__version__.split("+")[0],
        "backend": report.backend,
        "mode": report.mode,
        "inputs": input_records(gm),
        "qconfig_dict": {key: None if qconfig is None else qconfig.to_dict() for key, qconfig in qconfig_dict.items()},
        "summary": {"quantized": len(report.quantized), "float": len(report.float_nodes)},
        "nodes": [asdict(node) for node in report.nodes],
        "smoothing": [asdict(line) for line in report.smoothing],
        "bias_correction": [asdict(line) for line in report.bias_correction],
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
            "quantized_on_saturating_cpu": report.backend == "onednn" and x86.saturates()}


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
        )


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
                              "such as model.pt2 inside it")
    if not os.path.isdir(parent):
        raise GraphQuantError(f"graphquant: cannot write {what} to {text}: directory {parent} does not exist; "
                              "create it first (os.makedirs) or choose another path")
    if not os.access(parent, os.W_OK):
        raise GraphQuantError(f"graphquant: cannot write {what} to {text}: directory {parent} is not writable")


def _pack_args(gm: fx.GraphModule, node: fx.Node, pack: str) -> dict[str, Any]:
    """The packing arguments a kernel node carries (``w_scale`` read from its buffer)."""
    if pack == "pack_linear":
        return {}
    args = named_args(node)
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


def portablegraph_module(qmodel: nn.Module) -> fx.GraphModule:
    """The quantized graph with every packed oneDNN weight read as its plain int8 buffer.

    Shares the model's tensors. The kernels dispatch on the weight: with int8 weights this
    graph runs on the portable backend until :func:`load` packs them again. Each rebuilt
    packing is checked against the recorded one, so a kernel whose packing the graph cannot
    reproduce fails here, not after loading.
    """
    gm = graph_module(qmodel)
    packed = record_of(gm).packed
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        if node.op == "call_function" and is_graphquant_op(node.target):
            w = named_args(node).get("w")
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
        return fx.GraphModule(gm, graph)


def exportable_graph_module(qmodel: nn.Module) -> fx.GraphModule:
    """:func:`portablegraph_module` with every ``torch.return_types`` output a plain tuple: the
    graph :func:`save` exports and :mod:`graphquant.compiled` expands."""
    portable = portablegraph_module(qmodel)
    codegen = portable.graph._codegen
    if isinstance(codegen, fx.graph._PyTreeCodeGen) and codegen.pytree_info.out_spec is not None:
        out_spec = _plain_tuples(codegen.pytree_info.out_spec)
        codegen.pytree_info = codegen.pytree_info._replace(out_spec=out_spec)
        portable._out_spec = out_spec
        portable.recompile()
    return portable


def export_graph(gm: fx.GraphModule, inputs: list[dict[str, Any]]) -> ExportedProgram:
    """``torch.export`` of a graph derived from the quantized one (``inputs``: the manifest's),
    batch dimension dynamic as it was at capture."""
    examples, shapes = [], []
    for entry in inputs:
        batch = entry["shape"][0]
        examples.append(torch.zeros((2 if batch == BATCH else batch, *entry["shape"][1:]),
                                    dtype=getattr(torch, entry["dtype"])))
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
    gm = graph_module(qmodel)
    check_writable(path)
    check_writable(manifest_path(path), "the manifest")
    data = manifest(gm)
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    program = export_graph(exportable_graph_module(gm), data["inputs"])
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
    table = record_of(gm).packed
    made: dict[tuple[str, str], fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not is_graphquant_op(node.target):
            continue
        w = named_args(node).get("w")
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
    program, manifest_text = read_program(text)
    data = _read_manifest(manifest_text, text)
    gm = program.module()
    del program
    backend = data["backend"]
    repacks = bool(data["packed_weights"]) and onednn.available()
    if data["packed_weights"] and not repacks:
        warnings.warn(f"graphquant: {text} was saved with oneDNN kernels; this PyTorch has none, so it runs on "
                      "the portable kernels", stacklevel=2)
        backend = "portable"
    report = ConversionReport(data["mode"], backend, [NodeReport(**node) for node in data["nodes"]],
                              smoothing=smoothing_lines(data.get("smoothing", [])),
                              bias_correction=bias_lines(data.get("bias_correction", [])))
    qconfig_dict = {key: None if value is None else QConfig.from_dict(value)
                    for key, value in data["qconfig_dict"].items()}
    attach(gm, QuantizedRecord(report, qconfig_dict))
    if repacks:
        repack(gm, data["packed_weights"])
        _warn_if_8bit_on_saturating_cpu(data, text)
    install_direct_calls(gm)
    install_input_check(gm, manifest_specs(data["inputs"], [n.name for n in gm.graph.find_nodes(op="placeholder")]))
    return gm


def manifest_specs(inputs: list[dict[str, Any]], names: list[str]) -> tuple[InputSpec, ...]:
    """The input check of a loaded model, from the manifest's inputs (CPU: the kernels' device)
    and the inputs' names (``arg<i>`` past the end of ``names``)."""
    specs = []
    for position, entry in enumerate(inputs):
        batch = entry["shape"][0] if entry["shape"] else None
        sizes = tuple(1 if i == 0 and batch == BATCH else int(size) for i, size in enumerate(entry["shape"]))
        name = names[position] if position < len(names) else f"arg{position}"
        specs.append(InputSpec(position, name, getattr(torch, entry["dtype"]), torch.device("cpu"), sizes,
                               batch == BATCH))
    return tuple(specs)
