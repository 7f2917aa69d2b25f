"""The compiled runtime: a quantized graph as an Inductor-compiled AOTInductor package, run from
generated C++ with no Python per op (:func:`compile`, :func:`save_package`, :func:`load_package`).

Inductor cannot look inside a ``graphquant::`` op (a Python kernel), so the graph is first
*expanded*: every op becomes the aten and ``onednn::`` calls its kernel makes, from the same
source — each op's ``torchscript`` body (its :class:`~graphquant.kernels.registry.Kernel` record),
traced, which TorchScript also runs: on a packed weight the oneDNN kernels' shared bodies
(``kernels.onednn.qconv_run``, ``qlinear_run``, ...), on a portable one pure aten. A packed
weight becomes ``onednn::qconv_prepack`` / ``qlinear_prepack`` of its int8 buffer, which
Inductor's freezing folds into a constant at compile time, as it does for PT2E's graphs::

    qconv2d(x, ..., w_packed, ...)   becomes   qconv_pointwise(x, ..., qconv_prepack(w_int8, ...), ...)

Inductor then sees ``onednn::qconv_pointwise`` / ``qconv2d_pointwise.binary`` /
``qlinear_pointwise`` (extern kernels it calls from C++) and plain aten ops, which it fuses:
the quantize and dequantize at the borders, the uint8 elementwise and join kernels, the float
ops between GEMMs. Outputs are bit-identical to the GraphModule's (tests/test_compiled.py):
the same kernels on the same integers, and the same float arithmetic around them, except an
activation within float rounding of a half step (about 5 in a million): the GraphModule's
quantize multiplies by ``1 / scale`` in torch's one-pass quantize, the traced one divides.

**Saturating CPUs.** Where oneDNN's int8 kernels saturate (x86 without VNNI,
``kernels/x86.py``), each 8-bit layer takes the exact float32 path, which cannot be compiled yet
(it reads the packed weight's values): there compiling refuses 8-bit layers, naming
``reduce_range=True`` (7-bit activations, one int8 call, compiled) as the way out. Which path a
layer takes is fixed when the package is compiled. A package compiled where nothing saturates carries a guard
in its graph — the probe of ``kernels.x86`` (a 1x64 GEMM of 255 x 127 products) run on every
call and checked with ``aten._assert_async`` — so that on a saturating CPU it refuses to run,
with a message naming the way out, whether it is loaded by :func:`load_package`, by
``torch._inductor.aoti_load_package`` or from C++. A package compiled on a saturating CPU holds
7-bit layers only, which are exact everywhere.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch._C import DispatchKey
from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2
from torch.library import register_fake

from graphquant.deploy import program
from graphquant.errors import GraphQuantError, where
from graphquant.graph import example_shape, get_attr_value, module_path, named_args
from graphquant.inputs import InputCheck
from graphquant.kernels import x86
from graphquant.kernels.onednn import onednn_dilation
from graphquant.runtimes import kernel_call

PACKAGE_MANIFEST = "graphquant/manifest.json"  # inside the package zip, beside AOTInductor's files
PACKAGE_FORMAT, PACKAGE_VERSION = "graphquant.aoti", 1
SATURATION_MESSAGE = (
    "graphquant: this package was compiled on a CPU whose int8 kernels do not saturate, and this CPU's do "
    "(x86 without VNNI, or ONEDNN_MAX_CPU_ISA set): its 8-bit layers would give wrong answers here. "
    "Compile the package on this kind of CPU (graphquant.save(qmodel, path, package='aoti') here), or save "
    "the model as a .pt2 program (graphquant.save), which chooses the exact path when it loads"
)


# ---------------------------------------------------------------------------------------------
# shapes of oneDNN's weight packing, for tracing: the packed weight's logical shape, which is
# what onednn::qconv_pointwise's and qlinear_pointwise's meta functions read (torch registers
# none: Inductor inserts and folds these ops after tracing, graphquant traces them)


@register_fake("onednn::qconv_prepack")
def _qconv_prepack_fake(w, w_scale, x_scale, x_zero_point, stride, padding, dilation, groups, x_shape=None):  # type: ignore[no-untyped-def]  # noqa: E501
    return w.new_empty((*w.shape[:2], 1, w.shape[2])) if w.dim() == 3 else torch.empty_like(w)  # conv1d packs as 2-d


@register_fake("onednn::qlinear_prepack")
def _qlinear_prepack_fake(w, x_shape=None):  # type: ignore[no-untyped-def]
    return w.new_empty((w.shape[1], w.shape[0]))  # stored transposed, (in, out)


# qconv2d_pointwise.binary writes into its accum, so export wraps it in auto_functionalized_v2, which
# torch lets fall through autograd for CPU and CUDA tensors only; Inductor's freezing propagates
# fake tensors through it with the packed (mkldnn) weight, whose autograd key is AutogradOther
auto_functionalized_v2.fallthrough(DispatchKey.AutogradOther)


# ---------------------------------------------------------------------------------------------
# the expansion: graphquant op -> the aten / onednn calls of its kernel


def _saturation_guard(probe_w: Tensor) -> None:
    """Refuse to run where oneDNN's int8 conv saturates (:data:`SATURATION_MESSAGE`): the 1x1 conv
    probe of ``kernels.x86.probe_saturates`` (64 channels of 255 x 127 products) in the graph. Its
    activation is built on each call (``torch.full``: Inductor folds no constructors), its weight
    is a folded packed constant. A conv, not the GEMM probe: a linear weight packed on a VNNI CPU
    runs on an AVX2 CPU in oneDNN's reference kernel, which does not saturate, while a packed conv
    weight is reordered for the AVX2 kernel, which does (seen with ONEDNN_VERBOSE)."""
    x = torch.full([1, 64, 4, 4], 255, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    y = torch.ops.onednn.qconv_pointwise(x, 1.0, 0, probe_w, torch.ones(8), torch.zeros(8, dtype=torch.int64), None,
                                         [1, 1], [0, 0], [1, 1], 1, 1.0, 0, torch.float32, "none", [], "")
    torch._assert_async((y - 2072640.0).abs().max() <= 0.5, SATURATION_MESSAGE)  # 64 * 255 * 127


def _prepack_node(gm: fx.GraphModule, node: fx.Node, w: fx.Node, pack: str) -> fx.Node:
    """``onednn::qconv_prepack`` / ``qlinear_prepack`` of the int8 buffer ``w``, with the
    arguments the kernel node carries (as :func:`graphquant.program.load` packs it)."""
    graph = gm.graph
    if pack == "pack_linear":
        return graph.call_function(torch.ops.onednn.qlinear_prepack.default, (w, None))
    named = named_args(node)
    weight = get_attr_value(gm, w)
    hint = example_shape(named["x"]) if weight.dim() == 4 else None  # pack_conv's layout hint, 2-d convs
    dilation = onednn_dilation(weight, list(named["dilation"]))
    return graph.call_function(torch.ops.onednn.qconv_prepack.default, (
        w, named["w_scale"], float(named["x_scale"]), int(named["x_zero_point"]), list(named["stride"]),
        list(named["padding"]), dilation, int(named["groups"]), None if hint is None else [int(s) for s in hint],
    ))


def expanded_graph_module(qmodel: nn.Module) -> tuple[fx.GraphModule, dict[str, Any]]:
    """The quantized graph with every ``graphquant::`` op expanded into aten and ``onednn::`` ops
    (module docstring), and its manifest. Shares the model's tensors."""
    gm = program.graph_module(qmodel)
    data = program.manifest(gm)
    packed_weights: dict[str, str] = data["packed_weights"]
    expanded = program.exportable_graph_module(gm)
    graph = expanded.graph
    guard = False
    for call in map(kernel_call, list(graph.nodes)):  # each read when reached: earlier expansions replace its inputs
        if call is None:
            continue
        node, kernel = call.node, call.kernel
        weight = call.weight if call.weight is not None and str(call.weight.target) in packed_weights else None
        args = list(call.args)
        if kernel.gemm:  # its body takes packed and saturates (kernels/registry.py); portable weights never saturate
            x_qmax = int(call.named.get("x_qmax", 255))
            saturates = weight is not None and x86.saturates(call.depthwise(expanded))
            if saturates and x_qmax > 127:
                raise GraphQuantError(
                    f"graphquant: {where(module_path(node), node.name)}: this CPU's int8 kernels saturate (x86 "
                    "without VNNI, or ONEDNN_MAX_CPU_ISA set), so this layer's 8-bit activations run here as the "
                    "exact float32 op over the integers, a path graphquant.compile cannot compile yet. Quantize with "
                    "graphquant.get_default_qconfig('x86', reduce_range=True) (7-bit activations: one int8 call, "
                    "compiled), compile on a CPU with VNNI, or run the GraphModule or graphquant.to_torchscript here"
                )
            # a 7-bit activation (reduce_range) never saturates: only 8-bit layers need the guard
            guard = guard or (weight is not None and not saturates and x_qmax > 127)
            args += [weight is not None, saturates]
        with graph.inserting_before(node):
            if weight is not None:
                args[kernel.argument_names.index("w")] = _prepack_node(expanded, node, weight,
                                                                       packed_weights[str(weight.target)])
            expansion = graph.call_function(kernel.torchscript, tuple(args))
        expansion.meta.update(node.meta)
        node.replace_all_uses_with(expansion)
        graph.erase_node(node)
    if guard:
        expanded.register_buffer("graphquant_saturation_probe", torch.full([8, 64, 1, 1], 127, dtype=torch.int8))
        expanded.register_buffer("graphquant_saturation_probe_scale", torch.ones(8))
        with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
            probe_w = graph.get_attr("graphquant_saturation_probe")
            probe_scale = graph.get_attr("graphquant_saturation_probe_scale")
            packed_probe = graph.call_function(torch.ops.onednn.qconv_prepack.default, (
                probe_w, probe_scale, 1.0, 0, [1, 1], [0, 0], [1, 1], 1, [1, 64, 4, 4]))
            graph.call_function(_saturation_guard, (packed_probe,))
    graph.lint()
    expanded.recompile()
    data["compiled"] = {"guarded": guard, **compiled_for()}
    return expanded, data


def compiled_for() -> dict[str, Any]:
    """What the package's kernel choices depend on: whether this process's oneDNN saturates
    (GEMM and depthwise conv), the CPU, torch's version."""
    return {"saturates": x86.saturates(), "saturates_depthwise": x86.saturates(True),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "processor": _cpu_name(),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""), "torch": torch.__version__}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ---------------------------------------------------------------------------------------------
# the package


def save_package(qmodel: nn.Module, path: str | os.PathLike[str], *,
                 inductor_configs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``qmodel`` as an AOTInductor package (``torch._inductor.aoti_compile_and_package``):
    a shared library of the expanded, frozen graph with its weights, and the manifest inside it
    (``graphquant/manifest.json``) and beside it (``model.pt2`` -> ``model.manifest.json``).

    It loads with :func:`load_package`, with ``torch._inductor.aoti_load_package`` in a process
    that never imports graphquant, and from C++ with ``torch::inductor::AOTIModelPackageLoader``
    (docs/compiled.md). Returns the manifest, with the seconds compiling took
    (``data["compiled"]["seconds"]``). ``inductor_configs``: Inductor options beside freezing,
    which is always on (the packing folds into constants), e.g. ``{"cpp.enable_kernel_profile": True}``
    to see each generated loop in torch.profiler (benchmarks/compiled_profile.py).
    """
    program.check_writable(path)
    program.check_writable(program.manifest_path(path), "the manifest")
    expanded, data = expanded_graph_module(qmodel)
    start = time.perf_counter()
    exported = program.export_graph(expanded, data["inputs"])
    try:
        with torch.no_grad(), warnings.catch_warnings():  # Inductor freezes (folds the packing) without autograd
            warnings.simplefilter("ignore")
            torch._inductor.aoti_compile_and_package(
                exported, package_path=os.fspath(path), inductor_configs={**(inductor_configs or {}), "freezing": True}
            )
    except Exception as error:
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise GraphQuantError(f"graphquant: AOTInductor could not compile the quantized graph: {first}") from error
    data["format"], data["version"] = PACKAGE_FORMAT, PACKAGE_VERSION
    data["compiled"]["seconds"] = round(time.perf_counter() - start, 2)
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(_inside(archive) + PACKAGE_MANIFEST, text)
    with open(program.manifest_path(path), "w", encoding="utf-8") as f:
        f.write(text)
    return data


def _inside(archive: zipfile.ZipFile) -> str:
    """The folder every entry of a torch zip archive sits in (``model/``)."""
    names = archive.namelist()
    return names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ""


def is_package(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a package written by :func:`save_package`."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return _inside(archive) + PACKAGE_MANIFEST in archive.namelist()


def read_package_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest inside a package written by :func:`save_package`."""
    try:
        with zipfile.ZipFile(path) as archive:
            text = archive.read(_inside(archive) + PACKAGE_MANIFEST).decode("utf-8")
    except (OSError, KeyError, zipfile.BadZipFile) as error:
        raise GraphQuantError(
            f"graphquant: {os.fspath(path)} is not an AOTInductor package written by graphquant.save(..., "
            f"package='aoti') ({error})"
        ) from error
    data = json.loads(text)
    if data.get("format") != PACKAGE_FORMAT or data.get("version") != PACKAGE_VERSION:
        raise GraphQuantError(f"graphquant: {os.fspath(path)} has package format {data.get('format')} version "
                              f"{data.get('version')}; this graphquant reads {PACKAGE_FORMAT} "
                              f"{PACKAGE_VERSION}")
    return data


def check_runs_here(data: dict[str, Any], path: str) -> None:
    """Refuse a package whose kernel choices would saturate on this CPU (:data:`SATURATION_MESSAGE`)."""
    made = data.get("compiled", {})
    if made.get("guarded") and x86.saturates():
        raise GraphQuantError(f"{SATURATION_MESSAGE} (package {path}, compiled on {made.get('processor')})")


class CompiledModel(nn.Module):
    """A quantized model run by its AOTInductor package: the input check graphquant's graphs make
    (names the input, what was captured and what came), then one call into generated C++."""

    def __init__(self, runner: Callable[..., Any], data: dict[str, Any], path: str) -> None:
        super().__init__()
        self.runner, self.graphquant_manifest, self.path = runner, data, path
        self.check = InputCheck(program.manifest_specs(data["inputs"], []))

    def forward(self, *inputs: Any) -> Any:
        self.check(*inputs)
        return self.runner(*inputs)

    def extra_repr(self) -> str:
        made = self.graphquant_manifest["compiled"]
        return f"package={self.path!r}, compiled in {made.get('seconds')} s on {made.get('processor')}"


def load_package(path: str | os.PathLike[str]) -> CompiledModel:
    """A package written by :func:`save_package`, refused where its kernels would saturate."""
    data = read_package_manifest(path)
    check_runs_here(data, os.fspath(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = torch._inductor.aoti_load_package(os.fspath(path))
    return CompiledModel(runner, data, os.fspath(path))


def compile(qmodel: nn.Module) -> CompiledModel:  # noqa: A001  (graphquant.compile, as torch.compile)
    """``qmodel`` compiled by Inductor into an AOTInductor package and loaded: no Python per op,
    any batch size where the model was captured with a dynamic batch, outputs bit-identical to
    ``qmodel``'s but where an activation lies within float rounding of a half step (about 5 in a
    million values go one step the other way; docs/compiled.md). Compiling takes seconds to
    minutes (a C++ compiler runs); the package is a temporary file — write one to keep with
    ``graphquant.save(qmodel, path, package="aoti")``."""
    folder = tempfile.mkdtemp(prefix="graphquant-aoti-")
    path = os.path.join(folder, "model.pt2")
    save_package(qmodel, path)
    return load_package(path)
