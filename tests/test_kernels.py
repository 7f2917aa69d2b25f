"""int8 kernels: oneDNN against the portable backend and the float math; guarded inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphquant  # noqa: F401  (registers torch.ops.graphquant)
from graphquant.kernels import onednn, portable
from graphquant.quant_math import choose_qparams, dequantize, quantize

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this PyTorch has no oneDNN int8 ops")


def _quantized_operands(out_channels: int, w_shape: tuple[int, ...], x: torch.Tensor):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(w_shape, generator=g)
    w_qp = choose_qparams(w.flatten(1).amin(1), w.flatten(1).amax(1), torch.int8, True, axis=0)
    x_qp = choose_qparams(x.min(), x.max(), torch.uint8, False)
    bias = torch.randn(out_channels, generator=g)
    return quantize(w, w_qp), w_qp, quantize(x, x_qp), x_qp, bias


@pytest.mark.parametrize("post_op", ["none", "relu"])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_kernels_agree_with_the_math(post_op, groups):  # type: ignore[no-untyped-def]
    x = torch.randn(2, 4, 9, 9)
    w_q, w_qp, x_q, x_qp, bias = _quantized_operands(6, (6, 4 // groups, 3, 3), x)
    x_scale, x_zp = x_qp.scalar()
    args = ([2, 1], [1, 1], [1, 1], groups)
    y = F.conv2d(dequantize(x_q, x_qp), dequantize(w_q, w_qp), bias, *args)
    y = y.relu() if post_op == "relu" else y
    out_qp = choose_qparams(y.min(), y.max(), torch.uint8, False)
    out_scale, out_zp = out_qp.scalar()
    expected = quantize(y, out_qp).int()
    packed = onednn.pack_conv(w_q, w_qp.scale, x_scale, x_zp, *args)
    got_onednn = onednn.qconv(x_q, x_scale, x_zp, packed, w_qp.scale, bias, *args, out_scale, out_zp, post_op)
    got_portable = portable.qconv(x_q, x_scale, x_zp, w_q, w_qp.scale, bias, *args, out_scale, out_zp, post_op)
    assert int((got_onednn.int() - expected).abs().max()) <= 1
    assert int((got_portable.int() - expected).abs().max()) <= 1


def test_linear_kernels_agree_with_the_math():
    x = torch.randn(3, 5, 32)
    w_q, w_qp, x_q, x_qp, bias = _quantized_operands(16, (16, 32), x)
    x_scale, x_zp = x_qp.scalar()
    y = F.linear(dequantize(x_q, x_qp), dequantize(w_q, w_qp), bias)
    out_qp = choose_qparams(y.min(), y.max(), torch.uint8, False)
    out_scale, out_zp = out_qp.scalar()
    expected = quantize(y, out_qp).int()
    got = onednn.qlinear(x_q, x_scale, x_zp, onednn.pack_linear(w_q), w_qp.scale, bias, out_scale, out_zp, "none")
    got_p = portable.qlinear(x_q, x_scale, x_zp, w_q, w_qp.scale, bias, out_scale, out_zp, "none")
    assert got.shape == (3, 5, 16)
    assert int((got.int() - expected).abs().max()) <= 1
    assert int((got_p.int() - expected).abs().max()) <= 1


def test_unpacked_linear_weight_is_refused_not_a_crash():
    """oneDNN would SIGSEGV on an unpacked weight; the guard raises first."""
    w = torch.randint(-128, 127, (8, 16), dtype=torch.int8)
    x = torch.randint(0, 255, (2, 16), dtype=torch.uint8)
    with pytest.raises(ValueError, match="not packed for oneDNN"):
        onednn.qlinear(x, 0.1, 0, w, torch.ones(8), None, 0.1, 0, "none")


@pytest.mark.parametrize("change,needle", [
    ("float_input", "activation must be uint8"),
    ("bad_scale", "w_scale must be float32 with 8 entries"),
    ("bad_bias", "bias must be float32 with 8 entries"),
    ("bad_features", "does not end in 16 features"),
    ("bad_zero_point", r"zero points must lie in \[0, 255\]"),
    ("bad_post_op", "post_op 'gelu'"),
])  # fmt: skip
def test_linear_guards(change, needle):  # type: ignore[no-untyped-def]
    packed = onednn.pack_linear(torch.randint(-128, 127, (8, 16), dtype=torch.int8))
    args = dict(x=torch.randint(0, 255, (2, 16), dtype=torch.uint8), x_scale=0.1, x_zero_point=0, w=packed,
                w_scale=torch.ones(8), bias=None, out_scale=0.1, out_zero_point=0, post_op="none")  # fmt: skip
    if change == "float_input":
        args["x"] = torch.randn(2, 16)
    elif change == "bad_scale":
        args["w_scale"] = torch.ones(7)
    elif change == "bad_bias":
        args["bias"] = torch.ones(8, dtype=torch.float64)
    elif change == "bad_features":
        args["x"] = torch.randint(0, 255, (2, 15), dtype=torch.uint8)
    elif change == "bad_zero_point":
        args["x_zero_point"] = 300
    else:
        args["post_op"] = "gelu"
    with pytest.raises(ValueError, match=needle):
        onednn.qlinear(**args)


def test_conv_guard_checks_channels():
    w = torch.randint(-128, 127, (8, 4, 3, 3), dtype=torch.int8)
    packed = onednn.pack_conv(w, torch.ones(8), 0.1, 0, [1, 1], [0, 0], [1, 1], 1)
    x = torch.randint(0, 255, (1, 5, 8, 8), dtype=torch.uint8)
    with pytest.raises(ValueError, match="does not fit weight"):
        onednn.qconv(x, 0.1, 0, packed, torch.ones(8), None, [1, 1], [0, 0], [1, 1], 1, 0.1, 0, "none")


def test_empty_batch():
    packed = onednn.pack_linear(torch.randint(-128, 127, (8, 16), dtype=torch.int8))
    x = torch.empty(0, 16, dtype=torch.uint8)
    assert onednn.qlinear(x, 0.1, 0, packed, torch.ones(8), None, 0.1, 0, "none").shape == (0, 8)
