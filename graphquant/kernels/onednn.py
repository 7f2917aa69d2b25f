"""oneDNN int8 kernels (x86): ``torch.ops.onednn.qconv_pointwise`` / ``qconv2d_pointwise.binary`` /
``qlinear_pointwise``.

oneDNN crashes the process on malformed input (an unpacked weight kills it with SIGSEGV;
a residual ``accum`` smaller than the output would be written past its end), so every
call checks dtype, packing and shape first and raises a ``GraphQuantError`` instead.
Weights are packed once, at convert or load time, by :func:`pack_conv` / :func:`pack_linear`.

Post-ops are the names of :data:`graphquant.kernels.portable.POST_OPS`. What torch 2.13's
oneDNN ops fuse (checked on this machine): ``qlinear_pointwise`` all of them;
``qconv_pointwise`` on 2-d convs relu, hardtanh, hardswish and silu ("swish"), on 1-d
and 3-d convs none (conv1d therefore runs here as a 2-d conv of height 1); the ``.binary``
overload a residual "sum", alone or followed by relu, on 2-d convs only. Where oneDNN
cannot fuse, a clamp (relu, hardtanh) is applied exactly on the uint8 grid, anything else
to a float32 output of the same call, followed by one rounding. There is no int8
transposed convolution in ``torch.ops.onednn``: ``qconv_transpose`` runs on the portable
backend everywhere.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from graphquant.errors import GraphQuantError
from graphquant.kernels import portable, x86
from graphquant.kernels.portable import (
    check_conv_args,
    check_post_op,
    check_qparams,
    conv_out_shape,
)

_zero_points: dict[int, torch.Tensor] = {}


def available() -> bool:
    """Whether this PyTorch build has the oneDNN int8 ops."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.onednn, "qconv_pointwise")


def on_weight_backend(kernel: str) -> Callable[..., torch.Tensor]:
    """The eager implementation of a weighted op: ``kernel`` of the backend its weight (argument 3)
    belongs to — a packed oneDNN weight (``is_mkldnn``) runs here, a plain int8 weight on
    :mod:`graphquant.kernels.portable`. The op's schema fixes the arguments; this only forwards them."""
    this = globals()

    def dispatch(*args: Any, **kwargs: Any) -> torch.Tensor:
        if args[3].is_mkldnn:
            return this[kernel](*args, **kwargs)
        return getattr(portable, kernel)(*args, **kwargs)

    dispatch.__name__ = kernel
    return dispatch


def _w_zero_point(n: int) -> torch.Tensor:
    # symmetric int8 weights: zero point 0 for every output channel
    zp = _zero_points.get(n)
    if zp is None:
        zp = _zero_points[n] = torch.zeros(n, dtype=torch.int64)
    return zp


def onednn_dilation(w: torch.Tensor, dilation: list[int]) -> list[int]:
    """``dilation`` with 1 where the kernel is 1 wide: the same convolution (a 1-wide kernel has no
    gaps to spread), and oneDNN (torch 2.13) writes out of bounds on a 1-wide kernel with dilation
    > 1, padding and stride >= 2: SIGSEGV, found by tests/fuzz_kernels.py. TorchScript-compatible:
    the TorchScript bodies of the conv kernels (kernels/conv.py) call it too."""
    out: list[int] = []
    for i in range(len(dilation)):
        out.append(1 if w.size(w.dim() - len(dilation) + i) == 1 else dilation[i])
    return out


def pack_conv(w: torch.Tensor, w_scale: torch.Tensor, x_scale: float, x_zero_point: int, stride: list[int],
              padding: list[int], dilation: list[int], groups: int,
              x_shape: Sequence[int] | None = None) -> torch.Tensor:
    """Pack an int8 conv weight (out, in/groups, *kernel) into oneDNN's opaque layout.

    ``x_shape`` is the input shape the conv will see (any batch): oneDNN picks the weight
    layout its kernel for that shape reads. Packed without it, the layout is a guess that
    the kernel may reorder on every call: ResNet-50's 1x1 convs at 14x14 ran 1.4-3x slower
    (0.45 vs 0.16 ms for 256 -> 1024 at batch 1). Only speed depends on it.

    Checked first: ``qconv_prepack`` divides by stride and dilation (SIGFPE on 0) and reads
    one scale per output channel.
    """
    if w.dtype != torch.int8 or w.is_mkldnn or w.dim() not in (3, 4, 5):
        raise GraphQuantError(f"graphquant::pack_conv: wants a plain 3-, 4- or 5-d int8 weight, got {w.dtype} "
                              f"{tuple(w.shape)} mkldnn={w.is_mkldnn}")
    if w_scale.dim() != 1 or w_scale.numel() != w.shape[0] or not w_scale.is_floating_point():
        raise GraphQuantError(f"graphquant::pack_conv: w_scale must have one float per output channel ({w.shape[0]})")
    if not bool(((w_scale > 0) & (w_scale < math.inf)).all()):  # once per weight: packing is not on the call path
        raise GraphQuantError("graphquant::pack_conv: weight scales must be positive and finite")
    check_conv_args("pack_conv", w.dim() - 2, stride, padding, dilation, groups)
    check_qparams("pack_conv", x_scale, x_zero_point, 1.0, 0)
    if w.shape[0] % groups:
        raise GraphQuantError(f"graphquant::pack_conv: groups {groups} must divide the {w.shape[0]} output channels")
    if w.dim() != 4 or x_shape is None or len(x_shape) != 4 or any(int(size) < 1 for size in x_shape):
        x_shape = None  # 2-d convs only (measured there); a hint that cannot be the input is dropped
    return torch.ops.onednn.qconv_prepack(
        w.contiguous(), w_scale.float(), x_scale, x_zero_point, stride, padding, onednn_dilation(w, dilation), groups,
        None if x_shape is None else [int(size) for size in x_shape],
    )


def pack_linear(w: torch.Tensor) -> torch.Tensor:
    """Pack an int8 linear weight (out, in) into oneDNN's opaque layout."""
    if w.dtype != torch.int8 or w.is_mkldnn or w.dim() != 2:
        raise GraphQuantError(f"graphquant: pack_linear wants a plain 2-d int8 weight, got {w.dtype} {tuple(w.shape)}")
    return torch.ops.onednn.qlinear_prepack(w.contiguous(), None)


_CHECKED_SCALES: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}


def check_scale_values(op: str, w_scale: torch.Tensor) -> None:
    """Weight scales positive and finite (a NaN scale turns outputs into arbitrary uint8). A
    graph passes the same scale buffer on every call: each tensor is checked once, and again
    only after an in-place change (its version counter), so the check costs a dict lookup."""
    seen = _CHECKED_SCALES.get(id(w_scale))
    if seen is not None and seen[0]() is w_scale and seen[1] == w_scale._version:
        return
    if not bool(((w_scale > 0) & (w_scale < math.inf)).all()):
        raise GraphQuantError(f"graphquant::{op}: weight scales must be positive and finite")
    if len(_CHECKED_SCALES) > 4096:  # drop entries of freed tensors now and then
        for key in [k for k, (ref, _) in _CHECKED_SCALES.items() if ref() is None]:
            del _CHECKED_SCALES[key]
    _CHECKED_SCALES[id(w_scale)] = (weakref.ref(w_scale), w_scale._version)


def _check_common(
    op: str, x: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_scale: float, out_zero_point: int, post_op: str, post_op_args: Sequence[float],
    out_channels: int,
) -> None:
    if x.dtype != torch.uint8:
        raise GraphQuantError(f"graphquant::{op}: activation must be uint8, got {x.dtype}")
    if x.device.type != "cpu":
        raise GraphQuantError(f"graphquant::{op}: oneDNN kernels run on CPU, input is on {x.device}")
    if not w.is_mkldnn:
        raise GraphQuantError(
            f"graphquant::{op}: weight is not packed for oneDNN; pack it with graphquant.kernels.onednn"
        )
    check_qparams(op, x_scale, x_zero_point, out_scale, out_zero_point)
    if w_scale.dtype != torch.float32 or w_scale.dim() != 1 or w_scale.numel() != out_channels:
        raise GraphQuantError(f"graphquant::{op}: w_scale must be float32 with {out_channels} entries")
    check_scale_values(op, w_scale)
    if bias is not None and (bias.dtype != torch.float32 or bias.numel() != out_channels):
        raise GraphQuantError(f"graphquant::{op}: bias must be float32 with {out_channels} entries")
    check_post_op(op, post_op, post_op_args)


def _check_qconv(x: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                 out_scale: float, out_zero_point: int, post_op: str,
                 post_op_args: Sequence[float]) -> tuple[int, ...]:
    """:func:`qconv`'s checks; its output shape."""
    _check_common("qconv", x, x_scale, x_zero_point, w, w_scale, bias, out_scale, out_zero_point, post_op, post_op_args,
                  w.shape[0])
    return conv_out_shape("qconv", x, w, stride, padding, dilation, groups)


def qconv(x: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scale: torch.Tensor,
          bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int,
          out_scale: float, out_zero_point: int, post_op: str, post_op_args: Sequence[float] = (),
          x_qmax: int = 255) -> torch.Tensor:
    """uint8 convolution, uint8 out (channels-last), checked before oneDNN sees it; exact on
    every x86 CPU (``x_qmax``: see :mod:`graphquant.kernels.x86`)."""
    out_shape = _check_qconv(x, x_scale, x_zero_point, w, w_scale, bias, stride, padding, dilation, groups, out_scale,
                             out_zero_point, post_op, post_op_args)
    out_channels = out_shape[1]
    return qconv_run(x, x_scale, x_zero_point, w, w_scale, _w_zero_point(out_channels), bias, stride, padding,
                     dilation, groups, out_scale, out_zero_point, post_op, list(post_op_args), x_qmax,
                     x86.saturates(x86.is_depthwise(w, groups)), list(out_shape))


def qconv_run(x: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scale: torch.Tensor,
              w_zero_point: torch.Tensor, bias: torch.Tensor | None, stride: list[int], padding: list[int],
              dilation: list[int], groups: int, out_scale: float, out_zero_point: int, post_op: str,
              post_op_args: list[float], x_qmax: int, saturates: bool,
              out_shape: list[int]) -> torch.Tensor:
    """:func:`qconv` after its checks, in TorchScript's subset: the one body the eager kernel and its
    TorchScript body (kernels/conv.py) both run. An empty batch gives an empty output; a conv1d runs
    as a conv2d of height 1 (oneDNN fuses post-ops into 2-d convs only)."""
    if x.size(0) == 0:
        return x.new_empty(out_shape)
    one_d = x.dim() == 3
    if one_d:
        x, stride, padding, dilation = x.unsqueeze(2), [1] + stride, [0] + padding, [1] + dilation
    y = x86.qconv_with_post_op(x, x_scale, x_zero_point, w, w_scale, w_zero_point, bias, stride, padding,
                               onednn_dilation(w, dilation), groups, out_scale, out_zero_point, post_op, post_op_args,
                               x_qmax, saturates)
    return y.squeeze(2) if one_d else y


# A call with its arguments resolved, for inputs of one shape (kernels/direct.py): given the input
# and the call's other arguments, of which it reads only those that change from call to call
Plan = Callable[[torch.Tensor, tuple[Any, ...]], torch.Tensor]


def _planned_dilation(x: torch.Tensor, w: torch.Tensor, x_zero_point: int, stride: list[int], padding: list[int],
                      dilation: list[int], groups: int, x_qmax: int) -> list[int] | None:
    """The dilation a conv planned on ``x``'s shape hands oneDNN, or None where the kernel would not
    make that one call (the float32 path of a saturating CPU, an input it pads or cuts by hand)."""
    if x86.over_ints(x_qmax, x86.saturates(x86.is_depthwise(w, groups))):
        return None
    dilation = onednn_dilation(w, dilation)
    padded, _ = x86.padded_where_dilation_misses(x, w, x_zero_point, stride, padding, dilation)
    cut, _, _ = x86.one_output_dims(x, w, x_zero_point, list(stride), list(padding), dilation)
    return dilation if padded is x and cut is x else None


def qconv_plan(x: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int,
               out_scale: float, out_zero_point: int, post_op: str, post_op_args: Sequence[float] = (),
               x_qmax: int = 255) -> Plan | None:
    """:func:`qconv` on every input of ``x``'s shape (uint8, on the CPU) with these arguments, as its
    one oneDNN call with every argument resolved: what :func:`qconv_run` would call, after
    :func:`qconv`'s checks. None where it would rewrite the call instead (an empty batch, a 1-d or
    3-d conv, a post-op oneDNN does not fuse, an input it pads or cuts by hand, the float32 path of
    a saturating CPU): those take the whole kernel on each call."""
    if not w.is_mkldnn or x.dim() != 4 or x.size(0) == 0 or post_op not in x86.CONV_FUSED_POST_OPS:
        return None
    out_channels = _check_qconv(x, x_scale, x_zero_point, w, w_scale, bias, stride, padding, dilation, groups,
                                out_scale, out_zero_point, post_op, post_op_args)[1]
    planned_dilation = _planned_dilation(x, w, x_zero_point, stride, padding, dilation, groups, x_qmax)
    if planned_dilation is None:
        return None
    attr, algorithm = x86.onednn_post_op(post_op)
    args = (x_scale, x_zero_point, w, w_scale, _w_zero_point(out_channels), bias, list(stride), list(padding),
            planned_dilation, groups, out_scale, out_zero_point, torch.uint8, attr,
            x86.scalars(post_op, list(post_op_args)), algorithm)
    op = torch.ops.onednn.qconv_pointwise.default

    def run(x: torch.Tensor, _: tuple[Any, ...]) -> torch.Tensor:
        return op(x, *args)

    return run


def _check_qconv_add(x: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
                     groups: int, accum: torch.Tensor, accum_scale: float, accum_zero_point: int, out_scale: float,
                     out_zero_point: int, post_op: str) -> tuple[int, ...]:
    """:func:`qconv_add`'s checks; its output shape."""
    _check_common("qconv_add", x, x_scale, x_zero_point, w, w_scale, bias, out_scale, out_zero_point, post_op, (),
                  w.shape[0])
    if post_op not in ("none", "relu"):
        raise GraphQuantError(f"graphquant::qconv_add: oneDNN fuses only relu after the residual sum, not {post_op!r}")
    out_shape = conv_out_shape("qconv_add", x, w, stride, padding, dilation, groups)
    if accum.dtype != torch.uint8 or tuple(accum.shape) != out_shape or accum.device.type != "cpu":
        raise GraphQuantError(
            f"graphquant::qconv_add: accum must be a uint8 CPU tensor of the output's shape {out_shape}, "
            f"got {accum.dtype} {tuple(accum.shape)}"
        )
    check_qparams("qconv_add", accum_scale, accum_zero_point, out_scale, out_zero_point)
    if x.dim() not in (3, 4):
        raise GraphQuantError(
            f"graphquant::qconv_add: oneDNN fuses the residual sum into 1-d and 2-d convs, input is {x.dim()}-d"
        )
    return out_shape


def qconv_add(x: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int,
              accum: torch.Tensor, accum_scale: float, accum_zero_point: int, out_scale: float, out_zero_point: int,
              post_op: str, accum_donated: bool = False, x_qmax: int = 255) -> torch.Tensor:
    """``post_op(conv(x) + accum)`` in one oneDNN call (the "sum" post-op), uint8 out.

    ``qconv2d_pointwise.binary`` writes its result into ``qaccum`` (``Tensor(a!)``). The
    graph's ``accum`` may be read by other nodes (ResNet's identity feeds the next block's
    conv too) or be this conv's own input, so oneDNN gets a private channels-last copy:
    one copy of a uint8 tensor, made anyway when ``accum`` is not channels-last. With
    ``accum_donated`` (set at convert when no node reads ``accum`` afterwards) a channels-last
    ``accum`` takes the sum itself.
    """
    out_shape = _check_qconv_add(x, x_scale, x_zero_point, w, w_scale, bias, stride, padding, dilation, groups, accum,
                                 accum_scale, accum_zero_point, out_scale, out_zero_point, post_op)
    out_channels = out_shape[1]
    return qconv_add_run(x, x_scale, x_zero_point, w, w_scale, _w_zero_point(out_channels), bias, stride, padding,
                         dilation, groups, accum, accum_scale, accum_zero_point, out_scale, out_zero_point, post_op,
                         accum_donated, x_qmax, x86.saturates(x86.is_depthwise(w, groups)),
                         list(out_shape))


# where qconv_add's accumulator is among its arguments after the input (kernels/direct.py's plans)
QCONV_ADD_ACCUM = 9


def qconv_add_plan(x: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                   accum: torch.Tensor, accum_scale: float, accum_zero_point: int, out_scale: float,
                   out_zero_point: int, post_op: str, accum_donated: bool = False,
                   x_qmax: int = 255) -> Plan | None:
    """:func:`qconv_add` on every input of ``x``'s shape with these arguments but the accumulator, as its
    one oneDNN call with every other argument resolved (see :func:`qconv_plan`). The accumulator
    changes from call to call: the plan checks it on each (uint8, on the CPU, of the output's shape),
    runs the whole kernel when it fails (its error), and gives oneDNN a private channels-last copy
    unless the graph donated a channels-last one, as :func:`qconv_add_run` does."""
    if not w.is_mkldnn or x.dim() != 4 or x.size(0) == 0:
        return None
    out_size = torch.Size(_check_qconv_add(x, x_scale, x_zero_point, w, w_scale, bias, stride, padding, dilation,
                                           groups, accum, accum_scale, accum_zero_point, out_scale, out_zero_point,
                                           post_op))
    planned_dilation = _planned_dilation(x, w, x_zero_point, stride, padding, dilation, groups, x_qmax)
    if planned_dilation is None:
        return None
    head = (x_scale, x_zero_point, w, w_scale, _w_zero_point(w.shape[0]))
    tail: tuple[Any, ...] = (bias, list(stride), list(padding), planned_dilation, groups, out_scale, out_zero_point,
                             torch.uint8, accum_scale, accum_zero_point, "sum", 1.0, post_op, [], "")
    op = torch.ops.onednn.qconv2d_pointwise.binary
    channels_last = torch.channels_last

    def run(x: torch.Tensor, args: tuple[Any, ...]) -> torch.Tensor:
        accum = args[QCONV_ADD_ACCUM]
        if accum.dtype is not torch.uint8 or accum.shape != out_size or not accum.is_cpu:
            return qconv_add(x, *args)  # refused there, with the reason
        if not (accum_donated and accum.is_contiguous(memory_format=channels_last)):
            accum = accum.clone(memory_format=channels_last)
        return op(x, *head, accum, *tail)

    return run


def qconv_add_run(x: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scale: torch.Tensor,
                  w_zero_point: torch.Tensor, bias: torch.Tensor | None, stride: list[int], padding: list[int],
                  dilation: list[int], groups: int, accum: torch.Tensor, accum_scale: float, accum_zero_point: int,
                  out_scale: float, out_zero_point: int, post_op: str, accum_donated: bool, x_qmax: int,
                  saturates: bool, out_shape: list[int]) -> torch.Tensor:
    """:func:`qconv_add` after its checks (a 1-d or 2-d conv), in TorchScript's subset: the one body
    the eager kernel and its TorchScript body both run. oneDNN writes the sum into its accum: a private
    channels-last copy, unless the graph donated a channels-last one."""
    if x.size(0) == 0:
        return accum.new_empty(out_shape)
    one_d = x.dim() == 3  # oneDNN's sum post-op is 2-d only: a conv1d runs as a conv2d of height 1
    if one_d:
        x, accum = x.unsqueeze(2), accum.unsqueeze(2)
        stride, padding, dilation = [1] + stride, [0] + padding, [1] + dilation
    private = accum
    if not (accum_donated and accum.is_contiguous(memory_format=torch.channels_last)):
        private = accum.clone(memory_format=torch.channels_last)
    y = x86.qconv_add_call(x, x_scale, x_zero_point, w, w_scale, w_zero_point, private, bias, stride, padding,
                           onednn_dilation(w, dilation), groups, out_scale, out_zero_point, accum_scale,
                           accum_zero_point, post_op, x_qmax, saturates)
    return y.squeeze(2) if one_d else y


def _check_qlinear(x: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_scale: float, out_zero_point: int, post_op: str,
                   post_op_args: Sequence[float]) -> int:
    """:func:`qlinear`'s checks; its output features."""
    if w.is_mkldnn and w.dim() != 2:
        raise GraphQuantError(f"graphquant::qlinear: weight is a packed {w.dim()}-d (conv) weight, not a linear one")
    in_features, out_features = w.shape[0], w.shape[-1]
    _check_common("qlinear", x, x_scale, x_zero_point, w, w_scale, bias, out_scale, out_zero_point, post_op,
                  post_op_args, out_features)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise GraphQuantError(f"graphquant::qlinear: input {tuple(x.shape)} does not end in {in_features} features")
    return out_features


def qlinear(x: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scale: torch.Tensor,
            bias: torch.Tensor | None, out_scale: float, out_zero_point: int, post_op: str,
            post_op_args: Sequence[float] = (), float_out: bool = False, x_qmax: int = 255) -> torch.Tensor:
    """uint8 linear, uint8 out (float32 with ``float_out``), checked before oneDNN sees it.

    The packed weight is stored transposed, ``(in, out)``.
    """
    out_features = _check_qlinear(x, x_scale, x_zero_point, w, w_scale, bias, out_scale, out_zero_point, post_op,
                                  post_op_args)
    return qlinear_run(x, x_scale, x_zero_point, w, w_scale, _w_zero_point(out_features), bias, out_scale,
                       out_zero_point, post_op, list(post_op_args), float_out, x_qmax, x86.saturates())


def qlinear_plan(x: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None, out_scale: float, out_zero_point: int, post_op: str,
                 post_op_args: Sequence[float] = (), float_out: bool = False,
                 x_qmax: int = 255) -> Plan | None:
    """:func:`qlinear` on every input of ``x``'s shape (uint8, on the CPU) with these arguments, as its
    one oneDNN call with every argument resolved, after :func:`qlinear`'s checks (see
    :func:`qconv_plan`). None for an empty input and the float32 path of a saturating CPU."""
    if not w.is_mkldnn or x.numel() == 0:
        return None
    out_features = _check_qlinear(x, x_scale, x_zero_point, w, w_scale, bias, out_scale, out_zero_point, post_op,
                                  post_op_args)
    if x86.over_ints(x_qmax, x86.saturates()):
        return None
    out_dtype = torch.float32 if float_out else torch.uint8
    if float_out:
        out_scale, out_zero_point = 1.0, 0
    attr, algorithm = x86.onednn_post_op(post_op)
    args = (x_scale, x_zero_point, w, w_scale, _w_zero_point(out_features), bias, out_scale, out_zero_point, out_dtype,
            attr, x86.scalars(post_op, list(post_op_args)), algorithm)
    op = torch.ops.onednn.qlinear_pointwise.default

    def run(x: torch.Tensor, _: tuple[Any, ...]) -> torch.Tensor:
        return op(x.contiguous(), *args)

    return run


def qlinear_run(x: torch.Tensor, x_scale: float, x_zero_point: int, w: torch.Tensor, w_scale: torch.Tensor,
                w_zero_point: torch.Tensor, bias: torch.Tensor | None, out_scale: float, out_zero_point: int,
                post_op: str, post_op_args: list[float], float_out: bool, x_qmax: int,
                saturates: bool) -> torch.Tensor:
    """:func:`qlinear` after its checks, in TorchScript's subset: the one body the eager kernel and
    its TorchScript body both run."""
    if x.numel() == 0:
        shape = list(x.shape[:-1])
        shape.append(w.size(1))
        return x.new_empty(shape, dtype=torch.float32 if float_out else torch.uint8)
    out_dtype: torch.dtype | None = None
    if float_out:
        out_scale, out_zero_point, out_dtype = 1.0, 0, torch.float32
    return x86.qlinear_call(x.contiguous(), x_scale, x_zero_point, w, w_scale, w_zero_point, bias, out_scale,
                            out_zero_point, out_dtype, post_op, post_op_args, x_qmax, saturates)
