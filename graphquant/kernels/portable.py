"""Pure-PyTorch int8 kernels: integer arithmetic simulated exactly, on any device.

The int32 accumulator is computed in float64, which holds every int32 exactly, so the
result is what an integer kernel would give: ``acc = sum((x_q - x_zp) * w_q) + bias_q``,
then ``y_q = clamp(round(post_op(acc * x_scale * w_scale) / out_scale) + out_zp)``.

A post-op is a name and its scalars (``"hardtanh", [0.0, 6.0]``); :data:`POST_OPS` is the
one table of them, shared with the oneDNN backend, which checks names against it and
falls back to it where oneDNN cannot fuse. The post-op runs on the real value, in
float64, before the single rounding to the output grid: what the reference graph does.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from graphquant.errors import GraphQuantError

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}
_CONV_TRANSPOSE = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}

PostOpFn = Callable[[torch.Tensor, Sequence[float]], torch.Tensor]
# name -> (number of scalars, the op on real values)
POST_OPS: dict[str, tuple[int, PostOpFn]] = {
    "none": (0, lambda v, a: v),
    "relu": (0, lambda v, a: v.clamp_min(0.0)),
    "hardtanh": (2, lambda v, a: v.clamp(a[0], a[1])),  # relu6, clamp, clamp_min, clamp_max
    "hardswish": (0, lambda v, a: F.hardswish(v)),
    "silu": (0, lambda v, a: F.silu(v)),
    "gelu": (0, lambda v, a: F.gelu(v)),
    "gelu_tanh": (0, lambda v, a: F.gelu(v, approximate="tanh")),
    "leaky_relu": (1, lambda v, a: F.leaky_relu(v, a[0])),
}
# post-ops that are monotone clamps: exact on the uint8 grid, clamped after rounding
CLAMPS = ("relu", "hardtanh")


def check_post_op(op: str, post_op: str, post_op_args: Sequence[float]) -> None:
    """A ``ValueError`` unless ``post_op`` is a known name with the right number of scalars."""
    if post_op not in POST_OPS:
        raise GraphQuantError(f"graphquant::{op}: post_op {post_op!r} is not one of {sorted(POST_OPS)}")
    arity = POST_OPS[post_op][0]
    if len(post_op_args) != arity:
        raise GraphQuantError(f"graphquant::{op}: post_op {post_op!r} takes {arity} scalars, got {list(post_op_args)}")
    if post_op == "hardtanh" and not post_op_args[0] <= post_op_args[1]:
        raise GraphQuantError(f"graphquant::{op}: hardtanh bounds {list(post_op_args)} are not min <= max")


def apply_post_op(v: torch.Tensor, post_op: str, post_op_args: Sequence[float]) -> torch.Tensor:
    """``post_op`` on real values ``v``."""
    return POST_OPS[post_op][1](v, post_op_args)


def check_inputs(op: str, x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise a ``GraphQuantError`` naming the argument before any arithmetic runs."""
    if x.dtype != torch.uint8:
        raise GraphQuantError(f"graphquant::{op}: activation must be uint8, got {x.dtype}")
    if w.dtype != torch.int8:
        raise GraphQuantError(f"graphquant::{op}: weight must be int8, got {w.dtype}")
    if w_scale.dim() != 1 or w_scale.numel() != w.shape[0]:
        raise GraphQuantError(f"graphquant::{op}: w_scale must have one entry per output channel ({w.shape[0]})")
    if bias is not None and bias.numel() != w.shape[0]:
        raise GraphQuantError(f"graphquant::{op}: bias must have one entry per output channel ({w.shape[0]})")


def quantize_real(v: torch.Tensor, out_scale: float, out_zero_point: int) -> torch.Tensor:
    """Real values to the uint8 output grid: the one rounding of every kernel."""
    return (torch.round(v / out_scale) + out_zero_point).clamp(0, 255).to(torch.uint8)


def _requantize(
    acc: torch.Tensor,
    x_scale: float,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_scale: float,
    out_zero_point: int,
    post_op: str,
    post_op_args: Sequence[float],
    channel_axis: int,
    accum: torch.Tensor | None = None,
) -> torch.Tensor:
    """int32 accumulator -> real value (+ ``accum``, real) -> post-op -> uint8."""
    shape = [1] * acc.dim()
    shape[channel_axis] = -1
    acc_scale = (x_scale * w_scale.double()).reshape(shape)
    if bias is not None:
        # bias uses scale x_scale * w_scale so it adds straight into the int32 accumulator
        acc = acc + torch.round(bias.double().reshape(shape) / acc_scale)
    v = acc * acc_scale
    if accum is not None:
        v = v + accum
    return quantize_real(apply_post_op(v, post_op, post_op_args), out_scale, out_zero_point)


def qconv(
    x: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    out_scale: float,
    out_zero_point: int,
    post_op: str,
    post_op_args: Sequence[float] = (),
) -> torch.Tensor:
    """uint8 convolution with per-channel int8 weights, uint8 out."""
    check_inputs("qconv", x, w, w_scale, bias)
    check_post_op("qconv", post_op, post_op_args)
    xi = x.double() - x_zero_point
    acc = _CONV[x.dim()](xi, w.double(), None, stride, padding, dilation, groups)
    return _requantize(acc, x_scale, w_scale, bias, out_scale, out_zero_point, post_op, post_op_args, 1)


def qconv_add(
    x: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    accum: torch.Tensor,
    accum_scale: float,
    accum_zero_point: int,
    out_scale: float,
    out_zero_point: int,
    post_op: str,
) -> torch.Tensor:
    """``post_op(conv(x) + accum)``: the residual join, one rounding to the output grid."""
    check_inputs("qconv_add", x, w, w_scale, bias)
    check_post_op("qconv_add", post_op, ())
    xi = x.double() - x_zero_point
    acc = _CONV[x.dim()](xi, w.double(), None, stride, padding, dilation, groups)
    if accum.dtype != torch.uint8 or accum.shape != acc.shape:
        raise GraphQuantError(
            f"graphquant::qconv_add: accum must be uint8 of the output's shape {tuple(acc.shape)}, "
            f"got {accum.dtype} {tuple(accum.shape)}"
        )
    other = (accum.double() - accum_zero_point) * accum_scale
    return _requantize(acc, x_scale, w_scale, bias, out_scale, out_zero_point, post_op, (), 1, other)


def qconv_transpose(
    x: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    output_padding: list[int],
    groups: int,
    dilation: list[int],
    out_scale: float,
    out_zero_point: int,
    post_op: str,
    post_op_args: Sequence[float] = (),
) -> torch.Tensor:
    """uint8 transposed convolution, int8 weight ``(in, out / groups, *kernel)``, uint8 out.

    The weight scales run along its axis 0, the *input* channels, so they cannot be
    factored out of the sum over input channels: each input channel is scaled before
    the sum, in float64 (about 1e-16 relative error instead of exact integers).
    """
    if x.dtype != torch.uint8 or w.dtype != torch.int8:
        raise GraphQuantError(
            f"graphquant::qconv_transpose: wants a uint8 activation and an int8 weight, got {x.dtype}, {w.dtype}"
        )
    if x.dim() != w.dim() or x.dim() not in _CONV_TRANSPOSE or x.shape[1] != w.shape[0]:
        raise GraphQuantError(
            f"graphquant::qconv_transpose: input {tuple(x.shape)} does not fit weight {tuple(w.shape)}"
        )
    if w_scale.dim() != 1 or w_scale.numel() != w.shape[0]:
        raise GraphQuantError(
            f"graphquant::qconv_transpose: w_scale must have one entry per input channel ({w.shape[0]})"
        )
    out_channels = w.shape[1] * groups
    if bias is not None and bias.numel() != out_channels:
        raise GraphQuantError(
            f"graphquant::qconv_transpose: bias must have one entry per output channel ({out_channels})"
        )
    check_post_op("qconv_transpose", post_op, post_op_args)
    channel_shape = [1, -1] + [1] * (x.dim() - 2)
    xs = (x.double() - x_zero_point) * (x_scale * w_scale.double()).reshape(channel_shape)
    v = _CONV_TRANSPOSE[x.dim()](xs, w.double(), None, stride, padding, output_padding, groups, dilation)
    if bias is not None:
        v = v + bias.double().reshape(channel_shape)
    return quantize_real(apply_post_op(v, post_op, post_op_args), out_scale, out_zero_point)


def qlinear(
    x: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_scale: float,
    out_zero_point: int,
    post_op: str,
    post_op_args: Sequence[float] = (),
) -> torch.Tensor:
    """uint8 linear with per-channel int8 weights, uint8 out."""
    check_inputs("qlinear", x, w, w_scale, bias)
    check_post_op("qlinear", post_op, post_op_args)
    acc = F.linear(x.double() - x_zero_point, w.double())
    return _requantize(acc, x_scale, w_scale, bias, out_scale, out_zero_point, post_op, post_op_args, -1)
