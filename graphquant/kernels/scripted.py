"""The TorchScript forms ("twins") of graphquant's ops, and the modules that hold packed weights
in a TorchScript model: what kernels/ops.py, onednn.py, portable.py and dynamic.py compute, op for
op, in TorchScript's subset of Python. Same aten / onednn calls in the same order, and the same
functions where the eager kernels' own are TorchScript-compatible (kernels.x86's oneDNN calls,
quant_math.dynamic_qparams), so outputs are bit-identical; tests/test_serialize.py holds every
pattern to that. :func:`graphquant.torchscript.to_torchscript` puts them in place of the
``graphquant::`` ops (:data:`TORCHSCRIPT_KERNELS`).
"""

from __future__ import annotations

import typing
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from graphquant.kernels import dynamic, elementwise, embedding, onednn, ops, portable
from graphquant.kernels.onednn import onednn_dilation
from graphquant.quant_math import quantize_dynamic_batch


def _ts_check(x: Tensor, x_zero_point: int, w: Tensor, w_scale: Tensor, bias: Tensor | None, out_zero_point: int,
              out_channels: int) -> None:  # fmt: skip
    """The checks both backends make before any arithmetic (oneDNN crashes on malformed input)."""
    if x.dtype != torch.uint8:
        raise ValueError("graphquant: int8 kernel activation must be uint8")
    if not w.is_mkldnn and w.dtype != torch.int8:
        raise ValueError("graphquant: int8 kernel weight must be packed or int8")
    if x_zero_point < 0 or x_zero_point > 255 or out_zero_point < 0 or out_zero_point > 255:
        raise ValueError("graphquant: uint8 zero points must lie in [0, 255]")
    if w_scale.dim() != 1 or w_scale.numel() != out_channels:
        raise ValueError("graphquant: w_scale must have one entry per output channel")
    if bias is not None:
        if bias.numel() != out_channels:
            raise ValueError("graphquant: bias must have one entry per output channel")


def _ts_conv_out_shape(x: Tensor, w: Tensor, stride: list[int], padding: list[int], dilation: list[int],
                       groups: int) -> list[int]:  # fmt: skip
    spatial = x.dim() - 2
    fits = x.dim() == w.dim() or (x.dim() == 3 and w.dim() == 4)  # oneDNN packs a conv1d weight as 2-d
    if x.dim() < 3 or x.dim() > 5 or not fits or groups < 1 or x.size(1) != w.size(1) * groups:
        raise ValueError("graphquant: conv input does not fit its weight")
    out = [x.size(0), w.size(0)]
    for i in range(spatial):
        k = w.size(w.dim() - spatial + i)
        size = (x.size(2 + i) + 2 * padding[i] - dilation[i] * (k - 1) - 1) // stride[i] + 1
        if size < 1:
            raise ValueError("graphquant: conv input is too small for its kernel")
        out.append(size)
    return out


def _ts_qconv(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor, bias: Tensor | None,
              stride: list[int], padding: list[int], dilation: list[int], groups: int, out_scale: float,
              out_zero_point: int, post_op: str, post_op_args: list[float], x_qmax: int,
              saturates: bool) -> Tensor:  # fmt: skip
    """graphquant::qconv1d / qconv2d / qconv3d (``saturates``: :class:`SaturationProbe`'s answer)."""
    _ts_check(x, x_zero_point, w, w_scale, bias, out_zero_point, w.size(0))
    out_shape = _ts_conv_out_shape(x, w, stride, padding, dilation, groups)
    if not w.is_mkldnn:
        acc = portable.conv_nd(x.double() - x_zero_point, w.double(), stride, padding, dilation, groups)
        return portable.requantize(acc, x_scale, w_scale, bias, out_scale, out_zero_point, post_op, post_op_args, 1,
                                   None)  # fmt: skip
    return onednn.qconv_run(x, x_scale, x_zero_point, w, w_scale, torch.zeros(w.size(0), dtype=torch.int64), bias,
                            stride, padding, dilation, groups, out_scale, out_zero_point, post_op, post_op_args, x_qmax,
                            saturates, out_shape)  # fmt: skip


def _ts_qconv_add(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                  stride: list[int], padding: list[int], dilation: list[int], groups: int, accum: Tensor,
                  accum_scale: float, accum_zero_point: int, out_scale: float, out_zero_point: int,
                  post_op: str, accum_donated: bool, x_qmax: int, saturates: bool) -> Tensor:  # fmt: skip
    """graphquant::qconv1d_add / qconv2d_add: ``post_op(conv(x) + accum)``."""
    _ts_check(x, x_zero_point, w, w_scale, bias, out_zero_point, w.size(0))
    if post_op != "none" and post_op != "relu":
        raise ValueError("graphquant::qconv_add: only relu follows the residual sum")
    out_shape = _ts_conv_out_shape(x, w, stride, padding, dilation, groups)
    if accum.dtype != torch.uint8 or accum.shape != out_shape:
        raise ValueError("graphquant::qconv_add: accum must be uint8 of the output's shape")
    if accum_zero_point < 0 or accum_zero_point > 255:
        raise ValueError("graphquant::qconv_add: uint8 zero points must lie in [0, 255]")
    if not w.is_mkldnn:
        acc = portable.conv_nd(x.double() - x_zero_point, w.double(), stride, padding, dilation, groups)
        other = (accum.double() - accum_zero_point) * accum_scale
        return portable.requantize(acc, x_scale, w_scale, bias, out_scale, out_zero_point, post_op, [], 1, other)
    if x.dim() != 3 and x.dim() != 4:
        raise ValueError("graphquant::qconv_add: oneDNN fuses the residual sum into 1-d and 2-d convs only")
    return onednn.qconv_add_run(x, x_scale, x_zero_point, w, w_scale, torch.zeros(w.size(0), dtype=torch.int64), bias,
                                stride, padding, dilation, groups, accum, accum_scale, accum_zero_point, out_scale,
                                out_zero_point, post_op, accum_donated, x_qmax, saturates, out_shape)  # fmt: skip


def _ts_qconv_transpose(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor,
                        bias: Tensor | None, stride: list[int], padding: list[int], output_padding: list[int],
                        groups: int, dilation: list[int], out_scale: float, out_zero_point: int, post_op: str,
                        post_op_args: list[float]) -> Tensor:  # fmt: skip
    """graphquant::qconv_transposeNd (portable on both backends)."""
    if x.dtype != torch.uint8 or w.dtype != torch.int8:
        raise ValueError("graphquant::qconv_transpose: wants a uint8 activation and an int8 weight")
    if x.dim() != w.dim() or x.dim() < 3 or x.dim() > 5 or x.size(1) != w.size(0):
        raise ValueError("graphquant::qconv_transpose: input does not fit its weight")
    return portable.qconv_transpose_math(x, x_scale, x_zero_point, w, w_scale, bias, stride, padding, output_padding,
                                         groups, dilation, out_scale, out_zero_point, post_op,
                                         post_op_args)  # fmt: skip


def _ts_qlinear(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                out_scale: float, out_zero_point: int, post_op: str, post_op_args: list[float],
                float_out: bool, x_qmax: int, saturates: bool) -> Tensor:  # fmt: skip
    """graphquant::qlinear. A packed weight is stored transposed, ``(in, out)``."""
    if float_out:
        out_scale, out_zero_point = 1.0, 0
    if not w.is_mkldnn:
        _ts_check(x, x_zero_point, w, w_scale, bias, out_zero_point, w.size(0))
        acc = F.linear(x.double() - x_zero_point, w.double())
        return portable.requantize(acc, x_scale, w_scale, bias, out_scale, out_zero_point, post_op, post_op_args, -1,
                              None, float_out)  # fmt: skip
    in_features, out_features = w.size(0), w.size(1)
    _ts_check(x, x_zero_point, w, w_scale, bias, out_zero_point, out_features)
    if x.dim() < 1 or x.size(-1) != in_features:
        raise ValueError("graphquant::qlinear: input does not end in the weight's in_features")
    w_zero_point = torch.zeros(out_features, dtype=torch.int64)
    return onednn.qlinear_run(x, x_scale, x_zero_point, w, w_scale, w_zero_point, bias, out_scale, out_zero_point,
                              post_op, post_op_args, float_out, x_qmax, saturates)  # fmt: skip


def _ts_dequantize_dynamic(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return (q.to(torch.float32) - zero_point.to(torch.float32)) * scale


def _ts_qlinear_dynamic(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None, per_token: bool,
                        post_op: str, post_op_args: list[float], x_qmax: int, asymmetric: bool,
                        saturates: bool) -> Tensor:  # fmt: skip
    """graphquant::qlinear_dynamic: float32 in and out, int8 GEMM inside, then the post-op."""
    out_features = w.size(1) if w.is_mkldnn else w.size(0)
    in_features = w.size(0) if w.is_mkldnn else w.size(1)
    if x.dtype != torch.float32 or x.dim() < 1 or x.size(-1) != in_features:
        raise ValueError("graphquant::qlinear_dynamic: input must be float32 ending in the weight's in_features")
    if x.numel() == 0:
        shape = list(x.shape[:-1])
        shape.append(out_features)
        return x.new_empty(shape)
    return dynamic.qlinear_dynamic_math(x.contiguous(), w, w.is_mkldnn, w_scale,
                                        torch.zeros(out_features, dtype=torch.int64), bias, per_token, post_op,
                                        post_op_args, x_qmax, saturates, asymmetric)  # fmt: skip


def check_input(x: Tensor, position: int, name: str, dtype: torch.dtype, device: str, sizes: list[int],
                    dynamic_batch: bool, batch_of: Tensor, captured: str, cast: str) -> None:  # fmt: skip
    """inputs.InputCheck, one input: ``batch_of`` is the first input with a dynamic batch."""
    where = "graphquant: <model> input " + str(position) + " (" + name + ")"
    captured = "the model was captured with " + captured
    if x.dtype != dtype:
        raise ValueError(where + " has the wrong dtype; " + captured + ". Cast it with " + name + cast)
    if str(x.device) != device:
        raise ValueError(where + " is on " + str(x.device) + "; " + captured + ". Move it with " + name + ".to('"
                         + device + "')")  # fmt: skip
    shape = x.shape
    if len(shape) != len(sizes):
        raise ValueError(where + " is " + str(len(shape)) + "-d with shape " + str(shape) + "; " + captured
                         + ". Pass inputs of that rank, or re-quantize with example inputs of that shape")  # fmt: skip
    if len(shape) > 0 and shape[0] == 0:
        raise ValueError(where + " has batch size 0 (shape " + str(shape) + "); " + captured
                         + ". Skip empty batches: there is nothing to compute")  # fmt: skip
    for dim in range(len(shape)):
        if dim == 0 and dynamic_batch:
            if shape[0] != batch_of.size(0):
                raise ValueError(where + " has batch size " + str(shape[0]) + ", but an earlier input has "
                                 + str(batch_of.size(0)) + "; give every input the same batch size")  # fmt: skip
        elif shape[dim] != sizes[dim]:
            raise ValueError(where + " has shape " + str(shape) + ": dimension " + str(dim) + " must be "
                             + str(sizes[dim]) + ", got " + str(shape[dim]) + "; " + captured
                             + ". Pass inputs of that shape, or re-quantize with example inputs of that shape")


fx.node.has_side_effect(check_input)  # no users: kept through dead-code elimination


def _ts_linear_fp16(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    if w.dtype != torch.float16:
        raise ValueError("graphquant::linear_fp16: weight must be float16")
    return F.linear(x, w.float(), bias)


# twins that call oneDNN's GEMM / conv: their last argument is SaturationProbe's answer (kernels.x86)
ASK_SATURATION = {"qconv1d", "qconv2d", "qconv3d", "qconv1d_add", "qconv2d_add", "qlinear", "qlinear_dynamic"}
# graphquant op name -> its TorchScript twin
TORCHSCRIPT_KERNELS: dict[str, Any] = {
    "quantize_per_tensor": ops.quantize_per_tensor_math,
    "dequantize_per_tensor": ops.dequantize_per_tensor_math,
    "quantize_per_channel": ops.quantize_per_channel_math,
    "dequantize_per_channel": ops.dequantize_per_channel_math,
    "qconv1d": _ts_qconv,
    "qconv2d": _ts_qconv,
    "qconv3d": _ts_qconv,
    "qconv1d_add": _ts_qconv_add,
    "qconv2d_add": _ts_qconv_add,
    "qconv_transpose1d": _ts_qconv_transpose,
    "qconv_transpose2d": _ts_qconv_transpose,
    "qconv_transpose3d": _ts_qconv_transpose,
    "qlinear": _ts_qlinear,
    "quantize_dynamic": quantize_dynamic_batch,
    "dequantize_dynamic": _ts_dequantize_dynamic,
    "qlinear_dynamic": _ts_qlinear_dynamic,
    "linear_fp16": _ts_linear_fp16,
    **elementwise.TORCHSCRIPT,
    **embedding.TORCHSCRIPT,
}


def _ts_pack_conv(w: Tensor, w_scale: Tensor, x_scale: float, x_zero_point: int, stride: list[int],
                  padding: list[int], dilation: list[int], groups: int, x_shape: list[int]) -> Tensor:  # fmt: skip
    """kernels.onednn.pack_conv (``x_shape`` empty: no layout hint)."""
    hint: list[int] | None = None
    if len(x_shape) > 0:
        hint = x_shape
    return torch.ops.onednn.qconv_prepack(w.contiguous(), w_scale.float(), x_scale, x_zero_point, stride, padding,
                                          onednn_dilation(w, dilation), groups, hint)  # fmt: skip


ConvState = tuple[Tensor, Tensor, float, int, list[int], list[int], list[int], int, list[int], bool]


class PackedConvWeight(nn.Module):
    """A oneDNN conv weight in a TorchScript module: saved as int8, packed again on load.

    (No class-level attribute annotations: TorchScript cannot read them as strings.)
    """

    def __init__(self, w_int8: Tensor, w_scale: Tensor, x_scale: float, x_zero_point: int, stride: list[int],
                 padding: list[int], dilation: list[int], groups: int, x_shape: list[int],
                 packed: Tensor) -> None:  # fmt: skip
        super().__init__()
        self.w_int8, self.w_scale, self.x_scale, self.x_zero_point = w_int8, w_scale, x_scale, x_zero_point
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.x_shape = x_shape  # pack_conv's layout hint, [] for none
        self.packed = packed

    def forward(self) -> Tensor:
        return self.packed

    @torch.jit.export
    def __getstate__(self) -> ConvState:
        return (self.w_int8, self.w_scale, self.x_scale, self.x_zero_point, self.stride, self.padding, self.dilation,
                self.groups, self.x_shape, self.training)  # fmt: skip

    @torch.jit.export
    def __setstate__(self, state: ConvState) -> None:
        self.w_int8, self.w_scale, self.x_scale, self.x_zero_point = state[0], state[1], state[2], state[3]
        self.stride, self.padding, self.dilation, self.groups = state[4], state[5], state[6], state[7]
        self.x_shape, self.training = state[8], state[9]
        self.packed = _ts_pack_conv(self.w_int8, self.w_scale, self.x_scale, self.x_zero_point, self.stride,
                                    self.padding, self.dilation, self.groups, self.x_shape)  # fmt: skip


# the one attribute whose value cannot tell TorchScript its type (an empty list: no hint)
PackedConvWeight.__annotations__ = {"x_shape": typing.List[int]}  # noqa: UP006


class PackedLinearWeight(nn.Module):
    """A oneDNN linear weight in a TorchScript module: saved as int8, packed again on load."""

    def __init__(self, w_int8: Tensor, packed: Tensor) -> None:
        super().__init__()
        self.w_int8 = w_int8
        self.packed = packed

    def forward(self) -> Tensor:
        return self.packed

    @torch.jit.export
    def __getstate__(self) -> tuple[Tensor, bool]:
        return self.w_int8, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[Tensor, bool]) -> None:
        self.w_int8 = state[0]
        self.training = state[1]
        self.packed = torch.ops.onednn.qlinear_prepack(self.w_int8.contiguous(), None)
