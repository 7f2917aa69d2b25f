"""``graphquant::qconv{1,2,3}d``, ``qconv{1,2}d_add`` and ``qconv_transpose{1,2,3}d``: uint8
convolutions with per-channel int8 weights, uint8 out.

The eager kernel runs on its weight's backend (a packed oneDNN weight: :mod:`.onednn`, a plain
int8 one: :mod:`.portable`); the TorchScript body below computes the same, op for op, in
TorchScript's subset (same aten / onednn calls in the same order, the shared ``*_run`` bodies),
so outputs are bit-identical.
"""

from __future__ import annotations

import torch
from torch import Tensor

from graphquant.kernels import onednn, portable
from graphquant.kernels.registry import Kernel, register
from graphquant.kernels.scripted import check_weighted

# A post-op is a name and its scalars (kernels.portable.POST_OPS): "hardtanh", [0.0, 6.0].
POST_OP = "str post_op, float[] post_op_args=[]"
# x_qmax: the largest value x can hold on its grid (127 for reduce_range's 7-bit activations). On
# x86 CPUs without VNNI a oneDNN GEMM or conv is exact in one call for x_qmax <= 127 and runs as the
# exact float32 op over the integer values above it (kernels/x86.py); other backends ignore it.
X_QMAX = "int x_qmax=255"
_QCONV = (
    "(Tensor x, float x_scale, int x_zero_point, Tensor w, Tensor w_scale, Tensor? bias, int[] stride, "
    f"int[] padding, int[] dilation, int groups, float out_scale, int out_zero_point, {POST_OP}, {X_QMAX}) -> Tensor"
)
# post_op(conv(x) + accum), accum a uint8 activation of the output's shape (ResNet's residual join).
# accum_donated: the graph never reads accum after this call (passes.fuse.donate_accumulators
# proves it at convert), so oneDNN may write the sum into it instead of into a copy.
_QCONV_ADD = (
    "(Tensor x, float x_scale, int x_zero_point, Tensor w, Tensor w_scale, Tensor? bias, int[] stride, "
    "int[] padding, int[] dilation, int groups, Tensor accum, float accum_scale, int accum_zero_point, "
    f"float out_scale, int out_zero_point, str post_op, bool accum_donated=False, {X_QMAX}) -> Tensor"
)
# weight (in, out / groups, *kernel), w_scale along its axis 0; argument order of aten.conv_transposeNd
_QCONV_TRANSPOSE = (
    "(Tensor x, float x_scale, int x_zero_point, Tensor w, Tensor w_scale, Tensor? bias, int[] stride, "
    "int[] padding, int[] output_padding, int groups, int[] dilation, float out_scale, int out_zero_point, "
    f"{POST_OP}) -> Tensor"
)


def _conv_fake(x, x_scale, x_zero_point, w, w_scale, bias, stride, padding, dilation, groups, *rest, **kwargs):  # type: ignore[no-untyped-def]  # noqa: E501
    kernel = w.shape[-(x.dim() - 2):]  # a packed conv1d weight is 4-d (out, in, 1, k)
    spatial = []
    for i, size in enumerate(x.shape[2:]):
        spatial.append((size + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1)
    return x.new_empty((x.shape[0], w.shape[0], *spatial), dtype=torch.uint8)


def _conv_transpose_fake(x, x_scale, x_zero_point, w, w_scale, bias, stride, padding, output_padding, groups,  # type: ignore[no-untyped-def]  # noqa: E501
                         dilation, *rest, **kwargs):
    spatial = []
    for i, size in enumerate(x.shape[2:]):
        k = w.shape[2 + i]
        spatial.append((size - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k - 1) + output_padding[i] + 1)
    return x.new_empty((x.shape[0], w.shape[1] * groups, *spatial), dtype=torch.uint8)


def _conv_out_shape(x: Tensor, w: Tensor, stride: list[int], padding: list[int], dilation: list[int],
                    groups: int) -> list[int]:
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


def qconv_torchscript(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                      stride: list[int], padding: list[int], dilation: list[int], groups: int, out_scale: float,
                      out_zero_point: int, post_op: str, post_op_args: list[float], x_qmax: int, packed: bool,
                      saturates: bool) -> Tensor:
    """graphquant::qconv1d / qconv2d / qconv3d."""
    check_weighted(x, x_zero_point, w, w_scale, bias, out_zero_point, w.size(0))
    out_shape = _conv_out_shape(x, w, stride, padding, dilation, groups)
    if not packed:
        acc = portable.conv_nd(x.double() - x_zero_point, w.double(), stride, padding, dilation, groups)
        return portable.requantize(acc, x_scale, w_scale, bias, out_scale, out_zero_point, post_op, post_op_args, 1,
                                   None)
    return onednn.qconv_run(x, x_scale, x_zero_point, w, w_scale, torch.zeros(w.size(0), dtype=torch.int64), bias,
                            stride, padding, dilation, groups, out_scale, out_zero_point, post_op, post_op_args, x_qmax,
                            saturates, out_shape)


def qconv_add_torchscript(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor,
                          bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                          accum: Tensor, accum_scale: float, accum_zero_point: int, out_scale: float,
                          out_zero_point: int, post_op: str, accum_donated: bool, x_qmax: int, packed: bool,
                          saturates: bool) -> Tensor:
    """graphquant::qconv1d_add / qconv2d_add: ``post_op(conv(x) + accum)``."""
    check_weighted(x, x_zero_point, w, w_scale, bias, out_zero_point, w.size(0))
    if post_op != "none" and post_op != "relu":
        raise ValueError("graphquant::qconv_add: only relu follows the residual sum")
    out_shape = _conv_out_shape(x, w, stride, padding, dilation, groups)
    if accum.dtype != torch.uint8 or list(accum.shape) != out_shape:  # a list in Python as in TorchScript
        raise ValueError("graphquant::qconv_add: accum must be uint8 of the output's shape")
    if accum_zero_point < 0 or accum_zero_point > 255:
        raise ValueError("graphquant::qconv_add: uint8 zero points must lie in [0, 255]")
    if not packed:
        acc = portable.conv_nd(x.double() - x_zero_point, w.double(), stride, padding, dilation, groups)
        other = (accum.double() - accum_zero_point) * accum_scale
        return portable.requantize(acc, x_scale, w_scale, bias, out_scale, out_zero_point, post_op, [], 1, other)
    if x.dim() != 3 and x.dim() != 4:
        raise ValueError("graphquant::qconv_add: oneDNN fuses the residual sum into 1-d and 2-d convs only")
    return onednn.qconv_add_run(x, x_scale, x_zero_point, w, w_scale, torch.zeros(w.size(0), dtype=torch.int64), bias,
                                stride, padding, dilation, groups, accum, accum_scale, accum_zero_point, out_scale,
                                out_zero_point, post_op, accum_donated, x_qmax, saturates, out_shape)


def qconv_transpose_torchscript(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor,
                                bias: Tensor | None, stride: list[int], padding: list[int], output_padding: list[int],
                                groups: int, dilation: list[int], out_scale: float, out_zero_point: int, post_op: str,
                                post_op_args: list[float]) -> Tensor:
    """graphquant::qconv_transposeNd (portable on both backends: torch.ops.onednn has no int8 transposed conv)."""
    if x.dtype != torch.uint8 or w.dtype != torch.int8:
        raise ValueError("graphquant::qconv_transpose: wants a uint8 activation and an int8 weight")
    if x.dim() != w.dim() or x.dim() < 3 or x.dim() > 5 or x.size(1) != w.size(0):
        raise ValueError("graphquant::qconv_transpose: input does not fit its weight")
    return portable.qconv_transpose_math(x, x_scale, x_zero_point, w, w_scale, bias, stride, padding, output_padding,
                                         groups, dilation, out_scale, out_zero_point, post_op,
                                         post_op_args)


qconv = onednn.on_weight_backend("qconv")
qconv_add = onednn.on_weight_backend("qconv_add")

for _dim in (1, 2, 3):
    register(Kernel(f"qconv{_dim}d", _QCONV, _conv_fake, qconv, qconv_torchscript,
                    planner=onednn.qconv_plan if _dim == 2 else None, gemm=True, weighted=True, bias_corrected=True,
                    timed=True))
for _dim in (1, 2):
    register(Kernel(f"qconv{_dim}d_add", _QCONV_ADD, _conv_fake, qconv_add, qconv_add_torchscript,
                    planner=onednn.qconv_add_plan if _dim == 2 else None,
                    planned_inputs=(onednn.QCONV_ADD_ACCUM,) if _dim == 2 else (), gemm=True, weighted=True,
                    bias_corrected=True, timed=True))
for _dim in (1, 2, 3):
    register(Kernel(f"qconv_transpose{_dim}d", _QCONV_TRANSPOSE, _conv_transpose_fake, portable.qconv_transpose,
                    qconv_transpose_torchscript, weighted=True, timed=True))
