"""The arithmetic of affine int8 quantization, and the only place it lives.

``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and
``x_hat = (q - zero_point) * scale``. Rounding is round-half-to-even, as
``torch.round`` and oneDNN do it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from graphquant.errors import GraphQuantError

# The scale of a zero range (an all-zero activation or weight channel): any positive scale
# represents it exactly, and a positive one means nothing divides by zero.
EPS = float(torch.finfo(torch.float32).eps)
# Smallest scale of a non-zero range: the smallest normal float32. Not EPS: weights of 1e-30
# need a scale of 1e-32, and clamping it to 1.2e-7 would round every weight to 0 (a silent
# zero output). A normal float32 keeps x_scale * w_scale, which oneDNN forms in float32, away
# from denormals for any activation scale above about 1e-6.
TINY = float(torch.finfo(torch.float32).tiny)

# 4-bit values (embedding tables, stored two per byte by the kernels); torch 2.13's stubs lack the name
UINT4: torch.dtype = torch.uint4  # type: ignore[attr-defined]

_RANGES = {
    torch.uint8: (0, 255),
    torch.int8: (-128, 127),
    torch.int32: (-(2**31), 2**31 - 1),
    UINT4: (0, 15),
}


def dtype_range(dtype: torch.dtype) -> tuple[int, int]:
    """The integer range ``(qmin, qmax)`` a dtype holds."""
    if dtype not in _RANGES:
        raise GraphQuantError(f"graphquant: no integer range for {dtype}; use torch.uint8 or torch.int8")
    return _RANGES[dtype]


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of one tensor (per tensor) or one axis (per channel).

    ``scale`` and ``zero_point`` are 0-d tensors per tensor, 1-d along ``axis`` per channel.
    A *float* ``zero_point`` marks float qparams (weight-only embedding tables, torch.ao's
    ``per_channel_affine_float_qparams``): it is then a real-valued offset, the value of
    integer 0, and ``x_hat = q * scale + zero_point`` (see :func:`choose_float_qparams`).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    dtype: torch.dtype
    qmin: int
    qmax: int
    axis: int | None = None

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def float_qparams(self) -> bool:
        """Whether ``zero_point`` is a float offset (``x_hat = q * scale + zero_point``)."""
        return self.zero_point.is_floating_point()

    def scalar(self) -> tuple[float, int]:
        """``(scale, zero_point)`` as Python numbers; only for per-tensor qparams."""
        if self.axis is not None:
            raise GraphQuantError("graphquant: per-channel qparams have no single scale")
        return float(self.scale), int(self.zero_point)


def choose_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    dtype: torch.dtype,
    symmetric: bool,
    qmin: int | None = None,
    qmax: int | None = None,
    axis: int | None = None,
) -> QParams:
    """Scale and zero point that cover ``[min_val, max_val]`` and represent 0.0 exactly.

    The range is first widened to include 0 (padding and ReLU produce exact zeros).
    Symmetric qparams put the zero point at the middle of the integer range.
    """
    lo, hi = dtype_range(dtype)
    qmin = lo if qmin is None else qmin
    qmax = hi if qmax is None else qmax
    min_val = torch.clamp(min_val.detach().double(), max=0.0)
    max_val = torch.clamp(max_val.detach().double(), min=0.0)
    if symmetric:
        amax = torch.maximum(-min_val, max_val)
        scale = _positive(amax / ((qmax - qmin) / 2))
        mid = (qmin + qmax + 1) // 2 if dtype == torch.uint8 else 0
        zero_point = torch.full_like(scale, mid, dtype=torch.int64)
    else:
        scale = _positive((max_val - min_val) / (qmax - qmin))
        zero_point = (qmin - torch.round(min_val / scale)).clamp(qmin, qmax).to(torch.int64)
    # float32 scales: the kernels take float32, so the reference must round with the same value.
    return QParams(scale.float(), zero_point, dtype, qmin, qmax, axis)


def _positive(scale: torch.Tensor) -> torch.Tensor:
    """``EPS`` for a zero range, at least ``TINY`` (in float32) otherwise; float64 in and out."""
    return torch.where(scale > 0, torch.clamp(scale, min=TINY), torch.full_like(scale, EPS))


def _broadcast(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def quantize(x: torch.Tensor, qparams: QParams) -> torch.Tensor:
    """Float tensor to integer tensor of ``qparams.dtype`` (uint8 storage for float qparams)."""
    if qparams.float_qparams:
        assert qparams.axis == 0, "float qparams are per row"
        return quantize_float_qparams(x, qparams.scale, qparams.zero_point, qparams.qmax)
    scale, zero_point = qparams.scale, qparams.zero_point
    if qparams.axis is not None:
        scale = _broadcast(scale, x.dim(), qparams.axis)
        zero_point = _broadcast(zero_point, x.dim(), qparams.axis)
    return quantize_tensor(x, scale, zero_point, qparams.qmin, qparams.qmax, qparams.dtype)


def dequantize(q: torch.Tensor, qparams: QParams) -> torch.Tensor:
    """Integer tensor back to float32."""
    if qparams.float_qparams:
        return dequantize_float_qparams(q, qparams.scale, qparams.zero_point)
    scale, zero_point = qparams.scale, qparams.zero_point
    if qparams.axis is not None:
        scale = _broadcast(scale, q.dim(), qparams.axis)
        zero_point = _broadcast(zero_point, q.dim(), qparams.axis)
    return (q.to(torch.float32) - zero_point.to(torch.float32)) * scale


def quantize_tensor(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    qmin: int,
    qmax: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point, qmin, qmax)`` with broadcasting qparams.

    Multiplying by ``1 / scale`` would save a division but can round differently
    from oneDNN's own quantize at exact half steps, so we divide. Rounding comes before
    the zero point is added (round-half-even of ``x / scale``); the in-place steps after
    the division save three temporaries on the per-batch path of dynamic quantization.
    """
    q = x.to(torch.float32) / scale
    q.round_()
    if not (isinstance(zero_point, int) and zero_point == 0):  # symmetric: a pass saved
        q.add_(zero_point)
    q.clamp_(qmin, qmax)
    return q.to(dtype)


# torch's own per-tensor quantize: one vectorised pass writing the integers (fbgemm's loop), where
# quantize_tensor makes five passes and a float32 temporary. It returns a tensor of the deprecated
# quantized dtypes, so only the activation quantize ops call it (graphquant::quantize_per_tensor,
# the per-tensor dynamic quantize), and its bytes are handed on as plain uint8 / int8 at once;
# without it (a torch that has dropped those dtypes) quantize_tensor runs.
_NATIVE_DTYPES = {torch.uint8: torch.quint8, torch.int8: torch.qint8}


def native_quantize(
    x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int, dtype: torch.dtype
) -> torch.Tensor:
    """``quantize_tensor`` for a float32 ``x`` and uint8 / int8, in one pass over ``x``.

    It rounds ``x * (1 / scale) + zero_point`` in one fused multiply-add where
    ``quantize_tensor`` divides, rounds, then adds: the two differ, by one step, only where
    ``x / scale`` lies on or within a float32 rounding of a half step (5 in a million values
    of a random activation). The reference graph calls this same op, so the kernel and
    reference graphs still round their activations alike.
    """
    q = torch.quantize_per_tensor(x, scale, zero_point, _NATIVE_DTYPES[dtype])
    # the integers as a plain tensor on the same bytes: no copy (int_repr() would make one)
    out = torch.empty(0, dtype=dtype).set_(q.untyped_storage(), q.storage_offset(), q.shape, q.stride())
    lo, hi = _RANGES[dtype]
    return out.clamp_(qmin, qmax) if (qmin, qmax) != (lo, hi) else out


def _native_quantize_agrees() -> bool:
    """Whether torch's quantize exists and agrees with ``quantize_tensor`` away from half steps
    (scale, zero point, saturation, infinities). Run once, with torch's one-time deprecation
    warning kept from the user."""
    x = torch.tensor([-1e4, -0.8, -0.3, 0.0, 0.2, 0.45, 0.7, 1.3, 63.1, 1e4, float("inf"), -float("inf")])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            grids = ((3, 0, 255, torch.uint8), (0, -128, 127, torch.int8), (64, 0, 127, torch.uint8))
            return all(torch.equal(native_quantize(x, 0.5, *grid), quantize_tensor(x, 0.5, *grid)) for grid in grids)
    except (RuntimeError, AttributeError):
        return False


NATIVE_QUANTIZE = _native_quantize_agrees()


def choose_float_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, qmax: int, scale_dtype: torch.dtype = torch.float32
) -> QParams:
    """Per-row float qparams of a table (one row per embedding) from each row's range:
    ``offset`` is the row's minimum, ``scale = (max - min) / qmax``, and
    ``x_hat = q * scale + offset`` with ``q`` in ``[0, qmax]`` (``QParams.zero_point`` holds the offset).

    Unlike int8 activations the range is not widened to include 0: an embedding row is
    never padded with zeros, so its whole integer range goes to its own values (a constant
    row, all zeros included, is exact: q 0, x_hat = offset). ``scale_dtype=torch.float16``
    (the 4-bit row format stores scale and offset so) rounds the offset down and the scale
    up to float16 values, so the rounded grid still spans the row.
    """
    lo, hi = min_val.detach().float(), max_val.detach().float()
    offset = lo.to(scale_dtype)
    if scale_dtype != torch.float32:  # rounded up, the offset would cut off the row's minimum
        down = torch.nextafter(offset, torch.tensor(float("-inf"), dtype=scale_dtype))
        offset = torch.where(offset.float() > lo, down, offset)
    offset = offset.float()
    scale = torch.clamp((hi - offset) / qmax, min=EPS)
    if scale_dtype != torch.float32:
        rounded = scale.to(scale_dtype)
        up = torch.nextafter(rounded, torch.tensor(float("inf"), dtype=scale_dtype))
        scale = torch.where(rounded.float() * qmax + offset < hi, up, rounded).float()
    dtype = torch.uint8 if qmax == 255 else UINT4
    return QParams(scale, offset, dtype, 0, qmax, axis=0)


def quantize_float_qparams(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmax: int) -> torch.Tensor:
    """``clamp(round((x - offset) / scale), 0, qmax)`` row by row, one uint8 per value."""
    q = (x.to(torch.float32) - offset.reshape(-1, 1)) / scale.reshape(-1, 1)
    return q.round_().clamp_(0, qmax).to(torch.uint8)


def dequantize_float_qparams(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``q * scale + offset`` row by row, in float32."""
    return q.to(torch.float32) * scale.reshape(-1, 1) + offset.reshape(-1, 1)


def fake_quantize(x: torch.Tensor, qparams: QParams) -> torch.Tensor:
    """``dequantize(quantize(x))``: the value the int8 model sees."""
    return dequantize(quantize(x, qparams), qparams)


def output_sqnr(reference: object, other: object) -> float:
    """:func:`sqnr` over every floating tensor of two model outputs (nested tuples, dicts, tensors),
    flattened and joined in order; ``inf`` when there is none."""
    from torch.utils._pytree import tree_flatten

    flat = zip(tree_flatten(reference)[0], tree_flatten(other)[0], strict=False)
    pairs = [(r.flatten(), o.flatten()) for r, o in flat if isinstance(r, torch.Tensor) and r.is_floating_point()]
    if not pairs:
        return float("inf")
    return sqnr(torch.cat([r for r, _ in pairs]), torch.cat([o for _, o in pairs]))


def sqnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``other`` against ``reference`` in dB.

    ``inf`` when they are identical.
    """
    reference = reference.detach().double()
    noise = (reference - other.detach().double()).pow(2).sum()
    signal = reference.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))


def dynamic_qparams(x: torch.Tensor, per_token: bool, qmax: int = 255,
                    asymmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of one batch, computed at run time (dynamic quantization).

    Per tensor: uint8 affine over the batch's range widened to include 0, onto ``0..qmax``. Per
    token: int8 symmetric, one scale per row (last dimension reduced), zero point 0, onto
    ``-128..127`` (``qmax`` 255) or ``-64..63`` (``qmax`` 127, ``reduce_range``); with
    ``asymmetric``, uint8 affine per row (each row's range widened to include 0, onto ``0..qmax``,
    its own zero point): for one-sided inputs (after a GELU or ReLU), where symmetric rows leave
    half the grid unused. TorchScript-compatible: the TorchScript module runs this same function.
    """
    if per_token and asymmetric:
        x = x.detach()
        lo = x.amin(dim=-1, keepdim=True).float().clamp_(max=0.0)
        hi = x.amax(dim=-1, keepdim=True).float().clamp_(min=0.0)
        scale = torch.clamp((hi - lo) / qmax, min=1.1920928955078125e-07)  # EPS
        return scale, torch.clamp(-torch.round(lo / scale), 0, qmax).to(torch.int64)
    if per_token:  # the largest |x| of each row, without a tensor of |x|
        x = x.detach()
        amax = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_()).float()
        scale = torch.clamp(amax / (qmax / 2.0), min=1.1920928955078125e-07)  # EPS
        return scale, torch.zeros_like(scale, dtype=torch.int64)
    lo, hi = torch.aminmax(x.detach().float())
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / qmax, min=1.1920928955078125e-07)  # EPS
    zero_point = torch.clamp(-torch.round(lo / scale), 0, qmax).to(torch.int64)
    return scale, zero_point


def quantize_dynamic_tensor(
    x: torch.Tensor, per_token: bool, qmax: int = 255, asymmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, scale, zero_point)`` of one batch: uint8 per tensor or int8 per token, on the grid
    :func:`dynamic_qparams` gives for ``qmax`` (the checks, then :func:`quantize_dynamic_batch`)."""
    if qmax not in (127, 255):
        raise GraphQuantError(f"graphquant::quantize_dynamic: qmax must be 255 or 127 (reduce_range), got {qmax}")
    if not x.is_floating_point():
        raise GraphQuantError(f"graphquant::quantize_dynamic: input must be floating point, got {x.dtype}")
    if x.numel() == 0:  # nothing to take a range of: any positive scale represents it
        shape = (*x.shape[:-1], 1) if per_token and x.dim() > 0 else ()
        scale, zero_point = torch.full(shape, EPS), torch.zeros(shape, dtype=torch.int64)
        dtype = torch.int8 if per_token and not asymmetric else torch.uint8
        return torch.empty_like(x, dtype=dtype), scale, zero_point
    return quantize_dynamic_batch(x, per_token, qmax, asymmetric)


def _quantize_uint8_math(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(x.to(torch.float32) / scale) + zero_point, 0, qmax).to(torch.uint8)


def _usable(scale: float, zero_point: int, qmax: int) -> bool:
    # a NaN or infinite batch has no usable range: the math gives its (meaningless) integers where
    # torch's quantize would raise
    return scale > 0.0 and scale < float("inf") and zero_point >= 0 and zero_point <= qmax


@torch.jit.unused
def _quantize_uint8_eager(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    if torch.compiler.is_compiling():  # torch.export (graphquant.compiled): the arithmetic, which traces
        return _quantize_uint8_math(x, scale, zero_point, qmax)
    s, zp = float(scale.item()), int(zero_point.item())
    if not _usable(s, zp, qmax):
        return _quantize_uint8_math(x, scale, zero_point, qmax)
    return native_quantize(x.to(torch.float32), s, zp, 0, qmax, torch.uint8)  # no copy of the bytes


def _quantize_uint8_native(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    if not torch.jit.is_scripting():
        return _quantize_uint8_eager(x, scale, zero_point, qmax)
    s, zp = float(scale.item()), int(zero_point.item())
    if not _usable(s, zp, qmax):
        return _quantize_uint8_math(x, scale, zero_point, qmax)
    q = torch.quantize_per_tensor(x.to(torch.float32), s, zp, torch.quint8).int_repr()
    return q.clamp_max_(qmax) if qmax < 255 else q


# the one quantize of a dynamic batch, eager and TorchScript: torch's native quantize where it agrees
_quantize_uint8 = _quantize_uint8_native if NATIVE_QUANTIZE else _quantize_uint8_math


def quantize_dynamic_batch(
    x: torch.Tensor, per_token: bool, qmax: int, asymmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_dynamic_tensor` of a checked, non-empty float batch. TorchScript-compatible:
    the TorchScript module runs this same function."""
    scale, zero_point = dynamic_qparams(x, per_token, qmax, asymmetric)
    if per_token and asymmetric:  # uint8 rows, each on its own grid
        return _quantize_uint8_math(x, scale, zero_point, qmax), scale, zero_point
    if per_token:
        q = (x.to(torch.float32) / scale).round_().clamp_(-(qmax + 1) // 2, qmax // 2).to(torch.int8)
        return q, scale, zero_point
    return _quantize_uint8(x, scale, zero_point, qmax), scale, zero_point


