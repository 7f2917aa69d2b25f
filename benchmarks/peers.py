"""Every quantizer the benchmark compares, each as a builder from a float workload to a callable.

A builder returns a :class:`Variant` (the quantized model's call, its serialized size, the
time it took to quantize and the time of its first call) or raises :class:`Unsupported`
when the peer cannot take the model (the report keeps the reason). Recipes are each
peer's documented default for x86:

- ``torch.ao`` TorchScript graph mode: ``torch.jit.trace`` then ``quantize_jit`` with
  ``get_default_qconfig("x86")`` / ``quantize_dynamic_jit`` with ``default_dynamic_qconfig``;
- ``torch.ao`` FX: ``prepare_fx``/``convert_fx`` with ``get_default_qconfig_mapping("x86")``
  (dynamic: ``default_dynamic_qconfig``); eager ``quantize_dynamic`` on ``nn.Linear``;
- torchao PT2E: ``torch.export`` -> ``prepare_pt2e``/``convert_pt2e`` with
  ``X86InductorQuantizer`` (default config; dynamic: ``is_dynamic=True``) -> ``torch.compile``
  with inductor freezing, as the torchao tutorial does;
- ONNX Runtime: ``torch.onnx.export`` (dynamo) then ``quantize_static`` (QDQ, per-channel int8
  weights, uint8 activations, MinMax calibration) or ``quantize_dynamic`` (int8 weights);
- graphquant: ``graphquant.quantize`` with ``get_default_qconfig("x86")`` on the whole model
  (dynamic: the per-tensor default and the per-token preset), oneDNN kernels; on encoders also
  the linears-only recipe (``qconfig_dict_by_type(model, {nn.Linear: qconfig})``, what PT2E's
  x86 quantizer quantizes) and that recipe with the FFN output projections float. Each runs as
  the returned ``GraphModule`` and as ``graphquant.to_torchscript`` of it (same numbers, no
  Python per op).

Every static quantizer calibrates on the same batches; quantize time is the wall time from
the float model to the quantized one, calibration included, first call excluded.
"""

from __future__ import annotations

import copy
import io
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from timing import quiet_native_stderr
from workloads import Inputs, Workload


class Unsupported(Exception):
    """The peer cannot quantize this model; the message says why."""


@dataclass
class Variant:
    name: str
    call: Callable[[Inputs], torch.Tensor]
    size_bytes: int | None
    quantize_s: float | None
    first_call_s: float | None
    peer: bool = True  # False for fp32 and graphquant
    # the call to time at another thread count, where the count is baked in at build (ONNX Runtime)
    at_threads: Callable[[int], Callable[[Inputs], torch.Tensor]] | None = None
    # a faster form that cannot share the process's cores while others are timed, so it is timed
    # alone after the interleaved rounds (ONNX Runtime with its spinning thread pool)
    alone: Callable[[int], Callable[[Inputs], torch.Tensor]] | None = None


def _state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _first_call(call: Callable[[Inputs], torch.Tensor], inputs: Inputs) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        call(inputs)
    return time.perf_counter() - start


def _calibrate(model: Callable[..., object], batches: list[Inputs]) -> None:
    with torch.no_grad():
        for batch in batches:
            model(*batch)


def fp32(w: Workload, mode: str, threads: int) -> Variant:
    return Variant("fp32 eager", lambda x: w.model(*x), _state_dict_bytes(w.model), None, None, peer=False)


# (mode, recipe) -> (quantized graph, quantize seconds) for the workload being measured: the
# TorchScript variant is written from the graph the plain variant built, not quantized a second
# time. Cleared per workload (forget_quantized): an id() key could be reused by the next workload.
_QUANTIZED: dict[tuple[str, str], tuple[nn.Module, float]] = {}


def forget_quantized() -> None:
    """Drop the graphs quantized for the last workload (and the memory they hold)."""
    _QUANTIZED.clear()


def _ffn_outputs(model: nn.Module) -> list[str]:
    """BERT-style FFN output projections (``layer.N.output.dense``), whose inputs carry the outliers."""
    return [n for n, _ in model.named_modules() if n.endswith(".output.dense") and ".attention." not in n]


def _qconfig_dict(w: Workload, recipe: str) -> dict[str, object]:
    import graphquant as gq

    if recipe == "linears":  # int8 linears, everything else float: what PT2E's x86 quantizer does
        return gq.qconfig_dict_by_type(w.model, {nn.Linear: gq.default_qconfig})
    if recipe == "linears_ffn_float":
        return gq.qconfig_dict_by_type(w.model, {nn.Linear: gq.default_qconfig}, keep_float=_ffn_outputs(w.model))
    if recipe == "reduce_range":  # 7-bit activations: one int8 call per layer on x86 CPUs without VNNI
        return {"": gq.get_default_qconfig("x86", reduce_range=True)}
    if recipe == "dynamic_reduce_range":
        return {"": gq.get_default_dynamic_qconfig(reduce_range=True)}
    if recipe == "per_token_reduce_range":
        return {"": gq.get_default_dynamic_qconfig(per_token=True, reduce_range=True)}
    if recipe in ("linears_smoothquant", "linears_smoothquant_gelu"):  # alpha searched per group
        smooth = gq.SmoothQuant("auto", fused_activations=recipe.endswith("gelu"))
        return gq.qconfig_dict_by_type(w.model, {nn.Linear: gq.QConfig(smoothquant=smooth)})
    if recipe == "linears_reduce_range":
        return gq.qconfig_dict_by_type(w.model, {nn.Linear: gq.get_default_qconfig("x86", reduce_range=True)})
    return {"": getattr(gq, recipe)}


def _graphquant(w: Workload, mode: str, recipe: str, label: str, torchscript: bool = False,
                compiled: bool = False) -> Variant:
    import graphquant as gq

    key = (mode, recipe)
    if key not in _QUANTIZED:
        qconfig_dict = _qconfig_dict(w, recipe)
        start = time.perf_counter()
        if mode == "static":
            q = gq.quantize(w.model, qconfig_dict, _calibrate, [w.calibration], example_inputs=w.calibration[0])
        else:
            q = gq.quantize_dynamic(w.model, qconfig_dict, example_inputs=w.calibration[0])
        _QUANTIZED[key] = (q, time.perf_counter() - start)
    q, quantize_s = _QUANTIZED[key]
    if compiled:  # the AOTInductor package; its compile time counts as first call, as PT2E's torch.compile does
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.pt2"
            gq.save(q, path, package="aoti")
            size = path.stat().st_size
            package = gq.load(path)
        compile_s = time.perf_counter() - start
        first = compile_s + _first_call(lambda x: package(*x), w.timed)
        return Variant(f"{label} (AOTI)", lambda x: package(*x), size, quantize_s, first, peer=False)
    if torchscript:
        start = time.perf_counter()
        scripted = gq.to_torchscript(q)
        quantize_s += time.perf_counter() - start
        first = _first_call(lambda x: scripted(*x), w.timed)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        return Variant(f"{label} (TorchScript)", lambda x: scripted(*x), buffer.tell(), quantize_s, first, peer=False)
    first = _first_call(lambda x: q(*x), w.timed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt2"
        gq.save(q, path)
        size = path.stat().st_size
    return Variant(label, lambda x: q(*x), size, quantize_s, first, peer=False)


def _graphquant_builder(recipe: str, label: str, torchscript: bool = False, encoders_only: bool = False,  # type: ignore[no-untyped-def]
                        compiled: bool = False):
    def build(w: Workload, mode: str, threads: int) -> Variant:
        if encoders_only and w.kind != "encoder":
            raise Unsupported("a transformer recipe")
        return _graphquant(w, mode, recipe, label, torchscript, compiled)

    return build


def quantize_jit(w: Workload, mode: str, threads: int) -> Variant:
    from torch.ao.quantization import default_dynamic_qconfig, get_default_qconfig
    from torch.ao.quantization import quantize_dynamic_jit as ao_quantize_dynamic_jit
    from torch.ao.quantization import quantize_jit as ao_quantize_jit

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings(), quiet_native_stderr():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        traced = torch.jit.trace(copy.deepcopy(w.model), w.calibration[0], strict=False)
        if mode == "static":
            q = ao_quantize_jit(traced, {"": get_default_qconfig("x86")}, _calibrate, [w.calibration])
        else:
            q = ao_quantize_dynamic_jit(traced, {"": default_dynamic_qconfig})
        quantize_s = time.perf_counter() - start
        first = _first_call(lambda x: q(*x), w.timed)
        buffer = io.BytesIO()
        torch.jit.save(q, buffer)
    return Variant("quantize_jit" if mode == "static" else "quantize_dynamic_jit", lambda x: q(*x),
                   buffer.tell(), quantize_s, first)


def quantize_fx(w: Workload, mode: str, threads: int) -> Variant:
    from torch.ao.quantization import QConfigMapping, default_dynamic_qconfig, get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings(), quiet_native_stderr():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        mapping = (get_default_qconfig_mapping("x86") if mode == "static"
                   else QConfigMapping().set_global(default_dynamic_qconfig))
        try:
            prepared = prepare_fx(copy.deepcopy(w.model), mapping, w.calibration[0])
        except Exception as error:  # HF models read shapes as Python ints: symbolic tracing fails
            raise Unsupported(f"torch.fx cannot trace it ({type(error).__name__}: {str(error).splitlines()[0][:90]})")
        if mode == "static":
            _calibrate(prepared, w.calibration)
        q = convert_fx(prepared)
        quantize_s = time.perf_counter() - start
        first = _first_call(lambda x: q(*x), w.timed)
    return Variant("quantize_fx", lambda x: q(*x), _state_dict_bytes(q), quantize_s, first)


def eager_quantize_dynamic(w: Workload, mode: str, threads: int) -> Variant:
    from torch.ao.quantization import quantize_dynamic

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings(), quiet_native_stderr():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        q = quantize_dynamic(copy.deepcopy(w.model), {nn.Linear}, dtype=torch.qint8)
        quantize_s = time.perf_counter() - start
        first = _first_call(lambda x: q(*x), w.timed)
    return Variant("eager quantize_dynamic", lambda x: q(*x), _state_dict_bytes(q), quantize_s, first)


def pt2e(w: Workload, mode: str, threads: int, reduce_range: bool = False) -> Variant:
    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    inductor_config.freezing = True
    with warnings.catch_warnings(), quiet_native_stderr():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        exported = torch.export.export(copy.deepcopy(w.model), w.calibration[0]).module()
        quantizer = X86InductorQuantizer()
        quantizer.set_global(get_default_x86_inductor_quantization_config(is_dynamic=mode == "dynamic",
                                                                          reduce_range=reduce_range))
        prepared = prepare_pt2e(exported, quantizer)
        _calibrate(prepared, w.calibration if mode == "static" else w.calibration[:1])
        converted = convert_pt2e(prepared)
        size = _state_dict_bytes(converted)
        compiled = torch.compile(converted)
        quantize_s = time.perf_counter() - start
        first = _first_call(lambda x: compiled(*x), w.timed)  # the compile happens here
    label = "PT2E + inductor" + (" (reduce_range)" if reduce_range else "")
    return Variant(label, lambda x: compiled(*x), size, quantize_s, first)


def pt2e_reduce_range(w: Workload, mode: str, threads: int) -> Variant:
    """PT2E with torchao's ``reduce_range=True`` (7-bit activations), its setting for CPUs without VNNI."""
    return pt2e(w, mode, threads, reduce_range=True)


def _onnx_export(w: Workload, path: Path) -> list[str]:
    names = ["pixel_values"] if w.kind == "cnn" else ["input_ids", "attention_mask"]
    with warnings.catch_warnings(), quiet_native_stderr():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(w.model), w.calibration[0], str(path), input_names=names,
                          output_names=["output"], dynamo=True, verbose=False)
    return names


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over our calibration batches."""

    def __init__(self, names: list[str], batches: list[Inputs]) -> None:
        self._feeds = iter([{n: t.numpy() for n, t in zip(names, batch)} for batch in batches])

    def get_next(self) -> dict[str, object] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # pragma: no cover - not used by MinMax
        pass

    def __iter__(self):  # type: ignore[no-untyped-def]  # how ONNX Runtime's SmoothQuant reads a (copied) reader
        return iter(self._feeds)


def _activation_matmuls(path: Path) -> list[str]:
    """The MatMul nodes of an ONNX model whose operands are both computed (no initializer)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not weights.intersection(n.input)]


def onnxruntime_matmul_peer(w: Workload, mode: str, threads: int, calibrate_method: str = "MinMax",
                            smoothquant: bool = False, weights_only: bool = False) -> Variant:
    """ONNX Runtime static with only MatMul/Gemm quantized: its recipe for transformers (quantizing
    every op gives MiniLM a cosine of 0.32). ``calibrate_method`` is one of its ``CalibrationMethod``
    names (MinMax, Entropy, Percentile: its defaults, 128 bins and the 99.999th percentile);
    ``smoothquant`` its SmoothQuant (alpha 0.5, folded), which needs Intel Neural Compressor 2.x;
    ``weights_only``: what PT2E's x86 recipe quantizes — the MatMuls with a weight (the linears; the
    attention's two activation MatMuls excluded by name: its ``MatMulConstBOnly`` option is read only
    in QOperator format), their inputs and weights but not their outputs
    (``OpTypesToExcludeOutputQuantization``: by default ONNX Runtime also rounds each MatMul's output
    to uint8 before the bias add, which costs MiniLM 7 dB)."""
    if w.kind != "encoder" or mode != "static":
        raise Unsupported("a static transformer recipe")
    if smoothquant:
        try:
            import neural_compressor.adaptor.ox_utils.smooth_quant  # noqa: F401
        except ImportError as error:
            raise Unsupported(f"ONNX Runtime's SmoothQuant needs neural-compressor 2.x ({error})") from None
    return onnxruntime_peer(w, mode, threads, op_types=["MatMul", "Gemm"], calibrate_method=calibrate_method,
                            smoothquant=smoothquant, weights_only=weights_only)


def onnxruntime_peer(w: Workload, mode: str, threads: int, op_types: list[str] | None = None,
                     calibrate_method: str = "MinMax", smoothquant: bool = False,
                     weights_only: bool = False) -> Variant:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    tmp = Path(tempfile.mkdtemp(prefix="graphquant-bench-"))
    start = time.perf_counter()
    float_path, q_path = tmp / "float.onnx", tmp / "int8.onnx"
    names = _onnx_export(w, float_path)
    with quiet_native_stderr():
        if mode == "static":
            reader = _Reader(names, w.calibration)
            extra_options = {"SmoothQuant": smoothquant,
                             "OpTypesToExcludeOutputQuantization": ["MatMul"] if weights_only else []}
            CalibrationDataReader.register(_Reader)
            ort_quantize_static(str(float_path), str(q_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                op_types_to_quantize=op_types, calibrate_method=CalibrationMethod[calibrate_method],
                                nodes_to_exclude=_activation_matmuls(float_path) if weights_only else None,
                                extra_options=extra_options)
        else:
            ort_quantize_dynamic(str(float_path), str(q_path), weight_type=QuantType.QInt8)

    def at_threads(count: int, spinning: bool = False) -> Callable[[Inputs], torch.Tensor]:
        options = ort.SessionOptions()
        # ONNX Runtime's idle workers spin after each run, for longer than a 30 ms pause between
        # calls: interleaved with it, every PyTorch variant at 2 threads took about twice its time
        # (MiniLM b1: graphquant 9.2 -> 17.0 ms, PT2E 9.5 -> 18.3 ms). The interleaved session does
        # not spin; the spinning one, faster on its own (MiniLM b1 11.8 vs 16.1 ms), is timed alone.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.intra_op_num_threads = count
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(q_path), options, providers=["CPUExecutionProvider"])

        def call(x: Inputs) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {n: t.numpy() for n, t in zip(names, x)})[0])

        return call

    call = at_threads(threads)
    quantize_s = time.perf_counter() - start
    first = _first_call(call, w.timed)
    size = sum(p.stat().st_size for p in tmp.iterdir() if p.name.startswith("int8"))
    label = f"ONNX Runtime {mode}" + (", linears (as PT2E)" if weights_only else ", MatMul only" if op_types else "")
    if calibrate_method != "MinMax":
        label += f", {calibrate_method}"
    if smoothquant:
        label += ", SmoothQuant"
    return Variant(label, call, size, quantize_s, first, at_threads=at_threads,
                   alone=lambda count: at_threads(count, spinning=True))


# mode -> (name, builder); fp32 first (the baseline), graphquant next
BUILDERS: dict[str, list[tuple[str, Callable[[Workload, str, int], Variant]]]] = {
    "static": [
        ("fp32", fp32),
        ("graphquant", _graphquant_builder("default_qconfig", "graphquant")),
        ("graphquant_ts", _graphquant_builder("default_qconfig", "graphquant", torchscript=True)),
        ("graphquant_aoti", _graphquant_builder("default_qconfig", "graphquant", compiled=True)),
        ("graphquant_linears", _graphquant_builder("linears", "graphquant linears", encoders_only=True)),
        ("graphquant_linears_ts", _graphquant_builder("linears", "graphquant linears", True, encoders_only=True)),
        ("graphquant_linears_aoti", _graphquant_builder("linears", "graphquant linears", encoders_only=True,
                                                        compiled=True)),
        ("graphquant_linears_ffn_float", _graphquant_builder("linears_ffn_float", "graphquant linears, FFN-out fp32",
                                                             True, encoders_only=True)),
        ("graphquant_7bit", _graphquant_builder("reduce_range", "graphquant 7-bit")),
        ("graphquant_7bit_ts", _graphquant_builder("reduce_range", "graphquant 7-bit", torchscript=True)),
        ("graphquant_linears_7bit_ts", _graphquant_builder("linears_reduce_range", "graphquant linears 7-bit", True,
                                                           encoders_only=True)),
        ("graphquant_linears_smoothquant_ts", _graphquant_builder("linears_smoothquant",
                                                                  "graphquant linears, SmoothQuant", True,
                                                                  encoders_only=True)),
        ("graphquant_linears_smoothquant_gelu_ts", _graphquant_builder("linears_smoothquant_gelu",
                                                                       "graphquant linears, SmoothQuant + GELUs",
                                                                       True, encoders_only=True)),
        ("quantize_jit", quantize_jit), ("quantize_fx", quantize_fx), ("pt2e", pt2e),
        ("pt2e_reduce_range", pt2e_reduce_range), ("onnxruntime", onnxruntime_peer),
        ("onnxruntime_matmul", onnxruntime_matmul_peer),
        ("onnxruntime_linears", lambda w, mode, threads: onnxruntime_matmul_peer(w, mode, threads, weights_only=True)),
    ],
    "dynamic": [
        ("fp32", fp32),
        ("graphquant", _graphquant_builder("default_dynamic_qconfig", "graphquant")),
        ("graphquant_ts", _graphquant_builder("default_dynamic_qconfig", "graphquant", torchscript=True)),
        ("graphquant_per_token", _graphquant_builder("per_token_dynamic_qconfig", "graphquant per-token")),
        ("graphquant_per_token_ts", _graphquant_builder("per_token_dynamic_qconfig", "graphquant per-token", True)),
        ("graphquant_aoti", _graphquant_builder("default_dynamic_qconfig", "graphquant", compiled=True)),
        ("graphquant_per_token_aoti", _graphquant_builder("per_token_dynamic_qconfig", "graphquant per-token",
                                                          compiled=True)),
        ("graphquant_7bit_ts", _graphquant_builder("dynamic_reduce_range", "graphquant 7-bit", True)),
        ("graphquant_per_token_7bit_ts", _graphquant_builder("per_token_reduce_range", "graphquant per-token 7-bit",
                                                             True)),
        ("quantize_jit", quantize_jit), ("quantize_fx", quantize_fx), ("eager", eager_quantize_dynamic),
        ("pt2e", pt2e), ("pt2e_reduce_range", pt2e_reduce_range), ("onnxruntime", onnxruntime_peer),
    ],
}


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
