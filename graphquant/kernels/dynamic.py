"""Dynamic-quantization linear: activations quantized per batch inside the call.

Both backends quantize the activation the same way
(:func:`graphquant.quant_math.quantize_dynamic_tensor`), so the integers match the
reference graph exactly; only the float accumulation order differs.

- oneDNN: ``qlinear_pointwise`` with uint8 input and float32 output (per tensor), or int8
  input with scale 1 and the per-row scale applied to the output (per token).
- portable: the int32 accumulator in float64, then the same rescale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graphquant.errors import GraphQuantError
from graphquant.kernels.onednn import _w_zero_point
from graphquant.quant_math import quantize_dynamic_tensor


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
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (out_features,)):
        raise GraphQuantError(f"graphquant::qlinear_dynamic: bias must be float32 with {out_features} entries")
    return out_features


def qlinear_dynamic(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, per_token: bool
) -> torch.Tensor:
    """float32 in, float32 out; int8 GEMM inside."""
    out_features = check_inputs(x, w, w_scale, bias)
    if x.numel() == 0:
        return x.new_empty((*x.shape[:-1], out_features))
    q, scale, zero_point = quantize_dynamic_tensor(x.contiguous(), per_token)
    if w.is_mkldnn:
        zp = _w_zero_point(out_features)
        if per_token:
            y = torch.ops.onednn.qlinear_pointwise(
                q, 1.0, 0, w, w_scale, zp, None, 1.0, 0, torch.float32, "none", [], ""
            )
            y = y * scale
            return y + bias if bias is not None else y
        return torch.ops.onednn.qlinear_pointwise.tensor(
            q, scale, zero_point, w, w_scale, zp, bias, 1.0, 0, torch.float32, "none", [], ""
        )
    acc = F.linear(q.double() - zero_point.double(), w.double())
    y = (acc * (scale.double() * w_scale.double())).float()
    return y + bias if bias is not None else y


def linear_fp16(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Linear with a float16-stored weight, computed in float32 (halves weight memory)."""
    if w.dtype != torch.float16 or x.dtype != torch.float32 or w.dim() != 2:
        raise GraphQuantError(f"graphquant::linear_fp16: wants a float32 input and a 2-d float16 weight, got "
                              f"{x.dtype} and {w.dtype} {tuple(w.shape)}")  # fmt: skip
    if x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise GraphQuantError(f"graphquant::linear_fp16: input {tuple(x.shape)} does not end in {w.shape[1]} features")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (w.shape[0],)):
        raise GraphQuantError(f"graphquant::linear_fp16: bias must be float32 with {w.shape[0]} entries")
    return F.linear(x, w.float(), bias)
