"""Exact int8 on every x86 CPU: whether oneDNN's int8 kernels saturate in this process, and the
oneDNN calls every runtime makes, exact where they do.

Without VNNI (AVX2, AVX-512 before Cascade Lake, or a VNNI CPU run with
``ONEDNN_MAX_CPU_ISA=AVX2``) x86 int8 kernels multiply uint8 by int8 with ``vpmaddubsw``, which
adds each pair of neighbouring products in int16 and saturates at 32767: ``255 * 127 * 2 = 64770``.
A pair stays exact when the uint8 values are at most 127 (``127 * 128 * 2 = 32512``), whatever
the zero point (oneDNN subtracts it after the products, as a compensation term).

What happens here, only where :func:`probe_saturates` found saturation:

- an activation whose grid ends at 127 (``x_qmax``: ``reduce_range``'s 7-bit activations, which
  the kernel graph clamps there): one oneDNN call, exact by range;
- otherwise the activation runs as two 7-bit halves, ``x = 2 * (x >> 1) + (x & 1)``: two oneDNN
  calls with the same packed weight and float32 out, ``x_scale`` doubled for the high half and the
  zero point split the same way (``zp = 2 * (zp >> 1) + (zp & 1)``), so each half's integer sum
  is exact; their float sum, the post-op and the one rounding to the output grid follow in float32,
  as oneDNN does them inside one call. About twice the int8 GEMM (``benchmarks/isa_kernels.py``).

The choice follows the grid, not the data: no pass over the activation to find its maximum
(measured 140 us a conv on ResNet-50), and the same path for every batch.

Every function here is TorchScript-compatible: the eager kernels (:mod:`graphquant.kernels.onednn`,
:mod:`graphquant.kernels.dynamic`) and their TorchScript twins call the same code, and a scripted
model asks :class:`SaturationProbe` (probed again when ``torch.jit.load`` builds it) instead of
:func:`saturates`, so a model saved on one CPU and loaded on another takes the right path there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SEVEN_BIT_MAX = 127  # the largest uint8 activation no x86 int8 kernel can saturate on
# (TorchScript reads no module constants: the functions below spell 127 and the probe's numbers out)

Scalars = list[int | float | complex | None]  # TorchScript's Scalar?[] (oneDNN post-op scalars)


def _probe_linear() -> bool:
    # K = 64 products of 255 * 127: the exact sum 2072640 is exact in float32 (< 2 ** 24)
    x = torch.full([1, 64], 255, dtype=torch.uint8)
    w = torch.ops.onednn.qlinear_prepack(torch.full([8, 64], 127, dtype=torch.int8), None)
    empty: Scalars = []
    y = torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, w, torch.ones(8), torch.zeros(8, dtype=torch.int64), None,
                                           1.0, 0, torch.float32, "none", empty, "")  # fmt: skip
    return bool((y - 2072640.0).abs().max() > 0.5)


def _probe_conv() -> bool:
    x = torch.full([1, 64, 4, 4], 255, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    w_scale = torch.ones(8)
    w = torch.ops.onednn.qconv_prepack(torch.full([8, 64, 1, 1], 127, dtype=torch.int8), w_scale, 1.0, 0,
                                       [1, 1], [0, 0], [1, 1], 1, None)  # fmt: skip
    empty: Scalars = []
    y = torch.ops.onednn.qconv_pointwise(x, 1.0, 0, w, w_scale, torch.zeros(8, dtype=torch.int64), None, [1, 1],
                                         [0, 0], [1, 1], 1, 1.0, 0, torch.float32, "none", empty, "")  # fmt: skip
    return bool((y - 2072640.0).abs().max() > 0.5)


def probe_saturates() -> bool:
    """Whether oneDNN's uint8 x int8 GEMM or conv saturates in this process: one tiny linear and
    one 1x1 conv whose every product pair is ``255 * 127 * 2``, against the exact sum. Sees
    ``ONEDNN_MAX_CPU_ISA``, which ``torch.cpu._is_vnni_supported()`` does not. About 1 ms."""
    return _probe_linear() or _probe_conv()


_SATURATES: list[bool] = []


def saturates() -> bool:
    """:func:`probe_saturates`, run once per process (False where this PyTorch has no oneDNN int8 ops)."""
    if not _SATURATES:
        available = bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.onednn, "qlinear_pointwise")
        _SATURATES.append(available and probe_saturates())
    return _SATURATES[0]


def cpu_path(x_qmax: int | None = None) -> str:
    """The path an int8 layer takes on this CPU, for reports: ``"vnni"`` (one exact call),
    ``"7-bit"`` (saturating CPU, activations of at most 7 bits: one call, exact by range) or
    ``"avx2-split"`` (saturating CPU, 8-bit activations: two exact 7-bit halves)."""
    if not saturates():
        return "vnni"
    return "7-bit" if x_qmax is not None and x_qmax <= SEVEN_BIT_MAX else "avx2-split"


class SaturationProbe(nn.Module):
    """A scripted model's answer to :func:`saturates`: probed when built and again when
    ``torch.jit.load`` builds it (``__setstate__``), on the machine that runs it. Nothing of the
    machine that saved it is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.saturates = probe_saturates()

    def forward(self) -> bool:
        return self.saturates

    @torch.jit.export
    def __getstate__(self) -> tuple[bool, bool]:
        return (False, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[bool, bool]) -> None:
        self.training = state[1]
        self.saturates = probe_saturates()


# ---------------------------------------------------------------------------------------------
# the oneDNN calls, exact on every CPU


def scalars(post_op: str, values: list[float]) -> Scalars:
    """``post_op``'s scalars as oneDNN takes them (TorchScript's ``Scalar?[]``); none for ``"none"``,
    whose callers may pass the scalars of a post-op they apply after the call (a clamp on the grid)."""
    out: Scalars = []
    if post_op != "none":
        for value in values:
            out.append(value)
    return out


def onednn_post_op(post_op: str) -> tuple[str, str]:
    """graphquant post-op name -> oneDNN ``(attr, algorithm)``."""
    if post_op == "silu":
        return "swish", ""
    if post_op == "gelu":
        return "gelu", "none"
    if post_op == "gelu_tanh":
        return "gelu", "tanh"
    return post_op, ""


def post_op_float(v: Tensor, post_op: str, args: list[float]) -> Tensor:
    """:data:`graphquant.kernels.portable.POST_OPS` on real values."""
    if post_op == "none":
        return v
    if post_op == "relu":
        return v.clamp_min(0.0)
    if post_op == "hardtanh":
        return v.clamp(args[0], args[1])
    if post_op == "hardswish":
        return F.hardswish(v)
    if post_op == "silu":
        return F.silu(v)
    if post_op == "gelu":
        return F.gelu(v)
    if post_op == "gelu_tanh":
        return F.gelu(v, approximate="tanh")
    if post_op == "leaky_relu":
        return F.leaky_relu(v, args[0])
    raise ValueError("graphquant: unknown post_op " + post_op)


def quantize_real(v: Tensor, out_scale: float, out_zero_point: int) -> Tensor:
    """Real values to the uint8 output grid (kernels.portable.quantize_real)."""
    return (torch.round(v / out_scale) + out_zero_point).clamp(0, 255).to(torch.uint8)


def split(x_qmax: int, saturates: bool) -> bool:
    """Whether a call takes the two-half path: the CPU saturates and the activation's grid
    reaches past 127."""
    return saturates and x_qmax > 127


def _finish(v: Tensor, out_scale: float, out_zero_point: int, out_dtype: torch.dtype | None, post_op: str,
            post_op_args: list[float]) -> Tensor:  # fmt: skip
    """The split's float32 sum -> post-op -> what the single call would return."""
    v = post_op_float(v, post_op, post_op_args)
    if out_dtype is not None:  # float32 out: graphquant asks for it with out_scale 1, out_zero_point 0
        return v
    return quantize_real(v, out_scale, out_zero_point)


def qlinear_call(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor, w_zero_point: Tensor,
                 bias: Tensor | None, out_scale: float, out_zero_point: int,
                 out_dtype: torch.dtype | None, post_op: str, post_op_args: list[float], x_qmax: int,
                 saturates: bool) -> Tensor:  # fmt: skip
    """``onednn::qlinear_pointwise`` on checked arguments (``x`` contiguous uint8 on a grid ending at
    ``x_qmax``, ``w`` packed), exact where the CPU saturates (module docstring)."""
    if not split(x_qmax, saturates):
        attr, algorithm = onednn_post_op(post_op)
        return torch.ops.onednn.qlinear_pointwise(x, x_scale, x_zero_point, w, w_scale, w_zero_point, bias, out_scale,
                                                  out_zero_point, out_dtype, attr, scalars(post_op, post_op_args),
                                                  algorithm)  # fmt: skip
    empty: Scalars = []
    v = torch.ops.onednn.qlinear_pointwise(torch.bitwise_right_shift(x, 1), 2.0 * x_scale, x_zero_point >> 1, w,
                                           w_scale, w_zero_point, bias, 1.0, 0, torch.float32, "none", empty, "")
    v.add_(torch.ops.onednn.qlinear_pointwise(torch.bitwise_and(x, 1), x_scale, x_zero_point & 1, w, w_scale,
                                              w_zero_point, None, 1.0, 0, torch.float32, "none", empty, ""))
    return _finish(v, out_scale, out_zero_point, out_dtype, post_op, post_op_args)


def qlinear_dynamic_call(q: Tensor, scale: Tensor, zero_point: Tensor, w: Tensor, w_scale: Tensor,
                         w_zero_point: Tensor, bias: Tensor | None, post_op: str, post_op_args: list[float],
                         saturates: bool) -> Tensor:  # fmt: skip
    """``onednn::qlinear_pointwise.tensor``: a per-tensor dynamic linear, its uint8 activation's
    ``scale`` and ``zero_point`` 0-d tensors from the batch, float32 out; exact where the CPU saturates."""
    if not split(255, saturates):
        attr, algorithm = onednn_post_op(post_op)
        return torch.ops.onednn.qlinear_pointwise(q, scale, zero_point, w, w_scale, w_zero_point, bias, 1.0, 0,
                                                  torch.float32, attr, scalars(post_op, post_op_args),
                                                  algorithm)  # fmt: skip
    return qlinear_call(q, float(scale.item()), int(zero_point.item()), w, w_scale, w_zero_point, bias, 1.0, 0,
                        torch.float32, post_op, post_op_args, 255, saturates)  # fmt: skip


def qconv_call(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor, w_zero_point: Tensor,
               bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
               groups: int, out_scale: float, out_zero_point: int, out_dtype: torch.dtype | None,
               post_op: str, post_op_args: list[float], x_qmax: int, saturates: bool) -> Tensor:  # fmt: skip
    """``onednn::qconv_pointwise`` on checked arguments (``post_op`` one the conv fuses), exact
    where the CPU saturates (module docstring)."""
    if not split(x_qmax, saturates):
        attr, algorithm = onednn_post_op(post_op)
        return torch.ops.onednn.qconv_pointwise(x, x_scale, x_zero_point, w, w_scale, w_zero_point, bias, stride,
                                                padding, dilation, groups, out_scale, out_zero_point, out_dtype,
                                                attr, scalars(post_op, post_op_args), algorithm)  # fmt: skip
    v = _conv_split(x, x_scale, x_zero_point, w, w_scale, w_zero_point, bias, stride, padding, dilation, groups)
    return _finish(v, out_scale, out_zero_point, out_dtype, post_op, post_op_args)


def _conv_split(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor, w_zero_point: Tensor,
                bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
                groups: int) -> Tensor:  # fmt: skip
    """``conv(x - zp) * x_scale * w_scale + bias`` in float32, from two exact 7-bit halves."""
    empty: Scalars = []
    v = torch.ops.onednn.qconv_pointwise(torch.bitwise_right_shift(x, 1), 2.0 * x_scale, x_zero_point >> 1, w,
                                         w_scale, w_zero_point, bias, stride, padding, dilation, groups, 1.0, 0,
                                         torch.float32, "none", empty, "")  # fmt: skip
    return v.add_(torch.ops.onednn.qconv_pointwise(torch.bitwise_and(x, 1), x_scale, x_zero_point & 1, w, w_scale,
                                                   w_zero_point, None, stride, padding, dilation, groups, 1.0, 0,
                                                   torch.float32, "none", empty, ""))  # fmt: skip


def qconv_add_call(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor, w_zero_point: Tensor,
                   accum: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                   dilation: list[int], groups: int, out_scale: float, out_zero_point: int, accum_scale: float,
                   accum_zero_point: int, post_op: str, x_qmax: int, saturates: bool) -> Tensor:  # fmt: skip
    """``onednn::qconv2d_pointwise.binary`` with the "sum" post-op (``post_op(conv(x) + accum)``,
    written into ``accum``, a channels-last uint8 tensor the caller gives away), exact where the
    CPU saturates: there the sum is taken in float32 and copied into ``accum``, as oneDNN writes it."""
    if not split(x_qmax, saturates):
        empty: Scalars = []
        return torch.ops.onednn.qconv2d_pointwise(x, x_scale, x_zero_point, w, w_scale, w_zero_point, accum, bias,
                                                  stride, padding, dilation, groups, out_scale, out_zero_point, None,
                                                  accum_scale, accum_zero_point, "sum", 1.0, post_op, empty,
                                                  "")  # fmt: skip
    v = _conv_split(x, x_scale, x_zero_point, w, w_scale, w_zero_point, bias, stride, padding, dilation, groups)
    v.add_((accum.to(torch.float32) - accum_zero_point) * accum_scale)
    return accum.copy_(_finish(v, out_scale, out_zero_point, None, post_op, []))
