"""Bias correction: each bias takes off the mean output shift its weight's rounding causes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphquant as gq
from graphquant.observers import HistogramObserver, MinMaxObserver
from graphquant.passes.bias_correction import _shift
from graphquant.quant_math import fake_quantize
from graphquant.testing import check_graph_mode_op

PER_TENSOR = gq.ObserverSpec("minmax", torch.int8, symmetric=True)


def _batches(shape: tuple[int, ...], mean: float, n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g) + mean,) for _ in range(n)]


def _quantize(model: nn.Module, qconfig: gq.QConfig, data, **kwargs):  # type: ignore[no-untyped-def]
    return gq.quantize(model, {"": qconfig}, lambda m, bs: [m(*b) for b in bs], [data], example_inputs=data[0],
                       **kwargs)


def test_linear_bias_takes_off_the_measured_mean_shift():
    """The new bias is the old one minus mean((wq - w) x) over the calibration data; a linear without a
    bias gets one. With the shift gone, the int8 output's mean error is far smaller."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8, bias=False)).eval()
    with torch.no_grad():
        model[0].weight[0, 0] = 4.0  # one large weight: a coarse per-tensor grid for the rest
    data = _batches((64, 16), mean=3.0)
    corrected = _quantize(model, gq.QConfig(weight=PER_TENSOR, bias_correction=True), data, debug=True)
    plain = _quantize(model, gq.QConfig(weight=PER_TENSOR), data, debug=True)
    observer = MinMaxObserver(torch.int8, symmetric=True)
    w = model[0].weight.detach()
    observer(w)
    x = torch.cat([b[0] for b in data])
    want = -(x @ (fake_quantize(w, observer.qparams()) - w).T).mean(0)
    bias = next(b for name, b in corrected.named_buffers() if name.endswith("corrected_bias"))
    assert torch.allclose(bias, want, rtol=1e-4, atol=1e-6), (bias, want)
    line = gq.report(corrected).bias_correction[0]
    assert line.layer == "0" and line.shift == pytest.approx(float(want.abs().max()), rel=1e-4)
    with torch.no_grad():
        float_out = model(x)
        mean_error = {name: float((q(x) - float_out).mean(0).abs().max()) for name, q in
                      (("plain", plain), ("corrected", corrected))}
    assert mean_error["corrected"] <= 0.2 * mean_error["plain"], mean_error


def test_conv_shift_sums_kernel_positions_per_group():
    """On an input constant in each channel a valid conv's output shift is the same everywhere: the
    formula, for a grouped conv too."""
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(6, 2, 3, 3, generator=g)  # groups=3: 6 input channels
    mean = torch.randn(6, generator=g)
    x = mean.reshape(1, 6, 1, 1).expand(1, 6, 5, 5)
    out = F.conv2d(x, delta, groups=3)
    assert torch.allclose(out[0].flatten(1), _shift(delta, mean, 3)[:, None].expand(6, 9), atol=1e-5)


@pytest.mark.parametrize("backend", ["onednn", "portable"])
def test_kernel_graph_uses_the_corrected_bias(backend):  # type: ignore[no-untyped-def]
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 5))
    data = [(torch.rand(2, 3, 8, 8) + 0.5,) for _ in range(3)]
    result = check_graph_mode_op(model, data, "qconv2d", qconfig=gq.QConfig(bias_correction=True), backend=backend)
    assert result.max_step_diff <= 1.0 and result.sqnr >= 25.0, (result.max_step_diff, result.sqnr)
    lines = gq.report(result.quantized).bias_correction
    assert [(b.layer, b.shift is not None) for b in lines] == [("0", True), ("2", True), ("4", True)]


def test_an_input_read_on_two_axes_is_reported_not_corrected():
    """One value read by a conv (channels on axis 1) and a linear (the last axis): the first asks
    for its means, the second is reported."""

    class TwoReaders(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(4, 4, 1), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.conv(x), self.fc(x)

    data = [(torch.randn(2, 4, 6, 6),) for _ in range(2)]
    q = _quantize(TwoReaders().eval(), gq.QConfig(bias_correction=True), data)
    lines = {b.layer: b for b in gq.report(q).bias_correction}
    assert lines["conv"].shift is not None
    assert lines["fc"].shift is None and "channel means were not recorded" in lines["fc"].reason
    assert "bias correction: 1 of 2 layers corrected" in str(gq.report(q))


def test_channel_means_merge_across_shards():
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, 3, 5, 5, generator=g) * (i + 1) + i for i in range(4)]
    whole, parts = HistogramObserver(), [HistogramObserver(), HistogramObserver()]
    for observer in (whole, *parts):
        observer.track_channel_means(1)
    for i, b in enumerate(batches):
        whole(b)
        parts[i // 2](b)
    parts[0].merge(parts[1])
    merged, single = parts[0].channel_means(), whole.channel_means()
    assert merged is not None and single is not None
    assert torch.allclose(merged, single) and torch.allclose(single, torch.cat(batches).mean((0, 2, 3)))
    assert not whole.track_channel_means(-1)  # one axis per observer


def test_qconfig_round_trip_and_refusal():
    qconfig = gq.QConfig(bias_correction=True)
    assert gq.QConfig.from_dict(qconfig.to_dict()) == qconfig
    with pytest.raises(gq.GraphQuantError, match="bias correction is for static quantization"):
        gq.QConfig(gq.ObserverSpec("dynamic"), gq.ObserverSpec("minmax", torch.int8, symmetric=True),
                   bias_correction=True)
