"""Observers: qparams from statistics, merge equals watching everything."""

from __future__ import annotations

import pytest
import torch

from graphquant.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PerChannelMinMaxObserver,
)
from graphquant.quant_math import fake_quantize


def _shards(seed: int = 0, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, generator=g) * (i + 1) + i for i in range(n)]


@pytest.mark.parametrize("cls", [MinMaxObserver, HistogramObserver])
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
    if cls is MinMaxObserver:
        assert merged.qparams().scalar() == whole.qparams().scalar()
    else:
        # histograms over different ranges are re-binned: the chosen range agrees to a bin or two
        width = float(whole.max_val - whole.min_val) / whole.bins
        a1, b1 = merged.search_range()
        a2, b2 = whole.search_range()
        assert abs(a1 - a2) <= 8 * width and abs(b1 - b2) <= 8 * width


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


def test_histogram_counts_match_float64_binning_in_parts_and_skip_non_finite(monkeypatch):  # type: ignore[no-untyped-def]
    """The one-pass float32 counts (histc) are torch.histogram's float64 counts up to values on
    a bin edge; counting in parts changes nothing; NaN and inf are left out, as before."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4096, generator=g) * 3, torch.randn(4096, generator=g) * 5 + 1]
    fast, exact = HistogramObserver(), HistogramObserver()
    monkeypatch.setattr(HistogramObserver, "_CHUNK", 1000)  # four parts per batch
    for x in batches:
        fast(x)
        exact(x.double())  # float64 input: torch.histogram
    assert float(fast.histogram.sum()) == float(exact.histogram.sum()) == 8192
    assert float((fast.histogram - exact.histogram).abs().sum()) <= 8  # a handful of edge values
    fq, eq = fast.qparams(), exact.qparams()
    assert abs(float(fq.scale) / float(eq.scale) - 1) < 1e-2 and abs(int(fq.zero_point) - int(eq.zero_point)) <= 1
    dirty = HistogramObserver()
    dirty.observe(torch.tensor([float("nan"), float("inf"), -1.0, 2.0, 0.5]))
    assert float(dirty.histogram.sum()) == 3 and (float(dirty.min_val), float(dirty.max_val)) == (-1.0, 2.0)
