"""``graphquant::qlinear``: uint8 linear with per-channel int8 weights, uint8 out (float32 with
``float_out``, for a linear whose output only float ops read: one rounding fewer than quantizing it
and dequantizing right after). A packed oneDNN weight is stored transposed, ``(in, out)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from graphquant.kernels import onednn, portable
from graphquant.kernels.conv import POST_OP, X_QMAX
from graphquant.kernels.registry import Kernel, register
from graphquant.kernels.scripted import check_weighted

_QLINEAR = (
    "(Tensor x, float x_scale, int x_zero_point, Tensor w, Tensor w_scale, Tensor? bias, float out_scale, "
    f"int out_zero_point, {POST_OP}, bool float_out=False, {X_QMAX}) -> Tensor"
)


def _qlinear_fake(x, x_scale, x_zero_point, w, w_scale, bias, out_scale, out_zero_point, post_op, post_op_args=(),  # type: ignore[no-untyped-def]  # noqa: E501
                  float_out=False, x_qmax=255):
    return x.new_empty((*x.shape[:-1], w_scale.shape[0]), dtype=torch.float32 if float_out else torch.uint8)


def qlinear_torchscript(x: Tensor, x_scale: float, x_zero_point: int, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                        out_scale: float, out_zero_point: int, post_op: str, post_op_args: list[float],
                        float_out: bool, x_qmax: int, packed: bool, saturates: bool) -> Tensor:
    """graphquant::qlinear."""
    if float_out:
        out_scale, out_zero_point = 1.0, 0
    if not packed:
        check_weighted(x, x_zero_point, w, w_scale, bias, out_zero_point, w.size(0))
        acc = F.linear(x.double() - x_zero_point, w.double())
        return portable.requantize(acc, x_scale, w_scale, bias, out_scale, out_zero_point, post_op, post_op_args, -1,
                                   None, float_out)
    in_features, out_features = w.size(0), w.size(1)
    check_weighted(x, x_zero_point, w, w_scale, bias, out_zero_point, out_features)
    if x.dim() < 1 or x.size(-1) != in_features:
        raise ValueError("graphquant::qlinear: input does not end in the weight's in_features")
    w_zero_point = torch.zeros(out_features, dtype=torch.int64)
    return onednn.qlinear_run(x, x_scale, x_zero_point, w, w_scale, w_zero_point, bias, out_scale, out_zero_point,
                              post_op, post_op_args, float_out, x_qmax, saturates)


register(Kernel("qlinear", _QLINEAR, _qlinear_fake, onednn.on_weight_backend("qlinear"), qlinear_torchscript,
                planner=onednn.qlinear_plan, gemm=True, weighted=True, bias_corrected=True, timed=True))
