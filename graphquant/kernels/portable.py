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

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from graphquant.errors import GraphQuantError
from graphquant.kernels import x86

_CONV_TRANSPOSE = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}

# name -> number of scalars; the ops themselves are kernels.x86.post_op_float, written once in the
# TorchScript-compatible subset for every backend and runtime
POST_OPS: dict[str, int] = {
    "none": 0,
    "relu": 0,
    "hardtanh": 2,  # relu6, clamp, clamp_min, clamp_max
    "hardswish": 0,
    "silu": 0,
    "gelu": 0,
    "gelu_tanh": 0,
    "leaky_relu": 1,
}
# post-ops that are monotone clamps: exact on the uint8 grid, clamped after rounding
CLAMPS = ("relu", "hardtanh")


def check_post_op(op: str, post_op: str, post_op_args: Sequence[float]) -> None:
    """A ``ValueError`` unless ``post_op`` is a known name with the right number of scalars."""
    if post_op not in POST_OPS:
        raise GraphQuantError(f"graphquant::{op}: post_op {post_op!r} is not one of {sorted(POST_OPS)}")
    arity = POST_OPS[post_op]
    if len(post_op_args) != arity:
        raise GraphQuantError(f"graphquant::{op}: post_op {post_op!r} takes {arity} scalars, got {list(post_op_args)}")
    if post_op == "hardtanh" and not post_op_args[0] <= post_op_args[1]:
        raise GraphQuantError(f"graphquant::{op}: hardtanh bounds {list(post_op_args)} are not min <= max")


def apply_post_op(v: torch.Tensor, post_op: str, post_op_args: Sequence[float]) -> torch.Tensor:
    """``post_op`` on real values ``v``."""
    return x86.post_op_float(v, post_op, list(post_op_args))


def check_inputs(op: str, x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise a ``GraphQuantError`` naming the argument before any arithmetic runs."""
    if x.dtype != torch.uint8:
        raise GraphQuantError(f"graphquant::{op}: activation must be uint8, got {x.dtype}")
    if w.dtype != torch.int8 or w.is_mkldnn:
        raise GraphQuantError(f"graphquant::{op}: weight must be a plain int8 tensor, got {w.dtype} "
                              f"mkldnn={w.is_mkldnn} (a packed weight runs on oneDNN: call torch.ops.graphquant)")
    if w_scale.dtype != torch.float32 or w_scale.dim() != 1 or w_scale.numel() != w.shape[0]:
        raise GraphQuantError(f"graphquant::{op}: w_scale must be float32 with one entry per output channel "
                              f"({w.shape[0]}), got {w_scale.dtype} {tuple(w_scale.shape)}")
    if not bool(((w_scale > 0) & (w_scale < math.inf)).all()):  # oneDNN checks this when it packs
        raise GraphQuantError(f"graphquant::{op}: weight scales must be positive and finite")
    if bias is not None and (bias.dtype != torch.float32 or bias.numel() != w.shape[0]):
        raise GraphQuantError(f"graphquant::{op}: bias must be float32 with one entry per output channel "
                              f"({w.shape[0]})")


def check_qparams(op: str, x_scale: float, x_zero_point: int, out_scale: float, out_zero_point: int) -> None:
    """Scales positive and finite, uint8 zero points in ``[0, 255]``: a zero scale divides by
    zero, a NaN one turns every output into an arbitrary uint8. Python numbers: no tensor work."""
    if not (0.0 < x_scale < math.inf and 0.0 < out_scale < math.inf):  # NaN fails both comparisons
        raise GraphQuantError(
            f"graphquant::{op}: scales must be positive and finite, got x_scale={x_scale}, out_scale={out_scale}"
        )
    if not (0 <= x_zero_point <= 255 and 0 <= out_zero_point <= 255):
        raise GraphQuantError(f"graphquant::{op}: uint8 zero points must lie in [0, 255], got "
                              f"x_zero_point={x_zero_point}, out_zero_point={out_zero_point}")


def check_conv_args(op: str, spatial: int, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                    groups: int) -> None:
    """One stride, padding and dilation per spatial dimension, strides and dilations >= 1 (oneDNN
    divides by them: a zero stride kills the process with SIGFPE), paddings >= 0, groups >= 1."""
    if not (len(stride) == len(padding) == len(dilation) == spatial):
        raise GraphQuantError(f"graphquant::{op}: stride, padding and dilation need {spatial} entries each, got "
                              f"{list(stride)}, {list(padding)}, {list(dilation)}")
    if min(stride, default=1) < 1 or min(dilation, default=1) < 1 or min(padding, default=0) < 0 or groups < 1:
        raise GraphQuantError(f"graphquant::{op}: stride {list(stride)} and dilation {list(dilation)} must be >= 1, "
                              f"padding {list(padding)} >= 0 and groups {groups} >= 1")


def conv_out_shape(
    op: str, x: torch.Tensor, w: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], groups: int,
) -> tuple[int, ...]:
    """The output shape of a convolution, or a ``GraphQuantError`` for arguments that do not fit.
    On every eager conv call: each shape is read once (a packed weight's ``.shape`` costs 0.2 µs)."""
    xs, ws = tuple(x.shape), tuple(w.shape)
    rank = len(xs)
    spatial = rank - 2
    # oneDNN packs a conv1d weight as 2-d (out, in, 1, k)
    fits = rank == len(ws) or (rank == 3 and len(ws) == 4 and w.is_mkldnn)
    if rank not in (3, 4, 5) or not fits or groups < 1 or xs[1] != ws[1] * groups or ws[0] % groups:
        raise GraphQuantError(f"graphquant::{op}: input {xs} does not fit weight {ws} with groups={groups}")
    check_conv_args(op, spatial, stride, padding, dilation, groups)
    if min(xs[2:]) < 1:
        raise GraphQuantError(f"graphquant::{op}: input {xs} has an empty spatial dimension")
    kernel = ws[-spatial:]
    out = [xs[0], ws[0]]
    for i in range(spatial):
        size = (xs[2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
        if size < 1:
            raise GraphQuantError(f"graphquant::{op}: input {xs} is too small for kernel {kernel}")
        out.append(size)
    return tuple(out)


quantize_real = x86.quantize_real  # real values to the uint8 output grid: the one rounding of every kernel


def requantize(
    acc: torch.Tensor,
    x_scale: float,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_scale: float,
    out_zero_point: int,
    post_op: str,
    post_op_args: list[float],
    channel_axis: int,
    accum: torch.Tensor | None = None,
    float_out: bool = False,
) -> torch.Tensor:
    """int32 accumulator -> real value (+ bias, + ``accum``, real) -> post-op -> uint8 (float32 with
    ``float_out``). TorchScript-compatible: the TorchScript module runs this same function.

    The bias is added as the real number it is, as the reference graph and oneDNN add it, not
    rounded onto the accumulator's grid (``x_scale * w_scale``, as fixed-point kernels store an
    int32 bias): that rounding moved results by up to half a grid step, several output steps
    where the output scale is finer than the grid (the fuzz test found 4, seed 791922)."""
    shape = [1] * acc.dim()
    shape[channel_axis] = -1
    v = acc * (x_scale * w_scale.double()).reshape(shape)
    if bias is not None:
        v = v + bias.double().reshape(shape)
    if accum is not None:
        v = v + accum
    if float_out:
        return x86.post_op_float(v, post_op, post_op_args).to(torch.float32)
    return x86.quantize_real(x86.post_op_float(v, post_op, post_op_args), out_scale, out_zero_point)


def conv_nd(x: torch.Tensor, w: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int],
            groups: int) -> torch.Tensor:
    """The float64 conv of a 1-, 2- or 3-d input (exact integer sums). TorchScript-compatible."""
    if x.dim() == 3:
        return torch.conv1d(x, w, None, stride, padding, dilation, groups)
    if x.dim() == 4:
        return torch.conv2d(x, w, None, stride, padding, dilation, groups)
    return torch.conv3d(x, w, None, stride, padding, dilation, groups)


def qconv(x: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scale: torch.Tensor,
          bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int,
          out_scale: float, out_zero_point: int, post_op: str, post_op_args: Sequence[float] = (),
          x_qmax: int = 255) -> torch.Tensor:
    """uint8 convolution with per-channel int8 weights, uint8 out (exact for any ``x_qmax``)."""
    check_inputs("qconv", x, w, w_scale, bias)
    check_qparams("qconv", x_scale, x_zero_point, out_scale, out_zero_point)
    check_post_op("qconv", post_op, post_op_args)
    conv_out_shape("qconv", x, w, stride, padding, dilation, groups)
    xi = x.double() - x_zero_point
    acc = conv_nd(xi, w.double(), list(stride), list(padding), list(dilation), groups)
    return requantize(acc, x_scale, w_scale, bias, out_scale, out_zero_point, post_op, list(post_op_args), 1)


def qconv_add(x: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int,
              accum: torch.Tensor, accum_scale: float, accum_zero_point: int, out_scale: float, out_zero_point: int,
              post_op: str, accum_donated: bool = False, x_qmax: int = 255) -> torch.Tensor:
    """``post_op(conv(x) + accum)``: the residual join, one rounding to the output grid.
    (``accum_donated`` is for oneDNN's in-place sum, ``x_qmax`` for its saturating CPUs; this
    kernel writes a new tensor, exactly.)"""
    check_inputs("qconv_add", x, w, w_scale, bias)
    check_qparams("qconv_add", x_scale, x_zero_point, out_scale, out_zero_point)
    check_qparams("qconv_add", accum_scale, accum_zero_point, out_scale, out_zero_point)
    check_post_op("qconv_add", post_op, ())
    conv_out_shape("qconv_add", x, w, stride, padding, dilation, groups)
    xi = x.double() - x_zero_point
    acc = conv_nd(xi, w.double(), list(stride), list(padding), list(dilation), groups)
    if accum.dtype != torch.uint8 or accum.shape != acc.shape:
        raise GraphQuantError(
            f"graphquant::qconv_add: accum must be uint8 of the output's shape {tuple(acc.shape)}, "
            f"got {accum.dtype} {tuple(accum.shape)}"
        )
    other = (accum.double() - accum_zero_point) * accum_scale
    return requantize(acc, x_scale, w_scale, bias, out_scale, out_zero_point, post_op, [], 1, other)


def qconv_transpose(x: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, stride: list[int], padding: list[int], output_padding: list[int],
                    groups: int, dilation: list[int], out_scale: float, out_zero_point: int, post_op: str,
                    post_op_args: Sequence[float] = ()) -> torch.Tensor:
    """uint8 transposed convolution, int8 weight ``(in, out / groups, *kernel)``, uint8 out.

    The weight scales run along its axis 0, the *input* channels, so they cannot be
    factored out of the sum over input channels: each input channel is scaled before
    the sum, in float64 (about 1e-16 relative error instead of exact integers).
    """
    if x.dtype != torch.uint8 or w.dtype != torch.int8 or w.is_mkldnn:
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
    check_qparams("qconv_transpose", x_scale, x_zero_point, out_scale, out_zero_point)
    check_conv_args("qconv_transpose", x.dim() - 2, stride, padding, dilation, groups)
    if w.shape[0] % groups or len(output_padding) != x.dim() - 2 or any(
        not 0 <= p < max(s, d) for p, s, d in zip(output_padding, stride, dilation, strict=True)
    ):
        raise GraphQuantError(f"graphquant::qconv_transpose: groups {groups} must divide the {w.shape[0]} input "
                              f"channels and each output_padding {list(output_padding)} lie below its stride or "
                              "dilation")
    out = [
        (size - 1) * stride[i] - 2 * padding[i] + dilation[i] * (w.shape[2 + i] - 1) + output_padding[i] + 1
        for i, size in enumerate(x.shape[2:])
    ]
    if min(out) < 1 or min(x.shape[2:]) < 1:
        raise GraphQuantError(f"graphquant::qconv_transpose: input {tuple(x.shape)} with padding {list(padding)} "
                              f"gives an empty output {out}")
    if x.shape[0] == 0:
        return x.new_empty((0, out_channels, *out))
    return qconv_transpose_math(x, x_scale, x_zero_point, w, w_scale, bias, list(stride), list(padding),
                                list(output_padding), groups, list(dilation), out_scale, out_zero_point, post_op,
                                list(post_op_args))


def qconv_transpose_math(x: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None, stride: list[int], padding: list[int], output_padding: list[int],
                         groups: int, dilation: list[int], out_scale: float, out_zero_point: int, post_op: str,
                         post_op_args: list[float]) -> torch.Tensor:
    """:func:`qconv_transpose` on checked arguments. TorchScript-compatible: the TorchScript
    module runs this same function."""
    channel_shape = [1, -1]
    for _ in range(x.dim() - 2):
        channel_shape.append(1)
    xs = (x.double() - x_zero_point) * (x_scale * w_scale.double()).reshape(channel_shape)
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


def qlinear(x: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scale: torch.Tensor,
            bias: torch.Tensor | None, out_scale: float, out_zero_point: int, post_op: str,
            post_op_args: Sequence[float] = (), float_out: bool = False, x_qmax: int = 255) -> torch.Tensor:
    """uint8 linear with per-channel int8 weights, uint8 out (float32 with ``float_out``; exact for any ``x_qmax``)."""
    check_inputs("qlinear", x, w, w_scale, bias)
    check_qparams("qlinear", x_scale, x_zero_point, out_scale, out_zero_point)
    check_post_op("qlinear", post_op, post_op_args)
    if w.dim() != 2 or x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise GraphQuantError(f"graphquant::qlinear: input {tuple(x.shape)} does not fit weight {tuple(w.shape)}")
    acc = F.linear(x.double() - x_zero_point, w.double())
    return requantize(acc, x_scale, w_scale, bias, out_scale, out_zero_point, post_op, list(post_op_args), -1,
                       float_out=float_out)
