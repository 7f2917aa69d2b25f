"""Observers: qparams from statistics, merge equals watching everything."""

from __future__ import annotations

import math

import pytest
import torch

from graphquant.observers import (
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PercentileObserver,
    PerChannelMinMaxObserver,
)
from graphquant.quant_math import fake_quantize


def _shards(seed: int = 0, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, generator=g) * (i + 1) + i for i in range(n)]


@pytest.mark.parametrize("cls", [MinMaxObserver, HistogramObserver, PercentileObserver, EntropyObserver])
def test_merge_of_shards_equals_one_observer(cls):  # type: ignore[no-untyped-def]
    shards = _shards()
    whole = cls()
    whole(torch.cat(shards))
    parts = [cls() for _ in shards]
    for obs, shard in zip(parts, shards):
        obs(shard)
    merged = parts[0]
    for obs in parts[1:]:
        merged.merge(obs)
    assert merged.qparams().scalar() == whole.qparams().scalar()
    if issubclass(cls, HistogramObserver):  # the histogram itself, not only its qparams
        assert torch.equal(merged.histogram, whole.histogram)
        assert int(merged.range_exponent) == int(whole.range_exponent)


def test_histogram_is_independent_of_order_batching_and_sharding():
    """Ranges that grow over the batches (0.01 to 300, one-sided and two-sided, with subnormals
    and float64): any split, order or merge tree gives the same counts and qparams bit for bit."""
    g = torch.Generator().manual_seed(1)
    values = [torch.randn(777, generator=g) * s for s in (0.01, 0.3, 5.0, 300.0)]
    values += [torch.rand(500, generator=g) * 40, torch.tensor([1e-40, -1e-40, 0.0, -0.0])]
    values.append(torch.randn(300, generator=g, dtype=torch.float64) * 1e4)
    whole = HistogramObserver()
    whole(torch.cat([v.float() for v in values[:-1]] + [values[-1].float()]))
    for order in ([0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0], [3, 0, 6, 1, 5, 2, 4]):
        one = HistogramObserver()
        for i in order:
            one(values[i].float())
        shards = [HistogramObserver() for _ in range(3)]
        for k, i in enumerate(order):
            shards[k % 3](values[i].float())
        shards[2].merge(shards[0])  # merge tree: (2 + 0) + 1
        shards[2].merge(shards[1])
        for obs in (one, shards[2]):
            assert torch.equal(obs.histogram, whole.histogram) and obs.qparams().scalar() == whole.qparams().scalar()
            assert (float(obs.min_val), float(obs.max_val)) == (float(whole.min_val), float(whole.max_val))
    assert float(whole.histogram.sum()) == sum(v.numel() for v in values)


def test_histogram_bins_are_floor_of_x_over_a_power_of_two():
    """Each value lands in bin floor(x / w) + bins / 2 of the grid ``[-R, R)``, ``R`` the least
    power of two above max |x|: checked against float64 arithmetic, edges included."""
    obs = HistogramObserver(bins=16)
    obs(torch.tensor([-3.0, -2.5, -0.25, 0.0, 0.25, 0.5, 2.0, 3.9999998]))
    assert int(obs.range_exponent) == 2 and torch.equal(obs.bin_edges()[[0, 8, 16]], torch.tensor([-4.0, 0.0, 4.0],
                                                                                                   dtype=torch.float64))
    expected = torch.zeros(16, dtype=torch.float64)
    for v in (-3.0, -2.5, -0.25, 0.0, 0.25, 0.5, 2.0, 3.9999998):
        expected[math.floor(v / 0.5) + 8] += 1
    assert torch.equal(obs.histogram, expected)
    obs(torch.tensor([4.0]))  # R grows to 8: pairs of bins merge into the middle half
    coarse = torch.zeros(16, dtype=torch.float64)
    coarse[4:12] = expected.view(8, 2).sum(1)
    coarse[8 + 4] += 1  # 4.0 / 1.0
    assert int(obs.range_exponent) == 3 and torch.equal(obs.histogram, coarse)
    with pytest.raises(ValueError, match="power of two"):
        HistogramObserver(bins=1000)


def test_per_channel_merge():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g) * 3
    whole = PerChannelMinMaxObserver(axis=0)
    whole(torch.cat([a, b], dim=1))
    left, right = PerChannelMinMaxObserver(axis=0), PerChannelMinMaxObserver(axis=0)
    left(a)
    right(b)
    left.merge(right)
    assert torch.equal(left.qparams().scale, whole.qparams().scale)


def test_minmax_covers_the_range():
    obs = MinMaxObserver()
    for x in _shards():
        obs(x)
    qp = obs.qparams()
    scale, zero_point = qp.scalar()
    assert (0 - zero_point) * scale <= float(obs.min_val) + scale / 2
    assert (255 - zero_point) * scale >= float(obs.max_val) - scale / 2


def test_histogram_clips_a_rare_outlier_and_beats_minmax():
    """One outlier at 60 among a million N(0, 1) values: clipping it at b costs (60 - b)**2,
    keeping it costs every value a coarser step; the optimum (~24) lies in between."""
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    x[0] = 60.0
    hist, minmax = HistogramObserver(), MinMaxObserver()
    hist(x)
    minmax(x)
    err_hist = (fake_quantize(x, hist.qparams()) - x).pow(2).mean()
    err_minmax = (fake_quantize(x, minmax.qparams()) - x).pow(2).mean()
    assert 10.0 < hist.search_range()[1] < 40.0
    assert float(err_hist) < float(err_minmax)


def test_histogram_never_worse_than_minmax_on_heavy_tails():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(torch.tensor(2.0)).sample((50000,))
    hist, minmax = HistogramObserver(), MinMaxObserver()
    hist(x)
    minmax(x)
    err_hist = (fake_quantize(x, hist.qparams()) - x).pow(2).mean()
    err_minmax = (fake_quantize(x, minmax.qparams()) - x).pow(2).mean()
    assert float(err_hist) < float(err_minmax)


def test_histogram_keeps_a_single_outlier_when_that_costs_less():
    """One outlier among 20000 values costs more clipped (56**2) than kept (a coarser step)."""
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    x[0] = 60.0
    hist = HistogramObserver()
    hist(x)
    assert hist.search_range()[1] >= 55.0


def test_histogram_keeps_a_compact_range():
    x = torch.rand(10000) * 2  # uniform on [0, 2]: nothing to clip
    hist = HistogramObserver()
    hist(x)
    a, b = hist.search_range()
    assert a <= 0.02 and b >= 1.95


def test_moving_average_follows_batches():
    obs = MovingAverageMinMaxObserver(averaging_constant=0.5)
    obs(torch.tensor([0.0, 1.0]))
    obs(torch.tensor([0.0, 3.0]))
    assert float(obs.max_val) == pytest.approx(2.0)


def test_observer_passes_input_through_and_ignores_empty():
    obs = MinMaxObserver()
    x = torch.randn(3)
    assert obs(x) is x
    obs(torch.empty(0))
    assert int(obs.num_batches) == 1


def test_merge_refuses_another_kind():
    with pytest.raises(TypeError, match="cannot merge MinMaxObserver into HistogramObserver"):
        HistogramObserver().merge(MinMaxObserver())


def test_histogram_counts_in_parts_and_skips_non_finite(monkeypatch):  # type: ignore[no-untyped-def]
    """Counting in parts changes nothing; float64 inputs count like their float32 values where
    those are the same numbers; NaN and inf are left out."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4096, generator=g) * 3, torch.randn(4096, generator=g) * 5 + 1]
    parts, whole, wide = HistogramObserver(), HistogramObserver(), HistogramObserver()
    for x in batches:
        whole(x)
        wide(x.double())
    monkeypatch.setattr(HistogramObserver, "_CHUNK", 1000)  # four parts per batch
    for x in batches:
        parts(x)
    assert float(parts.histogram.sum()) == 8192
    assert torch.equal(parts.histogram, whole.histogram) and torch.equal(wide.histogram, whole.histogram)
    dirty = HistogramObserver()
    dirty.observe(torch.tensor([float("nan"), float("inf"), -1.0, 2.0, 0.5]))
    assert float(dirty.histogram.sum()) == 3 and (float(dirty.min_val), float(dirty.max_val)) == (-1.0, 2.0)


def _outlier_data() -> torch.Tensor:
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    x[:5] = torch.tensor([40.0, 35.0, -30.0, 38.0, 33.0])
    return x


@pytest.mark.parametrize("symmetric", [False, True])
def test_percentile_clips_each_tail_at_its_percentile(symmetric):  # type: ignore[no-untyped-def]
    x = _outlier_data()
    obs = PercentileObserver(dtype=torch.int8 if symmetric else torch.uint8, symmetric=symmetric, percentile=99.9)
    obs(x)
    a, b = obs.search_range()
    width = float(obs.bin_edges()[1] - obs.bin_edges()[0])
    if symmetric:
        t = float(torch.quantile(x.abs()[:100_000], 0.999))  # 3.29 for N(0, 1)
        assert abs(b - 3.29) <= 0.1 + width and a == -b, (a, b, t)
    else:
        assert abs(b - 3.09) <= 0.05 + width and abs(a + 3.09) <= 0.05 + width, (a, b)
    full = PercentileObserver(percentile=100.0)
    full(x)
    assert full.search_range() == (float(x.min()), float(x.max()))  # 100: min and max
    with pytest.raises(ValueError, match=r"percentile must be in \(50, 100\]"):
        PercentileObserver(percentile=30)


def test_entropy_clips_outliers_and_beats_minmax_but_keeps_a_compact_range():
    x = _outlier_data().abs()  # one-sided, like a relu output: 256 levels on [0, t]
    entropy, minmax = EntropyObserver(), MinMaxObserver()
    entropy(x)
    minmax(x)
    a, b = entropy.search_range()
    assert a == float(x.min()) and 3.0 < b < 20.0, (a, b)
    bulk = x[5:]  # the five outliers are clipped: everything else gets a 2.5x finer step
    err_entropy = (fake_quantize(bulk, entropy.qparams()) - bulk).pow(2).mean()
    err_minmax = (fake_quantize(bulk, minmax.qparams()) - bulk).pow(2).mean()
    assert float(err_entropy) < float(err_minmax) / 4, (float(err_entropy), float(err_minmax))
    uniform = EntropyObserver()
    uniform(torch.rand(100_000, generator=torch.Generator().manual_seed(1)) * 2)
    assert uniform.search_range()[1] >= 1.9  # nothing to clip: the threshold stays near the max
    gaussian = EntropyObserver(dtype=torch.int8, symmetric=True)  # 128 levels a side
    gaussian(torch.randn(100_000, generator=torch.Generator().manual_seed(2)))
    a, b = gaussian.search_range()
    assert a == -b and 3.0 < b < 5.0, (a, b)  # about 4 sigma, as TensorRT's calibrator finds


def test_calibration_methods_are_selectable_per_module_path():
    from conftest import calibration_batches, make_net

    import graphquant as gq
    from graphquant.passes.lower import observer_qparams

    spec = {"percentile": gq.ObserverSpec("percentile", options=(("percentile", 99.0),)),
            "entropy": gq.ObserverSpec("entropy"), "mse": gq.ObserverSpec("mse")}
    qconfig_dict = {"": gq.default_qconfig, "conv1": gq.QConfig(activation=spec["percentile"]),
                    "fc2": gq.QConfig(activation=spec["entropy"])}
    prepared = gq.prepare(make_net(), qconfig_dict, (calibration_batches()[0],))
    gq.calibrate(prepared, calibration_batches())
    assert prepared.graph_module is not None
    kinds = {type(m).__name__ for m in prepared.graph_module.modules()}
    assert {"PercentileObserver", "EntropyObserver", "HistogramObserver"} <= kinds, kinds
    assert observer_qparams(prepared.graph_module)
    q = gq.convert(prepared)
    with torch.no_grad():
        x = calibration_batches(1, seed=9)[0]
        assert gq.quant_math.sqnr(make_net()(x), q(x)) > 20
