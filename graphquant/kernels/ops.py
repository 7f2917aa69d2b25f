"""``torch.library`` schemas of the ops graphquant's lowered graphs call.

Activations travel as plain ``uint8`` tensors; scales and zero points are arguments.
Each weighted op dispatches on its weight: a packed oneDNN weight (``is_mkldnn``) runs
on :mod:`graphquant.kernels.onednn`, a plain ``int8`` weight on
:mod:`graphquant.kernels.portable`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.library import Library, register_fake

from graphquant.errors import GraphQuantError
from graphquant.kernels import dynamic, onednn, portable
from graphquant.quant_math import NATIVE_QUANTIZE, native_quantize, quantize_dynamic_tensor, quantize_tensor

LIB = Library("graphquant", "DEF")
_KEY = "CompositeExplicitAutograd"
# op name -> its Python kernel, which quantized GraphModules call directly (kernels/direct.py)
PYTHON_KERNELS: dict[str, Callable[..., Any]] = {}
# op name -> what makes a call site's plan for one input shape (kernels/direct.py), oneDNN weights only
PLANNERS: dict[str, Callable[..., Any]] = {"qconv2d": onednn.qconv_plan, "qlinear": onednn.qlinear_plan,
                                           "qconv2d_add": onednn.qconv_add_plan}
# the arguments a plan reads on each call (positions after the input): the residual accumulator
PLANNED_INPUTS: dict[str, tuple[int, ...]] = {"qconv2d_add": (onednn.QCONV_ADD_ACCUM,)}


def _impl(name: str, kernel: Any) -> None:
    LIB.impl(name, kernel, _KEY)
    PYTHON_KERNELS[name] = kernel


LIB.define("quantize_per_tensor(Tensor x, float scale, int zero_point, int qmin, int qmax, ScalarType dtype) -> Tensor")
LIB.define("dequantize_per_tensor(Tensor q, float scale, int zero_point) -> Tensor")
LIB.define(
    "quantize_per_channel(Tensor x, Tensor scale, Tensor zero_point, int axis, int qmin, int qmax, "
    "ScalarType dtype) -> Tensor"
)
LIB.define("dequantize_per_channel(Tensor q, Tensor scale, Tensor zero_point, int axis) -> Tensor")
# A post-op is a name and its scalars (kernels.portable.POST_OPS): "hardtanh", [0.0, 6.0].
_POST_OP = "str post_op, float[] post_op_args=[]"
# x_qmax: the largest value x can hold on its grid (127 for reduce_range's 7-bit activations). On
# x86 CPUs without VNNI a oneDNN GEMM or conv is exact in one call for x_qmax <= 127 and runs as the
# exact float32 op over the integer values above it (kernels/x86.py); other backends ignore it.
_X_QMAX = "int x_qmax=255"
_CONV_ARGS = (
    "(Tensor x, float x_scale, int x_zero_point, Tensor w, Tensor w_scale, Tensor? bias, int[] stride, "
    f"int[] padding, int[] dilation, int groups, float out_scale, int out_zero_point, {_POST_OP}, {_X_QMAX}) -> Tensor"
)
for _dim in (1, 2, 3):
    LIB.define(f"qconv{_dim}d{_CONV_ARGS}")
# float_out: the result is float32 (out_scale / out_zero_point unused), for a linear whose output
# only float ops read: one rounding fewer than quantizing it and dequantizing right after
LIB.define(
    "qlinear(Tensor x, float x_scale, int x_zero_point, Tensor w, Tensor w_scale, Tensor? bias, "
    f"float out_scale, int out_zero_point, str post_op, float[] post_op_args=[], bool float_out=False, {_X_QMAX}) "
    "-> Tensor"
)
# post_op(conv(x) + accum), accum a uint8 activation of the output's shape (ResNet's residual join).
# accum_donated: the graph never reads accum after this call (passes.fuse.donate_accumulators
# proves it at convert), so oneDNN may write the sum into it instead of into a copy.
for _dim in (1, 2):
    LIB.define(
        f"qconv{_dim}d_add(Tensor x, float x_scale, int x_zero_point, Tensor w, Tensor w_scale, Tensor? bias, "
        "int[] stride, int[] padding, int[] dilation, int groups, Tensor accum, float accum_scale, "
        f"int accum_zero_point, float out_scale, int out_zero_point, str post_op, bool accum_donated=False, {_X_QMAX}) "
        "-> Tensor"
    )
# weight (in, out / groups, *kernel), w_scale along its axis 0; argument order of aten.conv_transposeNd
for _dim in (1, 2, 3):
    LIB.define(
        f"qconv_transpose{_dim}d(Tensor x, float x_scale, int x_zero_point, Tensor w, Tensor w_scale, Tensor? bias, "
        "int[] stride, int[] padding, int[] output_padding, int groups, int[] dilation, float out_scale, "
        f"int out_zero_point, {_POST_OP}) -> Tensor"
    )


# Dynamic quantization: activation qparams from each batch.
# qmax: 255 (uint8 0..255 per tensor, int8 -128..127 per token) or 127 for reduce_range's 7-bit grid
# (0..127, -64..63): one exact int8 call on x86 CPUs without VNNI (kernels/x86.py)
# asymmetric (per token only): uint8 rows, each with its own scale and zero point (one-sided inputs)
LIB.define(
    "quantize_dynamic(Tensor x, bool per_token, int qmax=255, bool asymmetric=False) -> (Tensor, Tensor, Tensor)"
)
LIB.define("dequantize_dynamic(Tensor q, Tensor scale, Tensor zero_point) -> Tensor")
# post_op: an activation on the float32 result (the kernel graph folds a following relu / gelu in)
LIB.define(
    "qlinear_dynamic(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, bool per_token, str post_op=\"none\", "
    "float[] post_op_args=[], int x_qmax=255, bool asymmetric=False) -> Tensor"
)
LIB.define("linear_fp16(Tensor x, Tensor w, Tensor? bias) -> Tensor")


def _dequantize_dynamic(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q.to(torch.float32) - zero_point.to(torch.float32)) * scale


_impl("quantize_dynamic", quantize_dynamic_tensor)
_impl("dequantize_dynamic", _dequantize_dynamic)
_impl("qlinear_dynamic", dynamic.qlinear_dynamic)
_impl("linear_fp16", dynamic.linear_fp16)


@register_fake("graphquant::quantize_dynamic")
def _quantize_dynamic_fake(x, per_token, qmax=255, asymmetric=False):  # type: ignore[no-untyped-def]
    if per_token:
        return (torch.empty_like(x, dtype=torch.uint8 if asymmetric else torch.int8), x.new_empty((*x.shape[:-1], 1)),
                x.new_empty((*x.shape[:-1], 1), dtype=torch.int64))  # fmt: skip
    return torch.empty_like(x, dtype=torch.uint8), x.new_empty(()), x.new_empty((), dtype=torch.int64)


@register_fake("graphquant::dequantize_dynamic")
def _dequantize_dynamic_fake(q, scale, zero_point):  # type: ignore[no-untyped-def]
    return torch.empty(q.shape, dtype=torch.float32)


@register_fake("graphquant::qlinear_dynamic")
def _qlinear_dynamic_fake(x, w, w_scale, bias, per_token, post_op="none", post_op_args=(), x_qmax=255,  # type: ignore[no-untyped-def]  # noqa: E501
                          asymmetric=False):
    return x.new_empty((*x.shape[:-1], w_scale.shape[0]))


@register_fake("graphquant::linear_fp16")
def _linear_fp16_fake(x, w, bias):  # type: ignore[no-untyped-def]
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _axis_shape(ndim: int, axis: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = -1
    return shape


_INT_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


def _check_range(op: str, zero_point: int, qmin: int, qmax: int, dtype: torch.dtype) -> None:
    lo, hi = _INT_RANGES.get(dtype, (1, 0))
    if not lo <= qmin <= zero_point <= qmax <= hi:
        raise GraphQuantError(f"graphquant::{op}: wants {dtype} in [{lo}, {hi}] with qmin <= zero_point <= qmax, got "
                              f"qmin={qmin}, zero_point={zero_point}, qmax={qmax}")  # fmt: skip


def _check_scale(op: str, scale: float) -> None:
    if not 0.0 < scale < math.inf:  # NaN fails too; a zero scale divides by zero
        raise GraphQuantError(f"graphquant::{op}: scale must be positive and finite, got {scale}")


def quantize_per_tensor(
    x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int, dtype: torch.dtype
) -> torch.Tensor:
    # Python-number checks only: this runs on every call of a static model
    _check_scale("quantize_per_tensor", scale)
    _check_range("quantize_per_tensor", zero_point, qmin, qmax, dtype)
    if not x.is_floating_point():
        raise GraphQuantError(f"graphquant::quantize_per_tensor: input must be floating point, got {x.dtype}")
    if x.dtype != torch.float32 or x.numel() == 0:
        return quantize_tensor(x, scale, zero_point, qmin, qmax, dtype)
    return quantize_per_tensor_math(x, scale, zero_point, qmin, qmax, dtype)


def _quantize_per_tensor_rounded(
    x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int, dtype: torch.dtype
) -> torch.Tensor:
    return (x.to(torch.float32) / scale).round_().add_(zero_point).clamp_(qmin, qmax).to(dtype)


@torch.jit.unused
def _native_no_copy(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int,
                    dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    if torch.compiler.is_compiling():  # traced (graphquant.compiled): the arithmetic, the same integers
        return _quantize_per_tensor_rounded(x, scale, zero_point, qmin, qmax, dtype)
    return native_quantize(x, scale, zero_point, qmin, qmax, dtype)  # eager: the integers without a copy


def _quantize_per_tensor_native(
    x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int, dtype: torch.dtype
) -> torch.Tensor:
    if dtype != torch.uint8 and dtype != torch.int8:
        return _quantize_per_tensor_rounded(x, scale, zero_point, qmin, qmax, dtype)
    if not torch.jit.is_scripting():
        return _native_no_copy(x, scale, zero_point, qmin, qmax, dtype)
    qdtype = torch.quint8 if dtype == torch.uint8 else torch.qint8
    q = torch.quantize_per_tensor(x.to(torch.float32), scale, zero_point, qdtype).int_repr()
    full = (qmin, qmax) == (0, 255) if dtype == torch.uint8 else (qmin, qmax) == (-128, 127)
    return q if full else q.clamp_(qmin, qmax)


# A checked float32 tensor onto its grid: torch's one-pass quantize where it agrees with the math
# (quant_math.NATIVE_QUANTIZE). TorchScript-compatible: the TorchScript module runs this same function.
quantize_per_tensor_math = _quantize_per_tensor_native if NATIVE_QUANTIZE else _quantize_per_tensor_rounded


def dequantize_per_tensor(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    _check_scale("dequantize_per_tensor", scale)
    if q.dtype not in _INT_RANGES:
        raise GraphQuantError(f"graphquant::dequantize_per_tensor: input must be uint8 or int8, got {q.dtype}")
    return dequantize_per_tensor_math(q, scale, zero_point)


def dequantize_per_tensor_math(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """Integers back to real values. TorchScript-compatible (the TorchScript module runs it)."""
    # contiguous: int8 convs return channels-last, float code after the border may .view()
    return ((q.to(torch.float32) - zero_point) * scale).contiguous()


def _check_channels(op: str, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> None:
    """One scale and zero point per entry along ``axis`` (weights, in reference graphs: not a hot path)."""
    if not -x.dim() <= axis < x.dim():
        raise GraphQuantError(f"graphquant::{op}: axis {axis} is out of range for a {x.dim()}-d tensor")
    n = x.shape[axis]
    if scale.shape != (n,) or zero_point.shape != (n,) or not scale.is_floating_point():
        raise GraphQuantError(f"graphquant::{op}: wants {n} float scales and {n} zero points along axis {axis}, got "
                              f"{tuple(scale.shape)} {scale.dtype} and {tuple(zero_point.shape)}")  # fmt: skip
    if not bool(((scale > 0) & (scale < math.inf)).all()):
        raise GraphQuantError(f"graphquant::{op}: scales must be positive and finite")


def quantize_per_channel(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, qmin: int, qmax: int, dtype: torch.dtype
) -> torch.Tensor:
    _check_channels("quantize_per_channel", x, scale, zero_point, axis)
    lo, hi = _INT_RANGES.get(dtype, (1, 0))
    if not (x.is_floating_point() and lo <= qmin <= qmax <= hi):
        raise GraphQuantError(f"graphquant::quantize_per_channel: wants a float input and {dtype} in [{lo}, {hi}], "
                              f"got {x.dtype} [{qmin}, {qmax}]")  # fmt: skip
    return quantize_per_channel_math(x, scale, zero_point, axis, qmin, qmax, dtype)


def quantize_per_channel_math(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, qmin: int,
                              qmax: int, dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """A checked tensor onto per-channel grids along ``axis``. TorchScript-compatible."""
    shape = [1] * x.dim()
    shape[axis] = -1
    q = torch.round(x.to(torch.float32) / scale.reshape(shape)) + zero_point.reshape(shape)
    return torch.clamp(q, qmin, qmax).to(dtype)


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    _check_channels("dequantize_per_channel", q, scale, zero_point, axis)
    if q.dtype not in _INT_RANGES:
        raise GraphQuantError(f"graphquant::dequantize_per_channel: input must be uint8 or int8, got {q.dtype}")
    return dequantize_per_channel_math(q, scale, zero_point, axis)


def dequantize_per_channel_math(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                                axis: int) -> torch.Tensor:  # fmt: skip
    """Per-channel integers back to real values. TorchScript-compatible."""
    shape = [1] * q.dim()
    shape[axis] = -1
    return (q.to(torch.float32) - zero_point.reshape(shape).to(torch.float32)) * scale.reshape(shape)


def _on_weight_backend(kernel: str) -> Callable[..., torch.Tensor]:
    """The op's implementation: ``kernel`` of the backend its weight (argument 3) belongs to —
    a packed oneDNN weight (``is_mkldnn``) runs on oneDNN, a plain int8 weight on portable.
    The schema above fixes the arguments; this only forwards them."""

    def dispatch(*args: Any, **kwargs: Any) -> torch.Tensor:
        backend = onednn if args[3].is_mkldnn else portable
        return getattr(backend, kernel)(*args, **kwargs)

    dispatch.__name__ = kernel
    return dispatch


qconv = _on_weight_backend("qconv")
qconv_add = _on_weight_backend("qconv_add")
qlinear = _on_weight_backend("qlinear")
# torch.ops.onednn has no int8 transposed conv (torch 2.13): plain int8 weight, portable backend
qconv_transpose = portable.qconv_transpose


for _name, _fn in {
    "quantize_per_tensor": quantize_per_tensor,
    "dequantize_per_tensor": dequantize_per_tensor,
    "quantize_per_channel": quantize_per_channel,
    "dequantize_per_channel": dequantize_per_channel,
    "qconv1d": qconv,
    "qconv2d": qconv,
    "qconv3d": qconv,
    "qconv1d_add": qconv_add,
    "qconv2d_add": qconv_add,
    "qconv_transpose1d": qconv_transpose,
    "qconv_transpose2d": qconv_transpose,
    "qconv_transpose3d": qconv_transpose,
    "qlinear": qlinear,
}.items():
    _impl(_name, _fn)


# Shapes only, for torch.export and FakeTensor tracing.
@register_fake("graphquant::quantize_per_tensor")
def _quantize_per_tensor_fake(x, scale, zero_point, qmin, qmax, dtype):  # type: ignore[no-untyped-def]
    return torch.empty_like(x, dtype=dtype)


@register_fake("graphquant::dequantize_per_tensor")
def _dequantize_per_tensor_fake(q, scale, zero_point):  # type: ignore[no-untyped-def]
    return torch.empty(q.shape, dtype=torch.float32)


@register_fake("graphquant::quantize_per_channel")
def _quantize_per_channel_fake(x, scale, zero_point, axis, qmin, qmax, dtype):  # type: ignore[no-untyped-def]
    return torch.empty_like(x, dtype=dtype)


@register_fake("graphquant::dequantize_per_channel")
def _dequantize_per_channel_fake(q, scale, zero_point, axis):  # type: ignore[no-untyped-def]
    return torch.empty(q.shape, dtype=torch.float32)


def _conv_fake(x, x_scale, x_zero_point, w, w_scale, bias, stride, padding, dilation, groups, *rest, **kwargs):  # type: ignore[no-untyped-def]  # noqa: E501
    kernel = w.shape[-(x.dim() - 2):]  # a packed conv1d weight is 4-d (out, in, 1, k)
    spatial = []
    for i, size in enumerate(x.shape[2:]):
        spatial.append((size + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1)
    return x.new_empty((x.shape[0], w.shape[0], *spatial), dtype=torch.uint8)


for _dim in (1, 2, 3):
    register_fake(f"graphquant::qconv{_dim}d")(_conv_fake)
for _dim in (1, 2):
    register_fake(f"graphquant::qconv{_dim}d_add")(_conv_fake)


def _conv_transpose_fake(x, x_scale, x_zero_point, w, w_scale, bias, stride, padding, output_padding, groups, dilation, *rest):  # type: ignore[no-untyped-def]  # noqa: E501
    spatial = []
    for i, size in enumerate(x.shape[2:]):
        k = w.shape[2 + i]
        spatial.append((size - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k - 1) + output_padding[i] + 1)
    return x.new_empty((x.shape[0], w.shape[1] * groups, *spatial), dtype=torch.uint8)


for _dim in (1, 2, 3):
    register_fake(f"graphquant::qconv_transpose{_dim}d")(_conv_transpose_fake)


@register_fake("graphquant::qlinear")
def _qlinear_fake(x, x_scale, x_zero_point, w, w_scale, bias, out_scale, out_zero_point, post_op, post_op_args=(),  # type: ignore[no-untyped-def]  # noqa: E501
                  float_out=False, x_qmax=255):
    return x.new_empty((*x.shape[:-1], w_scale.shape[0]), dtype=torch.float32 if float_out else torch.uint8)


# uint8 elementwise and join kernels (graphquant.kernels.elementwise): each uint8 input
# with its own scale and zero point, uint8 out on the output's qparams.
from graphquant.kernels import elementwise  # noqa: E402

_QX = "Tensor x, float x_scale, int x_zero_point"
_QY = "Tensor y, float y_scale, int y_zero_point"
_QOUT = "float out_scale, int out_zero_point, str post_op) -> Tensor"
_QJOIN = "(Tensor[] xs, float[] scales, int[] zero_points, int dim, float out_scale, int out_zero_point) -> Tensor"
LIB.define(f"qadd({_QX}, {_QY}, float alpha, {_QOUT}")
LIB.define(f"qadd_scalar({_QX}, float other, {_QOUT}")
LIB.define(f"qmul({_QX}, {_QY}, {_QOUT}")
LIB.define(f"qmul_scalar({_QX}, float other, {_QOUT}")
LIB.define(f"qcat{_QJOIN}")
LIB.define(f"qstack{_QJOIN}")
for _name, _fn in elementwise.TORCHSCRIPT.items():
    _impl(_name, _fn)


@register_fake("graphquant::qadd")
def _qadd_fake(x, x_scale, x_zero_point, y, y_scale, y_zero_point, alpha, out_scale, out_zero_point, post_op):  # type: ignore[no-untyped-def]  # noqa: E501
    return x.new_empty(torch.broadcast_shapes(x.shape, y.shape), dtype=torch.uint8)


@register_fake("graphquant::qmul")
def _qmul_fake(x, x_scale, x_zero_point, y, y_scale, y_zero_point, out_scale, out_zero_point, post_op):  # type: ignore[no-untyped-def]  # noqa: E501
    return x.new_empty(torch.broadcast_shapes(x.shape, y.shape), dtype=torch.uint8)


def _scalar_fake(x, x_scale, x_zero_point, other, out_scale, out_zero_point, post_op):  # type: ignore[no-untyped-def]
    return torch.empty_like(x, dtype=torch.uint8)


for _name in ("qadd_scalar", "qmul_scalar"):
    register_fake(f"graphquant::{_name}")(_scalar_fake)


@register_fake("graphquant::qcat")
def _qcat_fake(xs, scales, zero_points, dim, out_scale, out_zero_point):  # type: ignore[no-untyped-def]
    return torch.cat([torch.empty_like(x, dtype=torch.uint8) for x in xs], dim)


@register_fake("graphquant::qstack")
def _qstack_fake(xs, scales, zero_points, dim, out_scale, out_zero_point):  # type: ignore[no-untyped-def]
    return torch.stack([torch.empty_like(x, dtype=torch.uint8) for x in xs], dim)


# Embedding tables with per-row float qparams (graphquant.kernels.embedding): indices in,
# float32 out. The table is one fused row-wise uint8 tensor (values, then scale and offset), its
# scales and offsets also given as float32 vectors.
from graphquant.kernels import embedding  # noqa: E402

LIB.define("quantize_float_qparams(Tensor x, Tensor scale, Tensor offset, int qmax) -> Tensor")
LIB.define("dequantize_float_qparams(Tensor q, Tensor scale, Tensor offset) -> Tensor")
LIB.define("qembedding(Tensor w, Tensor w_scale, Tensor w_offset, Tensor indices, int bits) -> Tensor")
LIB.define(
    "qembedding_bag(Tensor w, Tensor w_scale, Tensor w_offset, Tensor indices, Tensor offsets, int mode, "
    "Tensor? per_sample_weights, "
    "bool include_last_offset, int padding_idx, int bits) -> Tensor"
)
for _name, _fn in embedding.TORCHSCRIPT.items():
    _impl(_name, _fn)


@register_fake("graphquant::quantize_float_qparams")
def _quantize_float_qparams_fake(x, scale, offset, qmax):  # type: ignore[no-untyped-def]
    return torch.empty_like(x, dtype=torch.uint8)


@register_fake("graphquant::dequantize_float_qparams")
def _dequantize_float_qparams_fake(q, scale, offset):  # type: ignore[no-untyped-def]
    return torch.empty(q.shape, dtype=torch.float32)


@register_fake("graphquant::qembedding")
def _qembedding_fake(w, w_scale, w_offset, indices, bits):  # type: ignore[no-untyped-def]
    return w.new_empty((*indices.shape, embedding.embedding_dim(w, bits)), dtype=torch.float32)


@register_fake("graphquant::qembedding_bag")
def _qembedding_bag_fake(w, w_scale, w_offset, indices, offsets, mode, per_sample_weights, include_last_offset, padding_idx, bits):  # type: ignore[no-untyped-def]  # noqa: E501
    bags = offsets.shape[0] - 1 if include_last_offset else offsets.shape[0]
    return w.new_empty((bags, embedding.embedding_dim(w, bits)), dtype=torch.float32)
