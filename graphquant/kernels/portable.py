"""Pure-PyTorch int8 kernels: integer arithmetic simulated exactly, on any device.

The int32 accumulator is computed in float64, which holds every int32 exactly, so the
result is what an integer kernel would give: ``acc = sum((x_q - x_zp) * w_q) + bias_q``,
then ``y_q = clamp(round(acc * x_scale * w_scale / out_scale) + out_zp)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def check_inputs(op: str, x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise a ``ValueError`` naming the argument before any arithmetic runs."""
    if x.dtype != torch.uint8:
        raise ValueError(f"graphquant::{op}: activation must be uint8, got {x.dtype}")
    if w.dtype != torch.int8:
        raise ValueError(f"graphquant::{op}: weight must be int8, got {w.dtype}")
    if w_scale.dim() != 1 or w_scale.numel() != w.shape[0]:
        raise ValueError(f"graphquant::{op}: w_scale must have one entry per output channel ({w.shape[0]})")
    if bias is not None and bias.numel() != w.shape[0]:
        raise ValueError(f"graphquant::{op}: bias must have one entry per output channel ({w.shape[0]})")


def _requantize(
    acc: torch.Tensor,
    x_scale: float,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_scale: float,
    out_zero_point: int,
    post_op: str,
    channel_axis: int,
) -> torch.Tensor:
    shape = [1] * acc.dim()
    shape[channel_axis] = -1
    acc_scale = (x_scale * w_scale.double()).reshape(shape)
    if bias is not None:
        # bias uses scale x_scale * w_scale so it adds straight into the int32 accumulator
        acc = acc + torch.round(bias.double().reshape(shape) / acc_scale)
    q = torch.round(acc * (acc_scale / out_scale)) + out_zero_point
    qmin = out_zero_point if post_op == "relu" else 0
    return q.clamp(qmin, 255).to(torch.uint8)


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
) -> torch.Tensor:
    """uint8 convolution with per-channel int8 weights, uint8 out."""
    check_inputs("qconv", x, w, w_scale, bias)
    xi = x.double() - x_zero_point
    acc = _CONV[x.dim()](xi, w.double(), None, stride, padding, dilation, groups)
    return _requantize(acc, x_scale, w_scale, bias, out_scale, out_zero_point, post_op, 1)


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
) -> torch.Tensor:
    """uint8 linear with per-channel int8 weights, uint8 out."""
    check_inputs("qlinear", x, w, w_scale, bias)
    acc = F.linear(x.double() - x_zero_point, w.double())
    return _requantize(acc, x_scale, w_scale, bias, out_scale, out_zero_point, post_op, -1)
