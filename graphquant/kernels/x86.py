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
- otherwise the layer runs as the float32 GEMM / conv over the integer values: ``x_q - zp`` and
  ``w_q`` held as float32 (every product ``|255 * 128|`` is exact in float32; the sum rounds like
  float, far inside one output step), scaled by ``x_scale * w_scale``, plus the bias, the post-op
  and the one rounding to the output grid, as oneDNN does them inside one call. The weight's
  float32 copy is made from the packed weight (``to_dense``) once per weight in eager PyTorch
  (:func:`int_weight`; 4 bytes a weight, only on such a CPU) and on every call in TorchScript;
- except a conv whose weight is large beside its output (:data:`TWO_CALLS_WEIGHTS_PER_OUTPUT`),
  where a float32 conv pays for reordering its weight on every call: it runs as two int8 calls on
  the activation's 7-bit halves ``x = 2 * (x >> 1) + (x & 1)``, each exact.

Measured per layer (docs/x86.md, ``benchmarks/x86_layers.py``): over the integers takes 0.6-1.04x
the time of two int8 calls on MobileNetV2, MiniLM and ResNet-50 layers, 1.9-2.6x on the
large-weight convs; whole models run at 0.76-0.92x fp32 on 8-bit layers.

The choice follows the grid and the shapes, not the data: no pass over the activation to find its
maximum (measured 140 us a conv on ResNet-50), and the same path for every batch of a shape.

Every function here is TorchScript-compatible: the eager kernels (:mod:`graphquant.kernels.onednn`,
:mod:`graphquant.kernels.dynamic`) and their TorchScript bodies call the same code, and a scripted
model asks :class:`SaturationProbe` (probed again when ``torch.jit.load`` builds it) instead of
:func:`saturates`, so a model saved on one CPU and loaded on another takes the right path there.
"""

from __future__ import annotations

import weakref

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
                                           1.0, 0, torch.float32, "none", empty, "")
    return bool((y - 2072640.0).abs().max() > 0.5)


def _probe_conv(channels: int, groups: int, kernel: int) -> bool:
    """A conv of all-255 uint8 activations and all-127 int8 weights, float32 out, against its exact
    sum ``channels / groups * kernel**2 * 255 * 127`` (exact in float32 for the sizes used)."""
    x = torch.full([1, channels, kernel + 3, kernel + 3], 255, dtype=torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    w_scale = torch.ones(8)
    w = torch.ops.onednn.qconv_prepack(torch.full([8, channels // groups, kernel, kernel], 127, dtype=torch.int8),
                                       w_scale, 1.0, 0, [1, 1], [0, 0], [1, 1], groups, None)
    empty: Scalars = []
    y = torch.ops.onednn.qconv_pointwise(x, 1.0, 0, w, w_scale, torch.zeros(8, dtype=torch.int64), None, [1, 1],
                                         [0, 0], [1, 1], groups, 1.0, 0, torch.float32, "none", empty,
                                         "")
    exact = float(channels // groups * kernel * kernel * 255 * 127)
    return bool((y - exact).abs().max() > 0.5)


def probe_saturates(depthwise: bool = False) -> bool:
    """Whether oneDNN's uint8 x int8 GEMM or conv saturates in this process: one tiny linear and
    one 1x1 conv whose every product pair is ``255 * 127 * 2``, against the exact sum. Sees
    ``ONEDNN_MAX_CPU_ISA``, which ``torch.cpu._is_vnni_supported()`` does not. About 1 ms.
    ``depthwise``: the same question for oneDNN's depthwise conv, a kernel of its own (on AVX2
    it multiplies in int32 and does not saturate: measured, so asked, not assumed)."""
    if depthwise:  # a 3x3 depthwise conv over 8 channels
        return _probe_conv(8, 8, 3)
    return _probe_linear() or _probe_conv(64, 1, 1)  # a 1x1 conv over 64 channels


_SATURATES: dict[bool, bool] = {}


def saturates(depthwise: bool = False) -> bool:
    """:func:`probe_saturates`, run once per process and kind (False where this PyTorch has no
    oneDNN int8 ops)."""
    if depthwise not in _SATURATES:
        available = bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.onednn, "qlinear_pointwise")
        _SATURATES[depthwise] = available and probe_saturates(depthwise)
    return _SATURATES[depthwise]


def is_depthwise(w: Tensor, groups: int) -> bool:
    """Whether a packed conv weight ``(out, in / groups, *kernel)`` is depthwise (one input and one
    output channel per group), which oneDNN runs with a kernel of its own."""
    return groups > 1 and w.dim() > 2 and w.size(0) == groups and w.size(1) == 1


def cpu_path(x_qmax: int | None = None, depthwise: bool = False) -> str:
    """The path an int8 layer takes on this CPU, for reports: ``"vnni"`` (one exact call),
    ``"int8-dw"`` (saturating CPU, a depthwise conv, whose kernel does not saturate: one call),
    ``"7-bit"`` (saturating CPU, activations of at most 7 bits: one call, exact by range) or
    ``"avx2-fp32"`` (saturating CPU, 8-bit activations: the exact float32 op over the integer values)."""
    if not saturates():
        return "vnni"
    if depthwise and not saturates(True):
        return "int8-dw"
    return "7-bit" if x_qmax is not None and x_qmax <= SEVEN_BIT_MAX else "avx2-fp32"


class SaturationProbe(nn.Module):
    """A scripted model's answer to :func:`saturates` (``depthwise``: for its depthwise convs):
    probed when built and again when ``torch.jit.load`` builds it (``__setstate__``), on the
    machine that runs it. Nothing of the machine that saved it is kept."""

    def __init__(self, depthwise: bool = False) -> None:
        super().__init__()
        self.depthwise = depthwise
        self.saturates = probe_saturates(depthwise)

    def forward(self) -> bool:
        return self.saturates

    @torch.jit.export
    def __getstate__(self) -> tuple[bool, bool]:
        return (self.depthwise, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[bool, bool]) -> None:
        self.depthwise = state[0]
        self.training = state[1]
        self.saturates = probe_saturates(self.depthwise)


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


_INT_WEIGHTS: dict[int, tuple[weakref.ref[Tensor], Tensor]] = {}


def _dense_int_weight(w: Tensor, dim: int) -> Tensor:
    """A packed oneDNN weight's int8 values as float32: a linear's ``(in, out)``, a conv's
    ``(out, in / groups, *kernel)`` with as many dims as its input ``dim`` (a 1-d conv runs as 2-d)."""
    dense = w.to_dense().to(torch.float32)
    while dense.dim() > 2 and dense.dim() < dim:
        dense = dense.unsqueeze(2)
    return dense


@torch.jit.unused
def _cached_int_weight(w: Tensor, dim: int) -> Tensor:
    hit = _INT_WEIGHTS.get(id(w))
    if hit is not None and hit[0]() is w:
        return hit[1]
    for stale in [key for key, (ref, _) in _INT_WEIGHTS.items() if ref() is None]:
        del _INT_WEIGHTS[stale]
    dense = _dense_int_weight(w, dim)
    _INT_WEIGHTS[id(w)] = (weakref.ref(w), dense)
    return dense


def int_weight(w: Tensor, dim: int) -> Tensor:
    """The float32 values of a packed weight for the exact path (:func:`_dense_int_weight`),
    made once per weight in eager PyTorch and kept while the weight lives; TorchScript, which
    has no such cache, makes it on each call (the same values, so the same results)."""
    if torch.jit.is_scripting():
        return _dense_int_weight(w, dim)
    return _cached_int_weight(w, dim)


def over_ints(x_qmax: int, saturates: bool) -> bool:
    """Whether a call takes the exact float32 path over the integer values instead of oneDNN's
    int8 kernel: the CPU saturates and the activation's grid reaches past 127."""
    return saturates and x_qmax > 127


def _finish(v: Tensor, out_scale: float, out_zero_point: int, out_dtype: torch.dtype | None, post_op: str,
            post_op_args: list[float]) -> Tensor:
    """The float32 result (the caller's own tensor) -> post-op -> what oneDNN's call would return;
    :func:`quantize_real`'s rounding, in place."""
    v = post_op_float(v, post_op, post_op_args)
    if out_dtype is not None:  # float32 out: graphquant asks for it with out_scale 1, out_zero_point 0
        return v
    return torch.round(v.div_(out_scale)).add_(out_zero_point).clamp_(0, 255).to(torch.uint8)


def qlinear_call(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor, w_zero_point: Tensor,
                 bias: Tensor | None, out_scale: float, out_zero_point: int,
                 out_dtype: torch.dtype | None, post_op: str, post_op_args: list[float], x_qmax: int,
                 saturates: bool) -> Tensor:
    """``onednn::qlinear_pointwise`` on checked arguments (``x`` contiguous uint8 on a grid ending at
    ``x_qmax``, ``w`` packed), exact where the CPU saturates (module docstring)."""
    if not over_ints(x_qmax, saturates):
        attr, algorithm = onednn_post_op(post_op)
        # the output dtype spelled out (None means uint8 here): the op's meta, which torch.export and
        # Inductor trace through (graphquant.compiled), refuses None
        dtype = torch.uint8 if out_dtype is None else out_dtype
        return torch.ops.onednn.qlinear_pointwise(x, x_scale, x_zero_point, w, w_scale, w_zero_point, bias, out_scale,
                                                  out_zero_point, dtype, attr, scalars(post_op, post_op_args),
                                                  algorithm)
    w_int = int_weight(w, x.dim())  # (in, out), as oneDNN stores a packed linear weight
    v = torch.matmul(x.to(torch.float32).sub_(float(x_zero_point)), w_int).mul_(x_scale * w_scale)
    if bias is not None:
        v.add_(bias)
    return _finish(v, out_scale, out_zero_point, out_dtype, post_op, post_op_args)


def qlinear_dynamic_call(q: Tensor, scale: Tensor, zero_point: Tensor, w: Tensor, w_scale: Tensor,
                         w_zero_point: Tensor, bias: Tensor | None, post_op: str, post_op_args: list[float],
                         x_qmax: int, saturates: bool) -> Tensor:
    """``onednn::qlinear_pointwise.tensor``: a per-tensor dynamic linear, its uint8 activation's
    ``scale`` and ``zero_point`` 0-d tensors from the batch, float32 out; exact where the CPU saturates."""
    if not over_ints(x_qmax, saturates):
        attr, algorithm = onednn_post_op(post_op)
        return torch.ops.onednn.qlinear_pointwise(q, scale, zero_point, w, w_scale, w_zero_point, bias, 1.0, 0,
                                                  torch.float32, attr, scalars(post_op, post_op_args),
                                                  algorithm)
    w_int = int_weight(w, q.dim())
    v = torch.matmul(q.to(torch.float32).sub_(zero_point), w_int).mul_(scale * w_scale)
    if bias is not None:
        v.add_(bias)
    return post_op_float(v, post_op, post_op_args)


def padded_conv3d(x: Tensor, x_zero_point: int, padding: list[int]) -> tuple[Tensor, list[int]]:
    """A padded 3-d conv as the same conv on the input padded explicitly with its zero point (the
    quantized zero) and padding 0: oneDNN's int8 3-d conv (torch 2.13) is silently wrong on some
    padded small inputs (depth 1 with depth padding 1: 1 in 2000 random small shapes at 1 thread,
    10 in 3000 at 2; found by tests/fuzz_kernels.py). One copy of the input per call."""
    if padding[0] == 0 and padding[1] == 0 and padding[2] == 0:
        return x, padding
    pads = [padding[2], padding[2], padding[1], padding[1], padding[0], padding[0]]  # F.pad: last dim first
    return F.pad(x, pads, value=float(x_zero_point)).contiguous(memory_format=torch.channels_last_3d), [0, 0, 0]


def one_output_dims(x: Tensor, w: Tensor, x_zero_point: int, stride: list[int], padding: list[int],
                    dilation: list[int]) -> tuple[Tensor, list[int], list[int]]:
    """A 2-d or 3-d conv with a strided dim of output size 1, as the same conv on the one window
    that output reads (padded explicitly with the zero point, the quantized zero) with stride 1 and
    no padding along that dim.

    oneDNN's int8 conv (torch 2.13) gets such convs wrong, silently: measured on random small
    shapes, up to 30% of 3-d convs with a one-column-wide, width-strided output off from exact
    integer math (1 thread; fewer at 2), and 2 in 3000 random 2-d convs; found by
    tests/fuzz_kernels.py. Rewritten (with :func:`padded_conv3d`): 0 wrong in 11000 random 3-d and
    6000 random 2-d convs at 1 and 2 threads."""
    n = x.dim() - 2
    marked: list[bool] = []
    any_marked = False
    for i in range(n):
        reach = (w.size(w.dim() - n + i) - 1) * dilation[i] + 1
        out = (x.size(2 + i) + 2 * padding[i] - reach) // stride[i] + 1
        one = stride[i] > 1 and out == 1
        marked.append(one)
        any_marked = any_marked or one
    if not any_marked:
        return x, stride, padding
    pads: list[int] = []
    for i in range(n - 1, -1, -1):  # F.pad lists the last dim first
        pads.append(padding[i] if marked[i] else 0)
        pads.append(padding[i] if marked[i] else 0)
    window = F.pad(x, pads, value=float(x_zero_point))
    new_stride: list[int] = []
    new_padding: list[int] = []
    for i in range(n):
        if marked[i]:
            window = window.narrow(2 + i, 0, (w.size(w.dim() - n + i) - 1) * dilation[i] + 1)
            new_stride.append(1)
            new_padding.append(0)
        else:
            new_stride.append(stride[i])
            new_padding.append(padding[i])
    layout = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    return window.contiguous(memory_format=layout), new_stride, new_padding


def _reads_only_padding(size: int, kernel: int, stride: int, padding: int, dilation: int) -> bool:
    """Whether some output position of a dilated, padded conv dim has every tap in the padding."""
    out = (size + 2 * padding - (kernel - 1) * dilation - 1) // stride + 1
    for o in range(out):
        start = o * stride - padding
        inside = False
        for j in range(kernel):
            if 0 <= start + j * dilation < size:
                inside = True
                break
        if not inside:
            return True
    return False


def padded_where_dilation_misses(x: Tensor, w: Tensor, x_zero_point: int, stride: list[int], padding: list[int],
                                 dilation: list[int]) -> tuple[Tensor, list[int]]:
    """A conv with an output position whose dilated taps all fall in the padding, as the same conv
    on the input padded explicitly with its zero point (the quantized zero) and padding 0.

    oneDNN's int8 conv (torch 2.13) writes out of bounds there: SIGSEGV on x (2, 4, 1, 5, 4),
    w (1, 4, 2, 2, 2), stride 2, padding (1, 0, 1), dilation (2, 1, 1), float32 out, found by
    tests/fuzz_kernels.py. Only dims with dilation > 1 and padding > 0 are looked at, so common
    convs pay nothing."""
    risky = False
    for i in range(len(padding)):
        if dilation[i] > 1 and padding[i] > 0 and not risky:
            risky = _reads_only_padding(x.size(2 + i), w.size(2 + i), stride[i], padding[i], dilation[i])
    if not risky:
        return x, padding
    pads: list[int] = []
    for i in range(len(padding) - 1, -1, -1):  # F.pad lists the last dim first
        pads.append(padding[i])
        pads.append(padding[i])
    layout = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    padded = F.pad(x, pads, value=float(x_zero_point)).contiguous(memory_format=layout)
    zeros: list[int] = []
    for _ in range(len(padding)):
        zeros.append(0)
    return padded, zeros


def qconv_call(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor, w_zero_point: Tensor,
               bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
               groups: int, out_scale: float, out_zero_point: int, out_dtype: torch.dtype | None,
               post_op: str, post_op_args: list[float], x_qmax: int, saturates: bool) -> Tensor:
    """``onednn::qconv_pointwise`` on checked arguments (``post_op`` one the conv fuses), exact
    where the CPU saturates (module docstring)."""
    x, padding = padded_where_dilation_misses(x, w, x_zero_point, stride, padding, dilation)
    if x.dim() == 5:
        x, padding = padded_conv3d(x, x_zero_point, padding)
    x, stride, padding = one_output_dims(x, w, x_zero_point, stride, padding, dilation)
    if not over_ints(x_qmax, saturates):
        attr, algorithm = onednn_post_op(post_op)
        dtype = torch.uint8 if out_dtype is None else out_dtype  # spelled out for Inductor (qlinear_call)
        return torch.ops.onednn.qconv_pointwise(x, x_scale, x_zero_point, w, w_scale, w_zero_point, bias, stride,
                                                padding, dilation, groups, out_scale, out_zero_point, dtype,
                                                attr, scalars(post_op, post_op_args), algorithm)
    v = _conv_exact(x, x_scale, x_zero_point, w, w_scale, w_zero_point, bias, stride, padding, dilation, groups)
    return _finish(v, out_scale, out_zero_point, out_dtype, post_op, post_op_args)


# A conv whose weight is large beside its output (ResNet-50's 512-channel 3x3 convs at 7x7) runs
# two int8 calls faster than one float32 conv, whose plain weight oneDNN reorders on every call:
# measured under ONEDNN_MAX_CPU_ISA=AVX2, 2 threads, 3.1 vs 5.7-8.2 ms for 512x512x3x3 at 7x7;
# every MobileNetV2 conv and every other ResNet-50 conv is faster over the integers (docs/x86.md).
TWO_CALLS_WEIGHTS_PER_OUTPUT = 8192


def clamp_on_grid(y: Tensor, post_op: str, post_op_args: list[float], scale: float, zero_point: int) -> Tensor:
    """relu / hardtanh after rounding: exact, since rounding is monotone and ``round(0) = 0``."""
    if post_op == "relu":
        return y.clamp_min_(zero_point)
    lo = quantize_real(torch.tensor(post_op_args[0], dtype=torch.float32), scale, zero_point)
    hi = quantize_real(torch.tensor(post_op_args[1], dtype=torch.float32), scale, zero_point)
    return y.clamp_(int(lo.item()), int(hi.item()))


# the post-ops oneDNN's 2-d int8 conv applies in its kernel, as qconv_with_post_op spells them out
# (a list literal there: TorchScript, which compiles it for the kernels' TorchScript bodies, takes no global list)
CONV_FUSED_POST_OPS = ("none", "relu", "hardtanh", "hardswish", "silu")


def qconv_with_post_op(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor,
                       w_zero_point: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                       dilation: list[int], groups: int, out_scale: float, out_zero_point: int, post_op: str,
                       post_op_args: list[float], x_qmax: int, saturates: bool) -> Tensor:
    """A checked 2-d or 3-d oneDNN conv with any post-op, uint8 out: the post-op fused into the call
    where oneDNN fuses it (2-d: relu, hardtanh, hardswish, silu); a relu / hardtanh clamped on the
    output grid after the call (exact); any other post-op on the float32 result, then one rounding."""
    if x.dim() == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)  # oneDNN's 3-d path wants channels-last
    if post_op == "none" or (x.dim() == 4 and post_op in ["relu", "hardtanh", "hardswish", "silu"]):
        return qconv_call(x, x_scale, x_zero_point, w, w_scale, w_zero_point, bias, stride, padding, dilation, groups,
                          out_scale, out_zero_point, None, post_op, post_op_args, x_qmax, saturates)
    if post_op == "relu" or post_op == "hardtanh":
        y = qconv_call(x, x_scale, x_zero_point, w, w_scale, w_zero_point, bias, stride, padding, dilation, groups,
                       out_scale, out_zero_point, None, "none", post_op_args, x_qmax, saturates)
        return clamp_on_grid(y, post_op, post_op_args, out_scale, out_zero_point)
    v = qconv_call(x, x_scale, x_zero_point, w, w_scale, w_zero_point, bias, stride, padding, dilation, groups, 1.0, 0,
                   torch.float32, "none", post_op_args, x_qmax, saturates)
    return quantize_real(post_op_float(v, post_op, post_op_args), out_scale, out_zero_point)


def _conv_exact(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor, w_zero_point: Tensor,
                bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
                groups: int) -> Tensor:
    """``conv(x - zp) * x_scale * w_scale + bias`` in float32, exact on a saturating CPU: the
    float32 conv over the integer values, or, where the weight is large beside the output
    positions (:data:`TWO_CALLS_WEIGHTS_PER_OUTPUT`), two int8 calls on 7-bit halves. The choice
    follows the shapes only, so every runtime takes the same one."""
    positions = x.size(0)
    for i in range(2, x.dim()):
        positions *= max(1, x.size(i) // stride[i - 2])
    if w.numel() > 8192 * positions:  # TWO_CALLS_WEIGHTS_PER_OUTPUT (TorchScript reads no module constants)
        return _conv_two_halves(x, x_scale, x_zero_point, w, w_scale, w_zero_point, bias, stride, padding, dilation,
                                groups)
    return _conv_over_ints(x, x_scale, x_zero_point, w, w_scale, bias, stride, padding, dilation, groups)


def _conv_two_halves(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor,
                     w_zero_point: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                     dilation: list[int], groups: int) -> Tensor:
    """Two oneDNN calls on the activation's 7-bit halves ``x = 2 * (x >> 1) + (x & 1)``, each exact:
    the same packed weight, ``x_scale`` doubled for the high half, the zero point split the same
    way (``zp = 2 * (zp >> 1) + (zp & 1)``), the bias once, float32 out, summed."""
    empty: Scalars = []
    v = torch.ops.onednn.qconv_pointwise(torch.bitwise_right_shift(x, 1), 2.0 * x_scale, x_zero_point >> 1, w,
                                         w_scale, w_zero_point, bias, stride, padding, dilation, groups, 1.0, 0,
                                         torch.float32, "none", empty, "")
    return v.add_(torch.ops.onednn.qconv_pointwise(torch.bitwise_and(x, 1), x_scale, x_zero_point & 1, w, w_scale,
                                                   w_zero_point, None, stride, padding, dilation, groups, 1.0, 0,
                                                   torch.float32, "none", empty, ""))


def _conv_over_ints(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                    stride: list[int], padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """The float32 conv over the integer values ``x - zp`` and ``w``."""
    w_int = int_weight(w, x.dim())
    layout = torch.channels_last_3d if x.dim() == 5 else torch.channels_last  # what oneDNN's int8 conv returns
    scale = x_scale * w_scale
    v = torch.convolution(x.to(torch.float32).sub_(float(x_zero_point)).contiguous(memory_format=layout), w_int,
                          None if bias is None else bias / scale, stride, padding, dilation, False, [0],
                          groups)  # the bias goes in on the integer scale: one pass less
    channel: list[int] = [1, -1]
    for _ in range(x.dim() - 2):
        channel.append(1)
    return v.mul_(scale.view(channel))


def qconv_add_call(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor, w_zero_point: Tensor,
                   accum: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                   dilation: list[int], groups: int, out_scale: float, out_zero_point: int, accum_scale: float,
                   accum_zero_point: int, post_op: str, x_qmax: int, saturates: bool) -> Tensor:
    """``onednn::qconv2d_pointwise.binary`` with the "sum" post-op (``post_op(conv(x) + accum)``,
    written into ``accum``, a channels-last uint8 tensor the caller gives away), exact where the
    CPU saturates: there the sum is taken in float32 and copied into ``accum``, as oneDNN writes it."""
    x, padding = padded_where_dilation_misses(x, w, x_zero_point, stride, padding, dilation)
    x, stride, padding = one_output_dims(x, w, x_zero_point, stride, padding, dilation)
    if not over_ints(x_qmax, saturates):
        empty: Scalars = []
        return torch.ops.onednn.qconv2d_pointwise(x, x_scale, x_zero_point, w, w_scale, w_zero_point, accum, bias,
                                                  stride, padding, dilation, groups, out_scale, out_zero_point,
                                                  torch.uint8, accum_scale, accum_zero_point, "sum", 1.0, post_op,
                                                  empty, "")
    v = _conv_exact(x, x_scale, x_zero_point, w, w_scale, w_zero_point, bias, stride, padding, dilation, groups)
    v.add_((accum.to(torch.float32) - accum_zero_point) * accum_scale)
    return accum.copy_(_finish(v, out_scale, out_zero_point, None, post_op, []))
