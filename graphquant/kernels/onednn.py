"""oneDNN int8 kernels (x86): ``torch.ops.onednn.qconv_pointwise`` / ``qlinear_pointwise``.

oneDNN crashes the process on malformed input (an unpacked weight kills it with SIGSEGV),
so every call checks dtype, packing and shape first and raises a ``ValueError`` instead.
Weights are packed once, at convert or load time, by :func:`pack_conv` / :func:`pack_linear`.
"""

from __future__ import annotations

import torch

_POST_OPS = {"none", "relu"}
_zero_points: dict[int, torch.Tensor] = {}


def available() -> bool:
    """Whether this PyTorch build has the oneDNN int8 ops."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.onednn, "qconv_pointwise")


def _w_zero_point(n: int) -> torch.Tensor:
    # symmetric int8 weights: zero point 0 for every output channel
    zp = _zero_points.get(n)
    if zp is None:
        zp = _zero_points[n] = torch.zeros(n, dtype=torch.int64)
    return zp


def pack_conv(
    w: torch.Tensor,
    w_scale: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """Pack an int8 conv weight (out, in/groups, *kernel) into oneDNN's opaque layout."""
    if w.dtype != torch.int8 or w.is_mkldnn:
        raise ValueError(f"graphquant: pack_conv wants a plain int8 weight, got {w.dtype} mkldnn={w.is_mkldnn}")
    return torch.ops.onednn.qconv_prepack(
        w.contiguous(), w_scale.float(), x_scale, x_zero_point, stride, padding, dilation, groups, None
    )


def pack_linear(w: torch.Tensor) -> torch.Tensor:
    """Pack an int8 linear weight (out, in) into oneDNN's opaque layout."""
    if w.dtype != torch.int8 or w.is_mkldnn or w.dim() != 2:
        raise ValueError(f"graphquant: pack_linear wants a plain 2-d int8 weight, got {w.dtype} {tuple(w.shape)}")
    return torch.ops.onednn.qlinear_prepack(w.contiguous(), None)


def _check_common(
    op: str, x: torch.Tensor, x_zero_point: int, w: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_zero_point: int, post_op: str, out_channels: int,
) -> None:  # fmt: skip
    if x.dtype != torch.uint8:
        raise ValueError(f"graphquant::{op}: activation must be uint8, got {x.dtype}")
    if x.device.type != "cpu":
        raise ValueError(f"graphquant::{op}: oneDNN kernels run on CPU, input is on {x.device}")
    if not w.is_mkldnn:
        raise ValueError(f"graphquant::{op}: weight is not packed for oneDNN; pack it with graphquant.kernels.onednn")
    if not (0 <= x_zero_point <= 255 and 0 <= out_zero_point <= 255):
        raise ValueError(f"graphquant::{op}: uint8 zero points must lie in [0, 255]")
    if w_scale.dtype != torch.float32 or w_scale.dim() != 1 or w_scale.numel() != out_channels:
        raise ValueError(f"graphquant::{op}: w_scale must be float32 with {out_channels} entries")
    if bias is not None and (bias.dtype != torch.float32 or bias.numel() != out_channels):
        raise ValueError(f"graphquant::{op}: bias must be float32 with {out_channels} entries")
    if post_op not in _POST_OPS:
        raise ValueError(f"graphquant::{op}: post_op {post_op!r} is not one of {sorted(_POST_OPS)}")


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
    """uint8 convolution, uint8 out (channels-last), checked before oneDNN sees it."""
    out_channels = w.shape[0]
    _check_common("qconv", x, x_zero_point, w, w_scale, bias, out_zero_point, post_op, out_channels)
    # oneDNN packs a conv1d weight as 2-d (out, in, 1, k)
    spatial_ok = x.dim() == w.dim() or (x.dim() == 3 and w.dim() == 4)
    if not spatial_ok or x.shape[1] != w.shape[1] * groups:
        raise ValueError(
            f"graphquant::qconv: input {tuple(x.shape)} does not fit weight {tuple(w.shape)} with groups={groups}"
        )
    if x.shape[0] == 0:
        return _conv_fake_out(x, w, stride, padding, dilation)
    fused = post_op
    if x.dim() == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)  # oneDNN's 3d path wants channels-last
        fused = "none"  # oneDNN has no relu post-op for conv3d: clamp at the zero point below
    y = torch.ops.onednn.qconv_pointwise(
        x, x_scale, x_zero_point, w, w_scale, _w_zero_point(out_channels), bias, stride, padding, dilation,
        groups, out_scale, out_zero_point, None, fused, [], "",
    )  # fmt: skip
    if fused != post_op and out_zero_point > 0:
        y = y.clamp_min_(out_zero_point)  # relu in the uint8 domain; a no-op when the zero point is 0
    return y


def _conv_fake_out(
    x: torch.Tensor, w: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int]
) -> torch.Tensor:
    kernel = w.shape[-(x.dim() - 2):]
    spatial = [
        (size + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
        for i, size in enumerate(x.shape[2:])
    ]
    return x.new_empty((0, w.shape[0], *spatial))


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
    """uint8 linear, uint8 out, checked before oneDNN sees it.

    The packed weight is stored transposed, ``(in, out)``.
    """
    in_features, out_features = w.shape
    _check_common("qlinear", x, x_zero_point, w, w_scale, bias, out_zero_point, post_op, out_features)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"graphquant::qlinear: input {tuple(x.shape)} does not end in {in_features} features")
    if x.numel() == 0:
        return x.new_empty((*x.shape[:-1], out_features))
    return torch.ops.onednn.qlinear_pointwise(
        x.contiguous(), x_scale, x_zero_point, w, w_scale, _w_zero_point(out_features), bias,
        out_scale, out_zero_point, None, post_op, [], "",
    )  # fmt: skip
