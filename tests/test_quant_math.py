"""The arithmetic: properties that every quantized value must keep."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphquant.quant_math import choose_qparams, dequantize, quantize

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
