"""uint8 elementwise and join kernels: add, mul, cat, stack on plain ``uint8`` tensors.

Every input carries its own scale and zero point; the output is requantized to
``out_scale`` / ``out_zero_point``. As fbgemm's quantized add does, each kernel widens its
uint8 inputs to float32, computes, and rounds once to the output grid; it uses the float32
operations of the reference ``dequantize -> op -> quantize`` in the same order, so it
matches the reference bit for bit (a fixed-point rescale would be within one step, and
that one step would add to any upstream kernel's). Inputs and outputs stay uint8: no
quantize / dequantize nodes around the op. Pure PyTorch, so the same code serves both
backends, and TorchScript-compatible, so a scripted model can call these very functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from graphquant.errors import GraphQuantError


def _check_uint8(op: str, x: Tensor, index: int) -> None:
    if x.dtype != torch.uint8:
        raise GraphQuantError("graphquant::" + op + ": input " + str(index) + " must be uint8, got " + str(x.dtype))


def _check_post_op(op: str, post_op: str) -> None:
    if post_op != "none" and post_op != "relu":
        raise GraphQuantError("graphquant::" + op + ": post_op must be 'none' or 'relu', got '" + post_op + "'")


def _dequantize(q: Tensor, scale: float, zero_point: int) -> Tensor:
    return (q.to(torch.float32) - zero_point) * scale


def _quantize(v: Tensor, scale: float, zero_point: int, post_op: str) -> Tensor:
    """relu clamps at the zero point: ``quantize(relu(v)) == max(quantize(v), zero_point)``."""
    q = torch.round(v / scale) + zero_point
    return q.clamp(zero_point if post_op == "relu" else 0, 255).to(torch.uint8)


def qadd(
    x: Tensor, x_scale: float, x_zero_point: int, y: Tensor, y_scale: float, y_zero_point: int, alpha: float,
    out_scale: float, out_zero_point: int, post_op: str,
) -> Tensor:  # fmt: skip
    """``x + alpha * y`` (broadcasting) on uint8 inputs, uint8 out; ``alpha=-1`` is ``sub``
    (``torch.sub`` is ``torch.add`` with ``-alpha``, bit for bit)."""
    _check_uint8("qadd", x, 0)
    _check_uint8("qadd", y, 1)
    _check_post_op("qadd", post_op)
    v = torch.add(_dequantize(x, x_scale, x_zero_point), _dequantize(y, y_scale, y_zero_point), alpha=alpha)
    return _quantize(v, out_scale, out_zero_point, post_op)


def qadd_scalar(
    x: Tensor, x_scale: float, x_zero_point: int, other: float, out_scale: float, out_zero_point: int, post_op: str
) -> Tensor:
    """``x + other`` for a Python number ``other``, uint8 out."""
    _check_uint8("qadd_scalar", x, 0)
    _check_post_op("qadd_scalar", post_op)
    return _quantize(_dequantize(x, x_scale, x_zero_point) + other, out_scale, out_zero_point, post_op)


def qmul(
    x: Tensor, x_scale: float, x_zero_point: int, y: Tensor, y_scale: float, y_zero_point: int,
    out_scale: float, out_zero_point: int, post_op: str,
) -> Tensor:  # fmt: skip
    """``x * y`` (broadcasting) on uint8 inputs, uint8 out."""
    _check_uint8("qmul", x, 0)
    _check_uint8("qmul", y, 1)
    _check_post_op("qmul", post_op)
    v = _dequantize(x, x_scale, x_zero_point) * _dequantize(y, y_scale, y_zero_point)
    return _quantize(v, out_scale, out_zero_point, post_op)


def qmul_scalar(
    x: Tensor, x_scale: float, x_zero_point: int, other: float, out_scale: float, out_zero_point: int, post_op: str
) -> Tensor:
    """``x * other`` for a Python number ``other``, uint8 out."""
    _check_uint8("qmul_scalar", x, 0)
    _check_post_op("qmul_scalar", post_op)
    return _quantize(_dequantize(x, x_scale, x_zero_point) * other, out_scale, out_zero_point, post_op)


def _requantize_all(
    op: str, xs: list[Tensor], scales: list[float], zero_points: list[int], out_scale: float, out_zero_point: int
) -> list[Tensor]:
    """Each input on the output's scale. An input that already has it passes unchanged."""
    if len(xs) != len(scales) or len(xs) != len(zero_points):
        raise GraphQuantError("graphquant::" + op + ": " + str(len(xs)) + " inputs but " + str(len(scales))
                              + " scales, " + str(len(zero_points)) + " zero points")  # fmt: skip
    out: list[Tensor] = []
    for i in range(len(xs)):
        _check_uint8(op, xs[i], i)
        if scales[i] == out_scale and zero_points[i] == out_zero_point:
            out.append(xs[i])
        else:
            out.append(_quantize(_dequantize(xs[i], scales[i], zero_points[i]), out_scale, out_zero_point, "none"))
    return out


def qcat(
    xs: list[Tensor], scales: list[float], zero_points: list[int], dim: int, out_scale: float, out_zero_point: int
) -> Tensor:
    """``cat`` of uint8 tensors with their own qparams, requantized to one output scale."""
    return torch.cat(_requantize_all("qcat", xs, scales, zero_points, out_scale, out_zero_point), dim)


def qstack(
    xs: list[Tensor], scales: list[float], zero_points: list[int], dim: int, out_scale: float, out_zero_point: int
) -> Tensor:
    """``stack`` of uint8 tensors with their own qparams, requantized to one output scale."""
    return torch.stack(_requantize_all("qstack", xs, scales, zero_points, out_scale, out_zero_point), dim)


# TorchScript twins: these functions already compute in TorchScript what the ops compute
TORCHSCRIPT = {
    "qadd": qadd,
    "qadd_scalar": qadd_scalar,
    "qmul": qmul,
    "qmul_scalar": qmul_scalar,
    "qcat": qcat,
    "qstack": qstack,
}
