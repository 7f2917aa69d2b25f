"""The arithmetic: properties that every quantized value must keep."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphquant.kernels import quantize as ops
from graphquant.quant_math import choose_qparams, dequantize, quantize, quantize_tensor

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(lo=finite, hi=finite, symmetric=st.booleans(), dtype=st.sampled_from([torch.uint8, torch.int8]))
def test_qparams_cover_range_and_zero_is_exact(lo, hi, symmetric, dtype):  # type: ignore[no-untyped-def]
    lo, hi = min(lo, hi), max(lo, hi)
    qp = choose_qparams(torch.tensor(lo), torch.tensor(hi), dtype, symmetric)
    assert float(qp.scale) > 0
    assert qp.qmin <= int(qp.zero_point) <= qp.qmax
    zero = dequantize(quantize(torch.zeros(1), qp), qp)
    assert float(zero) == 0.0
    # the observed range is representable to within half a step at both ends
    x = torch.tensor([lo, hi])
    err = (dequantize(quantize(x, qp), qp) - x).abs()
    assert bool((err <= float(qp.scale) / 2 * (1 + 1e-4) + 1e-6).all()), (lo, hi, err)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), span=st.floats(1e-3, 1e3))
def test_round_trip_within_half_step(seed, span):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(257, generator=g) - 0.3) * span
    qp = choose_qparams(x.min(), x.max(), torch.uint8, symmetric=False)
    err = (dequantize(quantize(x, qp), qp) - x).abs().max()
    assert float(err) <= float(qp.scale) / 2 * (1 + 1e-4)


def test_constant_activation_keeps_positive_scale():
    qp = choose_qparams(torch.tensor(0.0), torch.tensor(0.0), torch.uint8, symmetric=False)
    assert float(qp.scale) > 0
    qp = choose_qparams(torch.tensor(3.0), torch.tensor(3.0), torch.uint8, symmetric=False)
    x_hat = dequantize(quantize(torch.tensor([3.0]), qp), qp)
    assert abs(float(x_hat) - 3.0) <= float(qp.scale) / 2


def test_per_channel_agrees_with_per_tensor_on_one_channel():
    torch.manual_seed(0)
    w = torch.randn(4, 9)
    per_channel = choose_qparams(w.amin(1), w.amax(1), torch.int8, symmetric=True, axis=0)
    q = quantize(w, per_channel)
    for c in range(4):
        one = choose_qparams(w[c].min(), w[c].max(), torch.int8, symmetric=True)
        assert torch.equal(q[c], quantize(w[c], one))


def test_symmetric_int8_has_zero_point_zero():
    qp = choose_qparams(torch.tensor([-1.0, -3.0]), torch.tensor([2.0, 1.0]), torch.int8, True, axis=0)
    assert torch.equal(qp.zero_point, torch.zeros(2, dtype=torch.int64))
    assert torch.allclose(qp.scale, torch.tensor([2.0, 3.0]) / 127.5)


@pytest.mark.skipif(not ops.NATIVE_QUANTIZE, reason="this PyTorch has no native per-tensor quantize")
@pytest.mark.parametrize("grid", [(0.037, 131, 0, 255, torch.uint8), (0.02, 0, -128, 127, torch.int8),
                                  (0.05, 64, 0, 127, torch.uint8), (0.05, 3, 2, 200, torch.uint8)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last"])
def test_native_quantize_matches_the_math(grid, layout):  # type: ignore[no-untyped-def]
    """graphquant::quantize_per_tensor's one-pass path: a plain integer tensor, equal to
    quantize_tensor except, by one step, within a float32 rounding of a half step."""
    scale, zero_point, qmin, qmax, dtype = grid
    x = torch.randn(8, 6, 16, 16, generator=torch.Generator().manual_seed(1)) * 4
    x = {"contiguous": x, "transposed": x.transpose(1, 3),
         "channels_last": x.contiguous(memory_format=torch.channels_last)}[layout]
    got = torch.ops.graphquant.quantize_per_tensor(x, scale, zero_point, qmin, qmax, dtype)
    want = quantize_tensor(x, scale, zero_point, qmin, qmax, dtype)
    assert got.dtype == dtype and not got.is_quantized and got.shape == x.shape
    diff = (got.int() - want.int()).abs()
    assert int(diff.max()) <= 1
    near_half = ((x / scale).frac().abs() - 0.5).abs() < 1e-5
    assert not bool(diff[~near_half].any())  # every difference sits at a half step
    assert int(got.min()) >= qmin and int(got.max()) <= qmax


def test_quantize_op_without_the_native_path(monkeypatch):  # type: ignore[no-untyped-def]
    """A torch without quantized dtypes gets quantize_tensor, bit for bit."""
    monkeypatch.setattr(ops, "NATIVE_QUANTIZE", False)
    x = torch.randn(4, 33) * 3
    got = torch.ops.graphquant.quantize_per_tensor(x, 0.03, 128, 0, 255, torch.uint8)
    assert torch.equal(got, quantize_tensor(x, 0.03, 128, 0, 255, torch.uint8))
