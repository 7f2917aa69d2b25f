"""Each int8 GEMM / conv kernel of a quantized model against the float32 op it replaced, on this CPU.

An int8 layer is worth keeping only where its kernel beats float32. On x86 CPUs with VNNI it
almost always does; without VNNI (kernels/x86.py) an 8-bit layer runs exact at about fp32 speed,
and a small layer's conversions can cost more than the GEMM saves. :func:`time_kernels` runs the
quantized model once on the given inputs, records what every int8 GEMM / conv kernel received,
then times each kernel alone on those inputs and the float32 op of the same shapes (conv or
linear, bias, post-op, residual add), interleaved, median of ``rounds`` calls. The result goes
into the model's report (``print(graphquant.report(qmodel))``) and ``graphquant explain --time``
turns the layers that lose into a ``qconfig_dict`` that keeps them float.

What is timed is the kernel call, not its neighbours: an int8 layer between int8 layers needs no
quantize or dequantize of its own, one at a float border does (the report's float lines say where).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from graphquant.errors import GraphQuantError
from graphquant.graph import MATCH
from graphquant.kernels import registry, x86
from graphquant.quantized import find_record
from graphquant.report import KernelTiming


class _Recorder(fx.Interpreter):
    """Runs the kernel graph, keeping each timed kernel's concrete arguments."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.calls: list[tuple[fx.Node, tuple[Any, ...], dict[str, Any]]] = []

    def run_node(self, n: fx.Node) -> Any:
        kernel = registry.kernel_of(n.target) if n.op == "call_function" else None
        if kernel is not None and kernel.timed:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            keep = tuple(a.clone() if isinstance(a, Tensor) and not a.is_mkldnn else a for a in args)
            self.calls.append((n, keep, dict(kwargs)))
        return super().run_node(n)


def _named(target: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for i, arg in enumerate(target._schema.arguments):
        if i < len(args):
            values[arg.name] = args[i]
        elif arg.name in kwargs:
            values[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
    return values


def _real_weight(w: Tensor, w_scale: Tensor, kernel: str, x: Tensor) -> Tensor:
    """The layer's float32 weight (int8 values times their scales), shaped as the float op takes it."""
    dense = (w.to_dense() if w.is_mkldnn else w).to(torch.float32)
    if kernel.startswith("qlinear"):
        dense = dense.t() if w.is_mkldnn else dense  # oneDNN stores a linear's weight (in, out)
        return (dense * w_scale.reshape(-1, 1)).contiguous()
    while dense.dim() > x.dim():  # a conv1d packed as 2-d
        dense = dense.squeeze(2)
    # axis 0: a conv's output channels; a transposed conv's input channels, (in, out / groups, *kernel)
    return dense * w_scale.reshape(-1, *[1] * (dense.dim() - 1))


def _real(x: Tensor, scale: float, zero_point: int) -> Tensor:
    return x if x.is_floating_point() else (x.to(torch.float32) - zero_point) * scale


def float_op(kernel: str, a: dict[str, Any]) -> Any:
    """The float32 call the kernel replaced (``a``: the kernel's arguments by schema name), on the
    real values of its inputs: the same shapes and layout, and, within quantization error, the
    same result as the kernel (tests/test_kernel_timing.py holds it to that)."""
    x: Tensor = a["x"]
    xf = _real(x, float(a.get("x_scale", 1.0)), int(a.get("x_zero_point", 0)))
    w = _real_weight(a["w"], a["w_scale"], kernel, x)
    bias = a.get("bias")
    post_op, post_op_args = str(a.get("post_op", "none")), [float(v) for v in a.get("post_op_args", [])]
    if kernel.startswith("qlinear"):
        return lambda: x86.post_op_float(F.linear(xf, w, bias), post_op, post_op_args)
    if kernel.startswith("qconv_transpose"):
        return lambda: x86.post_op_float(torch.convolution(xf, w, bias, a["stride"], a["padding"], a["dilation"], True,
                                                           a["output_padding"], a["groups"]), post_op,
                                         post_op_args)
    conv = (a["stride"], a["padding"], a["dilation"])
    if kernel.endswith("_add"):
        accum = _real(a["accum"], float(a["accum_scale"]), int(a["accum_zero_point"]))
        return lambda: x86.post_op_float(torch.convolution(xf, w, bias, *conv, False, [0], a["groups"]).add_(accum),
                                         post_op, [])
    return lambda: x86.post_op_float(torch.convolution(xf, w, bias, *conv, False, [0], a["groups"]), post_op,
                                     post_op_args)


def _median_ms(fns: list[Any], rounds: int) -> list[float]:
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


@dataclass
class KernelCall:
    """One int8 GEMM / conv kernel call of a model's run: its arguments by schema name."""

    node: str  # the float graph's node the kernel replaced (the report's node), else the kernel node
    module_path: str
    kernel: str
    cpu_path: str
    target: torch._ops.OpOverload
    args: dict[str, Any]

    def run(self) -> Any:
        return self.target(*self.args.values())


def kernel_calls(qmodel: fx.GraphModule, example_inputs: tuple[Any, ...]) -> list[KernelCall]:
    """Every int8 GEMM / conv kernel call one run of ``qmodel`` on ``example_inputs`` makes, with
    the arguments it got (a donated accum is not donated again: the calls can be repeated)."""
    recorder = _Recorder(qmodel)
    with torch.no_grad():
        recorder.run(*example_inputs)
    calls: list[KernelCall] = []
    for node, args, kwargs in recorder.calls:
        target: torch._ops.OpOverload = node.target  # type: ignore[assignment]
        kernel = target._opname
        named = _named(target, args, kwargs)
        if named.get("accum_donated"):
            named["accum_donated"] = False
        w = named["w"]
        depthwise = kernel.startswith("qconv") and x86.is_depthwise(w, int(named.get("groups", 1)))
        cpu_path = x86.cpu_path(int(named.get("x_qmax", 255)), depthwise) if w.is_mkldnn else ""
        match = node.meta.get(MATCH)
        calls.append(KernelCall(match.anchor.name if match is not None else node.name,
                                match.module_path if match is not None else "", kernel, cpu_path, target,
                                named))
    return calls


def time_kernels(qmodel: nn.Module, example_inputs: tuple[Any, ...], rounds: int = 20) -> list[KernelTiming]:
    """Each int8 GEMM / conv kernel of ``qmodel`` (a kernel graph from ``convert`` / ``quantize`` /
    ``graphquant.load``) timed alone on the inputs it gets from ``example_inputs``, against the
    float32 op of the same shapes; also kept in ``graphquant.report(qmodel)`` where it has one, so
    printing the report shows them. Keep the machine quiet while it runs (module docstring)."""
    if not isinstance(qmodel, fx.GraphModule):
        raise GraphQuantError(f"graphquant.time_kernels: wants the quantized GraphModule, got {type(qmodel).__name__}; "
                              "pass what graphquant.quantize / convert / load returned")
    if rounds < 1:
        raise GraphQuantError(f"graphquant.time_kernels: rounds must be at least 1, got {rounds}")
    timings: list[KernelTiming] = []
    with torch.no_grad():
        for call in kernel_calls(qmodel, example_inputs):
            int8_ms, float_ms = _median_ms([call.run, float_op(call.kernel, call.args)], rounds)
            timings.append(KernelTiming(call.node, call.module_path, call.kernel, call.cpu_path, int8_ms, float_ms))
    record = find_record(qmodel)
    if record is not None:
        record.report.timings = timings
    return timings
