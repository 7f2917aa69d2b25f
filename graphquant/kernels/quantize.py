"""Quantize and dequantize: real values onto a uint8 / int8 grid and back, per tensor (activations)
and per channel (weights, in reference graphs). Python-number checks only on the per-tensor ops,
which run on every call of a static model.
"""

from __future__ import annotations

import math

import torch

from graphquant.errors import GraphQuantError
from graphquant.kernels.registry import Kernel, register
from graphquant.quant_math import NATIVE_QUANTIZE, native_quantize, quantize_tensor

_INT_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


def _check_range(op: str, zero_point: int, qmin: int, qmax: int, dtype: torch.dtype) -> None:
    lo, hi = _INT_RANGES.get(dtype, (1, 0))
    if not lo <= qmin <= zero_point <= qmax <= hi:
        raise GraphQuantError(f"graphquant::{op}: wants {dtype} in [{lo}, {hi}] with qmin <= zero_point <= qmax, got "
                              f"qmin={qmin}, zero_point={zero_point}, qmax={qmax}")


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
                    dtype: torch.dtype) -> torch.Tensor:
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
                              f"{tuple(scale.shape)} {scale.dtype} and {tuple(zero_point.shape)}")
    if not bool(((scale > 0) & (scale < math.inf)).all()):
        raise GraphQuantError(f"graphquant::{op}: scales must be positive and finite")


def quantize_per_channel(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, qmin: int, qmax: int, dtype: torch.dtype
) -> torch.Tensor:
    _check_channels("quantize_per_channel", x, scale, zero_point, axis)
    lo, hi = _INT_RANGES.get(dtype, (1, 0))
    if not (x.is_floating_point() and lo <= qmin <= qmax <= hi):
        raise GraphQuantError(f"graphquant::quantize_per_channel: wants a float input and {dtype} in [{lo}, {hi}], "
                              f"got {x.dtype} [{qmin}, {qmax}]")
    return quantize_per_channel_math(x, scale, zero_point, axis, qmin, qmax, dtype)


def quantize_per_channel_math(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, qmin: int,
                              qmax: int, dtype: torch.dtype) -> torch.Tensor:
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
                                axis: int) -> torch.Tensor:
    """Per-channel integers back to real values. TorchScript-compatible."""
    shape = [1] * q.dim()
    shape[axis] = -1
    return (q.to(torch.float32) - zero_point.reshape(shape).to(torch.float32)) * scale.reshape(shape)


# shapes only, for torch.export and FakeTensor tracing
def _quantize_per_tensor_fake(x, scale, zero_point, qmin, qmax, dtype):  # type: ignore[no-untyped-def]
    return torch.empty_like(x, dtype=dtype)


def _dequantize_per_tensor_fake(q, scale, zero_point):  # type: ignore[no-untyped-def]
    return torch.empty(q.shape, dtype=torch.float32)


def _quantize_per_channel_fake(x, scale, zero_point, axis, qmin, qmax, dtype):  # type: ignore[no-untyped-def]
    return torch.empty_like(x, dtype=dtype)


def _dequantize_per_channel_fake(q, scale, zero_point, axis):  # type: ignore[no-untyped-def]
    return torch.empty(q.shape, dtype=torch.float32)


register(Kernel("quantize_per_tensor",
                "(Tensor x, float scale, int zero_point, int qmin, int qmax, ScalarType dtype) -> Tensor",
                _quantize_per_tensor_fake, quantize_per_tensor, quantize_per_tensor_math))
register(Kernel("dequantize_per_tensor", "(Tensor q, float scale, int zero_point) -> Tensor",
                _dequantize_per_tensor_fake, dequantize_per_tensor, dequantize_per_tensor_math))
register(Kernel("quantize_per_channel",
                "(Tensor x, Tensor scale, Tensor zero_point, int axis, int qmin, int qmax, ScalarType dtype) -> Tensor",
                _quantize_per_channel_fake, quantize_per_channel, quantize_per_channel_math))
register(Kernel("dequantize_per_channel", "(Tensor q, Tensor scale, Tensor zero_point, int axis) -> Tensor",
                _dequantize_per_channel_fake, dequantize_per_channel, dequantize_per_channel_math))
