"""Dynamic-quantization linear: activations quantized per batch inside the call.

Both backends quantize the activation the same way
(:func:`graphquant.quant_math.quantize_dynamic_batch`), so the integers match the
reference graph exactly; only the float accumulation order differs.

- oneDNN: ``qlinear_pointwise`` with uint8 input and float32 output (per tensor), or the
  per-token int8 values shifted into uint8 with the per-row scale applied to the output.
- portable: the int32 accumulator in float64, then the same rescale.

:func:`qlinear_dynamic_math` (and quant_math's quantize) are TorchScript-compatible: the
TorchScript module runs these same functions, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from graphquant.errors import GraphQuantError
from graphquant.kernels import x86
from graphquant.kernels.onednn import _w_zero_point, check_scale_values
from graphquant.kernels.portable import check_post_op
from graphquant.kernels.registry import Kernel, register
from graphquant.quant_math import dynamic_qparams, quantize_dynamic_batch, quantize_dynamic_tensor


def check_inputs(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> int:
    """Raise a ``GraphQuantError`` before any kernel runs; return the output features."""
    if x.dtype != torch.float32:
        raise GraphQuantError(f"graphquant::qlinear_dynamic: activation must be float32, got {x.dtype}")
    if w.is_mkldnn and w.dim() == 2:
        in_features, out_features = w.shape  # oneDNN stores the packed weight transposed
    elif w.dtype == torch.int8 and w.dim() == 2:
        out_features, in_features = w.shape
    else:
        raise GraphQuantError(
            f"graphquant::qlinear_dynamic: weight must be a packed linear or an int8 2-d weight, got {w.dtype} "
            f"{tuple(w.shape)} mkldnn={w.is_mkldnn}"
        )
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise GraphQuantError(
            f"graphquant::qlinear_dynamic: input {tuple(x.shape)} does not end in {in_features} features"
        )
    if w_scale.dtype != torch.float32 or w_scale.shape != (out_features,):
        raise GraphQuantError(f"graphquant::qlinear_dynamic: w_scale must be float32 with {out_features} entries")
    check_scale_values("qlinear_dynamic", w_scale)
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (out_features,)):
        raise GraphQuantError(f"graphquant::qlinear_dynamic: bias must be float32 with {out_features} entries")
    return out_features


def qlinear_dynamic(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, per_token: bool,
                    post_op: str = "none", post_op_args: Sequence[float] = (), x_qmax: int = 255,
                    asymmetric: bool = False) -> torch.Tensor:
    """float32 in, float32 out; int8 GEMM inside, then ``post_op`` on the float result.

    Per tensor, oneDNN applies the post-op inside the GEMM call; per token the row scales
    come after the GEMM, so the post-op runs after them, in place. ``x_qmax`` 127
    (``reduce_range``): the activation on the 7-bit grid (quant_math.dynamic_qparams), one
    exact int8 call on x86 CPUs without VNNI. ``asymmetric`` (per token): uint8 rows, each with
    its own zero point (quant_math.dynamic_qparams), for one-sided inputs.
    """
    out_features = check_inputs(x, w, w_scale, bias)
    if x_qmax not in (127, 255):
        raise GraphQuantError(f"graphquant::qlinear_dynamic: x_qmax must be 255 or 127 (reduce_range), got {x_qmax}")
    check_post_op("qlinear_dynamic", post_op, post_op_args)
    if x.numel() == 0:
        return x.new_empty((*x.shape[:-1], out_features))
    return qlinear_dynamic_math(x.contiguous(), w, w.is_mkldnn, w_scale, _w_zero_point(out_features), bias, per_token,
                                post_op, list(post_op_args), x_qmax, x86.saturates(), asymmetric)


def qlinear_dynamic_math(x: torch.Tensor, w: torch.Tensor, packed: bool, w_scale: torch.Tensor,
                         w_zero_point: torch.Tensor,
                         bias: torch.Tensor | None, per_token: bool, post_op: str, post_op_args: list[float],
                         x_qmax: int, saturates: bool, asymmetric: bool = False) -> torch.Tensor:
    """:func:`qlinear_dynamic` on checked arguments (``x`` contiguous float32, not empty).
    TorchScript-compatible: the TorchScript module runs this same function (``saturates``: its
    :class:`graphquant.kernels.x86.SaturationProbe`'s answer). ``packed``: ``w`` is a oneDNN weight
    (``w.is_mkldnn``, passed apart so that graphquant.compiled can trace this body with a stand-in)."""
    if packed and per_token and asymmetric:
        return _asymmetric_rows(x, w, w_scale, w_zero_point, bias, post_op, post_op_args, x_qmax, saturates)
    if packed and per_token:
        # oneDNN's GEMM with an int8 (s8) source has no fast kernel on every x86 CPU: on AMD EPYC
        # with AVX512-VNNI it runs a reference kernel, about 2000x slower than uint8 (0.21 s for a
        # 128x384x384 GEMM). The per-token integers go in shifted by 128 as uint8 with zero point
        # 128 (7-bit: -64..63 shifted by 64 onto 0..127): the same integers, int32 sums and results.
        shift = 128 if x_qmax > 127 else 64
        scale, _ = dynamic_qparams(x, True, x_qmax)
        q = (x.to(torch.float32) / scale).round_().add_(shift).clamp_(0, x_qmax).to(torch.uint8)
        y = x86.qlinear_call(q, 1.0, shift, w, w_scale, w_zero_point, None, 1.0, 0, torch.float32, "none", [], x_qmax,
                             saturates)
        y.mul_(scale)  # y is the kernel's own fresh tensor: scaled in place, no second float32 tensor
        if bias is not None:
            y.add_(bias)
        return post_op_in_place(y, post_op, post_op_args)
    q, scale, zero_point = quantize_dynamic_batch(x, per_token, x_qmax, asymmetric)
    if packed:
        return x86.qlinear_dynamic_call(q, scale, zero_point, w, w_scale, w_zero_point, bias, post_op, post_op_args,
                                        x_qmax, saturates)
    acc = F.linear(q.double() - zero_point.double(), w.double())
    y = (acc * (scale.double() * w_scale.double())).float()
    if bias is not None:
        y.add_(bias)
    return post_op_in_place(y, post_op, post_op_args)


def _asymmetric_rows(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_zero_point: torch.Tensor,
                     bias: torch.Tensor | None, post_op: str, post_op_args: list[float], x_qmax: int,
                     saturates: bool) -> torch.Tensor:
    """Per-token uint8 rows with their own zero points on a packed weight. oneDNN takes one zero
    point per call, so the GEMM runs with 0 and each row's comes off after it:
    ``sum_k (q_k - zp) w_kj = sum_k q_k w_kj - zp * sum_k w_kj``, the column sums from the same call
    on one more row of ones (so they carry the kernel's own weight scales)."""
    q, scale, zero_point = quantize_dynamic_batch(x, True, x_qmax, True)
    rows = q.reshape(-1, q.size(-1))
    ones = torch.ones([1, q.size(-1)], dtype=torch.uint8)
    y = x86.qlinear_call(torch.cat([rows, ones]), 1.0, 0, w, w_scale, w_zero_point, None, 1.0, 0, torch.float32, "none",
                         [], x_qmax, saturates)
    out = y[:-1].sub_(zero_point.reshape(-1, 1).to(torch.float32) * y[-1]).mul_(scale.reshape(-1, 1))
    if bias is not None:
        out.add_(bias)
    shape = list(x.shape[:-1])
    shape.append(out.size(-1))
    return post_op_in_place(out.reshape(shape), post_op, post_op_args)


def post_op_in_place(y: torch.Tensor, post_op: str, args: list[float]) -> torch.Tensor:
    """:func:`graphquant.kernels.x86.post_op_float` written into ``y`` (a fresh float32 result): a
    new tensor per activation costs more than the activation at batch 50 (page faults)."""
    if post_op == "gelu" or post_op == "gelu_tanh":
        return torch.ops.aten.gelu_(y, approximate="tanh" if post_op == "gelu_tanh" else "none")
    if post_op == "relu":
        return y.clamp_min_(0.0)
    if post_op == "hardtanh":
        return y.clamp_(args[0], args[1])
    if post_op == "silu":
        return F.silu(y, inplace=True)
    if post_op == "hardswish":
        return F.hardswish(y, inplace=True)
    if post_op == "leaky_relu":
        return F.leaky_relu(y, args[0], inplace=True)
    return x86.post_op_float(y, post_op, args)


def linear_fp16(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Linear with a float16-stored weight, computed in float32 (halves weight memory)."""
    if w.dtype != torch.float16 or x.dtype != torch.float32 or w.dim() != 2:
        raise GraphQuantError(f"graphquant::linear_fp16: wants a float32 input and a 2-d float16 weight, got "
                              f"{x.dtype} and {w.dtype} {tuple(w.shape)}")
    if x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise GraphQuantError(f"graphquant::linear_fp16: input {tuple(x.shape)} does not end in {w.shape[1]} features")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (w.shape[0],)):
        raise GraphQuantError(f"graphquant::linear_fp16: bias must be float32 with {w.shape[0]} entries")
    return F.linear(x, w.float(), bias)


def dequantize_dynamic(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Per-batch (or per-token) integers back to real values. TorchScript-compatible."""
    return (q.to(torch.float32) - zero_point.to(torch.float32)) * scale


def qlinear_dynamic_torchscript(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None, per_token: bool,
                                post_op: str, post_op_args: list[float], x_qmax: int, asymmetric: bool, packed: bool,
                                saturates: bool) -> Tensor:
    """graphquant::qlinear_dynamic: float32 in and out, int8 GEMM inside, then the post-op."""
    out_features = w.size(1) if packed else w.size(0)
    in_features = w.size(0) if packed else w.size(1)
    if x.dtype != torch.float32 or x.dim() < 1 or x.size(-1) != in_features:
        raise ValueError("graphquant::qlinear_dynamic: input must be float32 ending in the weight's in_features")
    if x.numel() == 0:
        shape = list(x.shape[:-1])
        shape.append(out_features)
        return x.new_empty(shape)
    return qlinear_dynamic_math(x.contiguous(), w, packed, w_scale, torch.zeros(out_features, dtype=torch.int64), bias,
                                per_token, post_op, post_op_args, x_qmax, saturates, asymmetric)


def linear_fp16_torchscript(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """graphquant::linear_fp16."""
    if w.dtype != torch.float16:
        raise ValueError("graphquant::linear_fp16: weight must be float16")
    return F.linear(x, w.float(), bias)


def _quantize_dynamic_fake(x, per_token, qmax=255, asymmetric=False):  # type: ignore[no-untyped-def]
    if per_token:
        return (torch.empty_like(x, dtype=torch.uint8 if asymmetric else torch.int8), x.new_empty((*x.shape[:-1], 1)),
                x.new_empty((*x.shape[:-1], 1), dtype=torch.int64))
    return torch.empty_like(x, dtype=torch.uint8), x.new_empty(()), x.new_empty((), dtype=torch.int64)


def _dequantize_dynamic_fake(q, scale, zero_point):  # type: ignore[no-untyped-def]
    return torch.empty(q.shape, dtype=torch.float32)


def _qlinear_dynamic_fake(x, w, w_scale, bias, per_token, post_op="none", post_op_args=(), x_qmax=255,  # type: ignore[no-untyped-def]  # noqa: E501
                          asymmetric=False):
    return x.new_empty((*x.shape[:-1], w_scale.shape[0]))


def _linear_fp16_fake(x, w, bias):  # type: ignore[no-untyped-def]
    return x.new_empty((*x.shape[:-1], w.shape[0]))


# qmax: 255 (uint8 0..255 per tensor, int8 -128..127 per token) or 127 for reduce_range's 7-bit grid
# (0..127, -64..63): one exact int8 call on x86 CPUs without VNNI (kernels/x86.py)
# asymmetric (per token only): uint8 rows, each with its own scale and zero point (one-sided inputs)
register(Kernel("quantize_dynamic", "(Tensor x, bool per_token, int qmax=255, bool asymmetric=False) -> "
                "(Tensor, Tensor, Tensor)", _quantize_dynamic_fake, quantize_dynamic_tensor,
                quantize_dynamic_batch))
register(Kernel("dequantize_dynamic", "(Tensor q, Tensor scale, Tensor zero_point) -> Tensor",
                _dequantize_dynamic_fake, dequantize_dynamic, dequantize_dynamic))
# post_op: an activation on the float32 result (the kernel graph folds a following relu / gelu in)
register(Kernel("qlinear_dynamic", "(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, bool per_token, "
                "str post_op=\"none\", float[] post_op_args=[], int x_qmax=255, bool asymmetric=False) -> Tensor",
                _qlinear_dynamic_fake, qlinear_dynamic, qlinear_dynamic_torchscript, gemm=True, weighted=True,
                timed=True))
register(Kernel("linear_fp16", "(Tensor x, Tensor w, Tensor? bias) -> Tensor", _linear_fp16_fake, linear_fp16,
                linear_fp16_torchscript, weighted=True))
