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
from graphquant.kernels.registry import Kernel, register


def _check_qparams(op: str, what: str, scale: float, zero_point: int) -> None:
    # a zero scale divides by zero, a NaN one makes every output an arbitrary uint8
    if not (scale > 0.0 and scale < float("inf")) or zero_point < 0 or zero_point > 255:
        raise GraphQuantError("graphquant::" + op + ": " + what + " needs a positive finite scale and a zero point "
                              + "in [0, 255], got " + str(scale) + ", " + str(zero_point))


def _check_uint8(op: str, x: Tensor, index: int, scale: float, zero_point: int) -> None:
    if x.dtype != torch.uint8:
        raise GraphQuantError("graphquant::" + op + ": input " + str(index) + " must be uint8, got " + str(x.dtype))
    _check_qparams(op, "input " + str(index), scale, zero_point)


def _check_post_op(op: str, post_op: str, out_scale: float, out_zero_point: int) -> None:
    if post_op != "none" and post_op != "relu":
        raise GraphQuantError("graphquant::" + op + ": post_op must be 'none' or 'relu', got '" + post_op + "'")
    _check_qparams(op, "the output", out_scale, out_zero_point)


def _check_broadcast(op: str, x: Tensor, y: Tensor) -> None:
    """Shapes that broadcast: from the right, equal sizes or a 1."""
    for i in range(1, min(x.dim(), y.dim()) + 1):
        a, b = x.size(x.dim() - i), y.size(y.dim() - i)
        if a != b and a != 1 and b != 1:
            raise GraphQuantError("graphquant::" + op + ": shapes " + str(x.shape) + " and " + str(y.shape)
                                  + " do not broadcast")


def _check_join(op: str, xs: list[Tensor], dim: int, stack: bool) -> None:
    """Inputs of one shape (``stack``) or of one shape but along ``dim`` (``cat``), ``dim`` in range."""
    if len(xs) == 0:
        raise GraphQuantError("graphquant::" + op + ": needs at least one input")
    rank = xs[0].dim() + (1 if stack else 0)
    if rank == 0 or dim < -rank or dim >= rank:
        raise GraphQuantError("graphquant::" + op + ": dim " + str(dim) + " is out of range for inputs of shape "
                              + str(xs[0].shape))
    along = dim + rank if dim < 0 else dim
    for x in xs:
        same = x.dim() == xs[0].dim()
        if same:
            for i in range(x.dim()):
                if x.size(i) != xs[0].size(i) and (stack or i != along):
                    same = False
        if not same:
            raise GraphQuantError("graphquant::" + op + ": input shapes " + str(xs[0].shape) + " and " + str(x.shape)
                                  + " do not join along dim " + str(dim))


def _dequantize(q: Tensor, scale: float, zero_point: int) -> Tensor:
    return (q.to(torch.float32) - zero_point) * scale


def _quantize(v: Tensor, scale: float, zero_point: int, post_op: str) -> Tensor:
    """relu clamps at the zero point: ``quantize(relu(v)) == max(quantize(v), zero_point)``."""
    q = torch.round(v / scale) + zero_point
    return q.clamp(zero_point if post_op == "relu" else 0, 255).to(torch.uint8)


def qadd(
    x: Tensor, x_scale: float, x_zero_point: int, y: Tensor, y_scale: float, y_zero_point: int, alpha: float,
    out_scale: float, out_zero_point: int, post_op: str,
) -> Tensor:
    """``x + alpha * y`` (broadcasting) on uint8 inputs, uint8 out; ``alpha=-1`` is ``sub``
    (``torch.sub`` is ``torch.add`` with ``-alpha``, bit for bit)."""
    _check_uint8("qadd", x, 0, x_scale, x_zero_point)
    _check_uint8("qadd", y, 1, y_scale, y_zero_point)
    _check_post_op("qadd", post_op, out_scale, out_zero_point)
    _check_broadcast("qadd", x, y)
    v = torch.add(_dequantize(x, x_scale, x_zero_point), _dequantize(y, y_scale, y_zero_point), alpha=alpha)
    return _quantize(v, out_scale, out_zero_point, post_op)


def qadd_scalar(
    x: Tensor, x_scale: float, x_zero_point: int, other: float, out_scale: float, out_zero_point: int, post_op: str
) -> Tensor:
    """``x + other`` for a Python number ``other``, uint8 out."""
    _check_uint8("qadd_scalar", x, 0, x_scale, x_zero_point)
    _check_post_op("qadd_scalar", post_op, out_scale, out_zero_point)
    return _quantize(_dequantize(x, x_scale, x_zero_point) + other, out_scale, out_zero_point, post_op)


def qmul(
    x: Tensor, x_scale: float, x_zero_point: int, y: Tensor, y_scale: float, y_zero_point: int,
    out_scale: float, out_zero_point: int, post_op: str,
) -> Tensor:
    """``x * y`` (broadcasting) on uint8 inputs, uint8 out."""
    _check_uint8("qmul", x, 0, x_scale, x_zero_point)
    _check_uint8("qmul", y, 1, y_scale, y_zero_point)
    _check_post_op("qmul", post_op, out_scale, out_zero_point)
    _check_broadcast("qmul", x, y)
    v = _dequantize(x, x_scale, x_zero_point) * _dequantize(y, y_scale, y_zero_point)
    return _quantize(v, out_scale, out_zero_point, post_op)


def qmul_scalar(
    x: Tensor, x_scale: float, x_zero_point: int, other: float, out_scale: float, out_zero_point: int, post_op: str
) -> Tensor:
    """``x * other`` for a Python number ``other``, uint8 out."""
    _check_uint8("qmul_scalar", x, 0, x_scale, x_zero_point)
    _check_post_op("qmul_scalar", post_op, out_scale, out_zero_point)
    return _quantize(_dequantize(x, x_scale, x_zero_point) * other, out_scale, out_zero_point, post_op)


def _requantize_all(
    op: str, xs: list[Tensor], scales: list[float], zero_points: list[int], out_scale: float, out_zero_point: int
) -> list[Tensor]:
    """Each input on the output's scale. An input that already has it passes unchanged."""
    if len(xs) != len(scales) or len(xs) != len(zero_points):
        raise GraphQuantError("graphquant::" + op + ": " + str(len(xs)) + " inputs but " + str(len(scales))
                              + " scales, " + str(len(zero_points)) + " zero points")
    _check_qparams(op, "the output", out_scale, out_zero_point)
    out: list[Tensor] = []
    for i in range(len(xs)):
        _check_uint8(op, xs[i], i, scales[i], zero_points[i])
        if scales[i] == out_scale and zero_points[i] == out_zero_point:
            out.append(xs[i])
        else:
            out.append(_quantize(_dequantize(xs[i], scales[i], zero_points[i]), out_scale, out_zero_point, "none"))
    return out


def qcat(
    xs: list[Tensor], scales: list[float], zero_points: list[int], dim: int, out_scale: float, out_zero_point: int
) -> Tensor:
    """``cat`` of uint8 tensors with their own qparams, requantized to one output scale."""
    _check_join("qcat", xs, dim, False)
    return torch.cat(_requantize_all("qcat", xs, scales, zero_points, out_scale, out_zero_point), dim)


def qstack(
    xs: list[Tensor], scales: list[float], zero_points: list[int], dim: int, out_scale: float, out_zero_point: int
) -> Tensor:
    """``stack`` of uint8 tensors with their own qparams, requantized to one output scale."""
    _check_join("qstack", xs, dim, True)
    return torch.stack(_requantize_all("qstack", xs, scales, zero_points, out_scale, out_zero_point), dim)


_QX = "Tensor x, float x_scale, int x_zero_point"
_QY = "Tensor y, float y_scale, int y_zero_point"
_QOUT = "float out_scale, int out_zero_point, str post_op) -> Tensor"
_QJOIN = "(Tensor[] xs, float[] scales, int[] zero_points, int dim, float out_scale, int out_zero_point) -> Tensor"


def _qadd_fake(x, x_scale, x_zero_point, y, y_scale, y_zero_point, alpha, out_scale, out_zero_point, post_op):  # type: ignore[no-untyped-def]  # noqa: E501
    return x.new_empty(torch.broadcast_shapes(x.shape, y.shape), dtype=torch.uint8)


def _qmul_fake(x, x_scale, x_zero_point, y, y_scale, y_zero_point, out_scale, out_zero_point, post_op):  # type: ignore[no-untyped-def]  # noqa: E501
    return x.new_empty(torch.broadcast_shapes(x.shape, y.shape), dtype=torch.uint8)


def _scalar_fake(x, x_scale, x_zero_point, other, out_scale, out_zero_point, post_op):  # type: ignore[no-untyped-def]
    return torch.empty_like(x, dtype=torch.uint8)


def _qcat_fake(xs, scales, zero_points, dim, out_scale, out_zero_point):  # type: ignore[no-untyped-def]
    return torch.cat([torch.empty_like(x, dtype=torch.uint8) for x in xs], dim)


def _qstack_fake(xs, scales, zero_points, dim, out_scale, out_zero_point):  # type: ignore[no-untyped-def]
    return torch.stack([torch.empty_like(x, dtype=torch.uint8) for x in xs], dim)


# Each function above is both the op's implementation and its TorchScript body.
register(Kernel("qadd", f"({_QX}, {_QY}, float alpha, {_QOUT}", _qadd_fake, qadd, qadd))
register(Kernel("qadd_scalar", f"({_QX}, float other, {_QOUT}", _scalar_fake, qadd_scalar, qadd_scalar))
register(Kernel("qmul", f"({_QX}, {_QY}, {_QOUT}", _qmul_fake, qmul, qmul))
register(Kernel("qmul_scalar", f"({_QX}, float other, {_QOUT}", _scalar_fake, qmul_scalar, qmul_scalar))
register(Kernel("qcat", _QJOIN, _qcat_fake, qcat, qcat))
register(Kernel("qstack", _QJOIN, _qstack_fake, qstack, qstack))
