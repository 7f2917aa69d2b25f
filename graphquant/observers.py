"""Observers: statistics in, ``(scale, zero_point)`` out.

An observer is an ``nn.Module`` that the prepared graph calls on an activation during
calibration; it returns its input unchanged. ``qparams()`` turns what it saw into
:class:`~graphquant.quant_math.QParams`. ``merge(other)`` folds in the statistics of
another observer of the same kind, so calibration can be sharded.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from graphquant.errors import GraphQuantError
from graphquant.quant_math import UINT4, QParams, choose_float_qparams, choose_qparams, dtype_range


class ChannelMeans(nn.Module):
    """The mean of each channel of what passes, along ``mean_axis``, once asked for (bias correction,
    graphquant.passes.bias_correction): for observers, and for the shared-qparams markers of values
    that have no observer of their own (a linear after a flatten). Sums and counts merge exactly."""

    channel_sum: torch.Tensor
    channel_count: torch.Tensor

    def _init_channel_means(self) -> None:
        self.mean_axis: int | None = None
        self.register_buffer("channel_sum", torch.empty(0, dtype=torch.float64))
        self.register_buffer("channel_count", torch.tensor(0, dtype=torch.int64))

    def track_channel_means(self, axis: int) -> bool:
        """Also record the mean of each channel along ``axis`` (1: a conv's input, -1: a linear's), for
        bias correction. False where this observer already records them along another axis."""
        if self.mean_axis is not None and self.mean_axis != axis:
            return False
        self.mean_axis = axis
        return True

    def channel_means(self) -> torch.Tensor | None:
        """Each channel's mean over what was seen (float32), or None when not recorded."""
        if self.mean_axis is None or int(self.channel_count) == 0:
            return None
        return (self.channel_sum / int(self.channel_count)).float()

    def _add_channel_sums(self, x: torch.Tensor) -> None:
        if self.mean_axis is None or x.dim() < 2 or not bool(torch.isfinite(x).all()):
            return  # NaN/Inf are warned about where the values are observed
        rows = x.detach().movedim(self.mean_axis, -1).reshape(-1, x.shape[self.mean_axis])
        sums = rows.sum(0, dtype=torch.float64)
        self.channel_sum = sums if self.channel_sum.numel() == 0 else self.channel_sum + sums
        self.channel_count += rows.shape[0]

    def _merge_channel_sums(self, other: ChannelMeans) -> None:
        if other.channel_sum.numel():
            self.channel_sum = other.channel_sum.clone() if self.channel_sum.numel() == 0 else (
                self.channel_sum + other.channel_sum)
            self.channel_count += other.channel_count


class Observer(ChannelMeans):
    """Base class: records statistics of the tensors it is called on.

    The statistics live in the observer's buffers, and ``merge`` combines another observer's
    buffers into its own: :mod:`graphquant.distributed` moves buffers between ranks and merges
    them, so a new observer shards as soon as both hold.

    (The class-level annotations type the buffers for mypy: ``nn.Module.__getattr__`` returns
    ``Tensor | Module``.)

    ``reduce_range`` (uint8 activations): 7-bit activations on 0..127 instead of 0..255, like
    torch.ao's ``reduce_range`` for x86. x86 CPUs without VNNI add pairs of uint8 x int8 products
    in int16 and saturate above 127 (kernels/x86.py), so on them a 7-bit activation runs in one
    exact int8 call where an 8-bit one takes two. Unlike torch.ao the grid also *ends* at 127
    (qmax 127, and the kernel graph clamps every requantized value there): a histogram observer
    clips a tail past its chosen range, and with fbgemm's clamp at 255 those tail values would
    reach the next layer above 127 (fbgemm saturates on them; here every such layer would take
    the two-call path: measured on ResNet-50, 51 of 53 convs). Costs one bit of resolution.
    """

    num_batches: torch.Tensor

    def __init__(self, dtype: torch.dtype = torch.uint8, symmetric: bool = False,
                 reduce_range: bool | str = False) -> None:
        super().__init__()
        self.dtype = dtype
        self.symmetric = symmetric
        if reduce_range not in (True, False, "auto"):
            raise GraphQuantError(f"graphquant: reduce_range is True, False or 'auto', got {reduce_range!r}")
        if reduce_range and dtype != torch.uint8:
            raise GraphQuantError(f"graphquant: reduce_range is for uint8 activations, not {dtype}")
        # "auto": the full grid until convert decides (passes/lower.resolve_auto_ranges: 7 bits where a
        # oneDNN GEMM or conv that saturates on this CPU reads the value)
        self.reduce_range: bool | str = reduce_range
        self.qmin, self.qmax = self._grid(reduce_range is True)
        self.register_buffer("num_batches", torch.tensor(0, dtype=torch.int64))
        self._init_channel_means()

    def _grid(self, seven_bit: bool) -> tuple[int, int]:
        qmin, qmax = dtype_range(self.dtype)
        return (qmin, (qmax - qmin) // 2 + qmin) if seven_bit else (qmin, qmax)  # 127: the 7-bit grid's end

    def use_reduce_range(self, seven_bit: bool) -> None:
        """Put the calibrated range on 0..127 (``seven_bit``) or the dtype's full grid (an ``"auto"``
        observer's decision, at convert)."""
        self.reduce_range = seven_bit
        self.qmin, self.qmax = self._grid(seven_bit)

    def choose(self, min_val: torch.Tensor, max_val: torch.Tensor) -> QParams:
        """qparams spanning ``[min_val, max_val]`` on this observer's grid (0..127 with ``reduce_range``)."""
        return choose_qparams(min_val, max_val, self.dtype, self.symmetric, self.qmin, self.qmax)

    @property
    def has_data(self) -> bool:
        """Whether the observer has seen at least one tensor."""
        return bool(self.num_batches > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0 or not x.is_floating_point():
            return x
        values = x.detach()
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            # NaN/Inf would turn the range, and so every scale, into NaN: skip them, loudly
            warnings.warn(
                f"graphquant: calibration data has {int((~finite).sum())} NaN/Inf values at "
                f"{self.where or 'an observer'}; they are ignored. Clean the calibration data",
                stacklevel=2,
            )
            values = values[finite]
            if values.numel() == 0:
                return x
        self.observe(values)
        self._add_channel_sums(x)
        self.num_batches += 1
        return x

    @property
    def where(self) -> str:
        """Observer name and module path, set by ``insert_observers`` (for messages)."""
        return str(getattr(self, "graphquant_where", ""))

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def qparams(self) -> QParams:
        """The scale and zero point for what was observed."""
        raise NotImplementedError

    def merge(self, other: Observer) -> None:
        """Fold in ``other``'s statistics, as if this observer had seen its tensors too."""
        self._check_same_kind(other)
        self._merge_channel_sums(other)
        if other.has_data:
            self._merge_statistics(other)
        self.num_batches += other.num_batches

    def _check_same_kind(self, other: Observer) -> None:
        if type(other) is not type(self):
            raise TypeError(f"graphquant: cannot merge {type(other).__name__} into {type(self).__name__}")

    def _merge_statistics(self, other: Observer) -> None:
        """Fold in the statistics of this kind of observer: ``other`` is the same kind and has data;
        ``num_batches`` are still each side's own. An observer without statistics (fixed qparams)
        keeps this."""

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, symmetric={self.symmetric}" + (
            f", reduce_range={self.reduce_range!r}" if self.reduce_range else "")


class MinMaxObserver(Observer):
    """Running minimum and maximum of everything seen."""

    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(self, dtype: torch.dtype = torch.uint8, symmetric: bool = False,
                 reduce_range: bool | str = False) -> None:
        super().__init__(dtype, symmetric, reduce_range)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.float())
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def qparams(self) -> QParams:
        return self.choose(self.min_val, self.max_val)

    def _merge_statistics(self, other: Observer) -> None:
        assert isinstance(other, MinMaxObserver)  # checked by merge: the same kind
        self.min_val = torch.minimum(self.min_val, other.min_val)
        self.max_val = torch.maximum(self.max_val, other.max_val)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's minimum and maximum.

    Less sensitive than :class:`MinMaxObserver` to one outlier batch. ``merge`` takes
    the sample-weighted mean of the two averages: exact for equal-length shards only.
    """

    def __init__(
        self, dtype: torch.dtype = torch.uint8, symmetric: bool = False, averaging_constant: float = 0.01,
        reduce_range: bool | str = False,
    ) -> None:
        super().__init__(dtype, symmetric, reduce_range)
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"graphquant: averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = averaging_constant

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.float())
        if self.num_batches == 0:
            self.min_val, self.max_val = lo, hi
        else:
            c = self.averaging_constant
            self.min_val = self.min_val + c * (lo - self.min_val)
            self.max_val = self.max_val + c * (hi - self.max_val)

    def _merge_statistics(self, other: Observer) -> None:
        assert isinstance(other, MinMaxObserver)  # checked by merge: the same kind
        n, m = int(self.num_batches), int(other.num_batches)
        if n == 0:
            self.min_val, self.max_val = other.min_val.clone(), other.max_val.clone()
        else:
            self.min_val = (self.min_val * n + other.min_val * m) / (n + m)
            self.max_val = (self.max_val * n + other.max_val * m) / (n + m)


def _merge_extremes(observer: PerChannelMinMaxObserver | SmoothingObserver,
                    other: PerChannelMinMaxObserver | SmoothingObserver) -> None:
    """Per-channel minima and maxima of ``other`` (not empty) folded into ``observer``'s."""
    if observer.min_val.numel() == 0:
        observer.min_val, observer.max_val = other.min_val.clone(), other.max_val.clone()
    else:
        observer.min_val = torch.minimum(observer.min_val, other.min_val)
        observer.max_val = torch.maximum(observer.max_val, other.max_val)


class PerChannelMinMaxObserver(Observer):
    """Minimum and maximum of each slice along ``axis`` (output channels of a weight)."""

    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(self, dtype: torch.dtype = torch.int8, symmetric: bool = True, axis: int = 0) -> None:
        super().__init__(dtype, symmetric)
        self.axis = axis
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    def observe(self, x: torch.Tensor) -> None:
        flat = x.float().transpose(0, self.axis).reshape(x.shape[self.axis], -1)
        lo, hi = torch.aminmax(flat, dim=1)
        if self.min_val.numel() == 0:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)

    def qparams(self) -> QParams:
        return choose_qparams(self.min_val, self.max_val, self.dtype, self.symmetric, axis=self.axis)

    def _merge_statistics(self, other: Observer) -> None:
        assert isinstance(other, PerChannelMinMaxObserver)  # checked by merge: the same kind
        _merge_extremes(self, other)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, axis={self.axis}"


class PerChannelFloatQParamsObserver(PerChannelMinMaxObserver):
    """Per-row float qparams of an embedding table (torch.ao's ``per_channel_affine_float_qparams``):
    each row's own minimum as a float offset and ``(max - min) / qmax`` as its scale.

    ``dtype=torch.uint8`` gives 8-bit rows with float32 qparams; ``torch.uint4`` 4-bit rows
    (stored two per byte) with float16 qparams, as the row-wise kernels store them.
    """

    def __init__(self, dtype: torch.dtype = torch.uint8, symmetric: bool = False, axis: int = 0) -> None:
        if dtype not in (torch.uint8, UINT4) or symmetric or axis != 0:
            raise ValueError("graphquant: float qparams are asymmetric, per row (axis 0), uint8 or uint4")
        super().__init__(dtype, symmetric, axis)

    def qparams(self) -> QParams:
        scale_dtype = torch.float32 if self.dtype == torch.uint8 else torch.float16
        return choose_float_qparams(self.min_val, self.max_val, self.qmax, scale_dtype)


class HistogramObserver(Observer):
    """Histogram of the values seen; ``qparams`` searches the clipping range that
    minimises the expected quantization error.

    The error of a range ``[a, b]`` with step ``d = (b - a) / (qmax - qmin)`` is the
    squared clipping error of the values outside it plus ``d**2 / 12`` (uniform rounding
    error) for each value inside. Prefix sums make every candidate pair O(1), so the
    search tries all pairs of bin edges on a grid of ``search_points``.

    The bins lie on a fixed grid: ``bins`` bins of width ``w = 2R / bins`` over ``[-R, R)``,
    ``R`` the smallest power of two above every ``|x|`` seen. A value's bin is
    ``floor(x / w)``, exact in float arithmetic (``w`` is a power of two), and when the range
    grows to ``2R`` each pair of bins becomes one bin of the new grid, exactly. So the
    histogram (counts in float64, exact to 2**53) is a function of the values seen, not of
    their order, their batching or how calibration was split: merging the histograms of any
    shards gives the same histogram, and the same qparams bit for bit, as one observer that
    saw everything (what sharded calibration, :mod:`graphquant.distributed`, relies on). A
    one-sided range (after a relu) occupies a quarter to a half of the bins: 512 to 1024 of the
    default 2048, each candidate range of the search a step of 2 to 4 bins. (8192 bins, each
    step 8 to 16, measured no better: MobileNetV2 W2 13.0-13.8 dB as bins and search points vary,
    13.8 at these defaults; all-MiniLM-L6-v2 static cosine 0.9933-0.9936.)
    """

    histogram: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor
    range_exponent: torch.Tensor

    # the grid's half-range R = 2**range_exponent never goes below 2**MIN_EXPONENT (a tensor of
    # zeros, or of values that small): its bin width stays a normal float32
    MIN_EXPONENT = -100

    def __init__(
        self, dtype: torch.dtype = torch.uint8, symmetric: bool = False, bins: int = 2048, search_points: int = 256,
        reduce_range: bool | str = False,
    ) -> None:
        super().__init__(dtype, symmetric, reduce_range)
        if bins < 4 or bins & (bins - 1):
            raise ValueError(f"graphquant: HistogramObserver bins must be a power of two >= 4, got {bins}")
        self.bins = bins
        self.search_points = search_points
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("range_exponent", torch.tensor(self.MIN_EXPONENT, dtype=torch.int64))

    def _coarsened(self, exponent: int) -> torch.Tensor:
        """This histogram on the grid of half-range ``2**exponent`` (>= this one's): each step
        sums pairs of bins, exactly, into the middle half of the next grid."""
        counts = self.histogram
        for _ in range(exponent - int(self.range_exponent)):
            if not bool(counts.any()):
                break  # nothing to move
            wider = torch.zeros_like(counts)
            wider[self.bins // 4 : 3 * self.bins // 4] = counts.view(-1, 2).sum(1)
            counts = wider
        return counts

    def bin_edges(self) -> torch.Tensor:
        """The ``bins + 1`` edges of the grid, float64 (exact: multiples of a power of two)."""
        half = math.ldexp(1.0, int(self.range_exponent))
        return torch.linspace(-half, half, self.bins + 1, dtype=torch.float64)

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().flatten()
        if x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
            x = x[torch.isfinite(x)]  # NaN or inf: count the rest
        if x.numel() == 0:
            return
        lo_x, hi_x = torch.aminmax(x)
        lo, hi = float(lo_x), float(hi_x)
        exponent = max(self.MIN_EXPONENT, math.frexp(max(-lo, hi))[1])  # |x| < 2**exponent
        if bool(self.histogram.any()):
            exponent = max(exponent, int(self.range_exponent))
            self.histogram = self._coarsened(exponent)
        self.range_exponent = torch.tensor(exponent, dtype=torch.int64)
        self.histogram = self.histogram + self._counts(x, exponent)
        self.min_val = torch.minimum(self.min_val, torch.tensor(lo))
        self.max_val = torch.maximum(self.max_val, torch.tensor(hi))

    # counted in parts: a part's bin indexes take 4 bytes per value
    _CHUNK = 1 << 24

    def _counts(self, x: torch.Tensor, exponent: int) -> torch.Tensor:
        """float64 counts of ``x`` (finite, ``|x| < 2**exponent``) on the grid of that half-range.

        ``x / w`` multiplies by a power of two: exact in float32 when it scales up (``w <= 1``);
        a scale-down could round a subnormal to zero, so it runs in float64, as float64 inputs do.
        ``bincount`` of int32 indexes was 2x faster than ``histc`` here (2.4M values: 5.8 vs 11 ms).
        """
        inverse_width = math.ldexp(1.0, int(math.log2(self.bins)) - 1 - exponent)
        narrow = x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        exact_dtype = torch.float32 if narrow and inverse_width >= 1 else torch.float64
        counts = torch.zeros(self.bins, dtype=torch.float64)
        for part in x.split(self._CHUNK):
            index = (part.to(exact_dtype) * inverse_width).floor_().to(torch.int32).add_(self.bins // 2)
            counts += torch.bincount(index.clamp_(0, self.bins - 1), minlength=self.bins).double()
        return counts

    def _check_same_kind(self, other: Observer) -> None:
        super()._check_same_kind(other)
        assert isinstance(other, HistogramObserver)
        if other.bins != self.bins:
            raise ValueError(f"graphquant: cannot merge a {other.bins}-bin histogram into a {self.bins}-bin one")

    def _merge_statistics(self, other: Observer) -> None:
        assert isinstance(other, HistogramObserver)  # checked by merge: the same kind
        if not bool(other.histogram.any()):
            return
        if not bool(self.histogram.any()):
            self.histogram = other.histogram.clone()
            self.range_exponent = other.range_exponent.clone()
        else:
            exponent = max(int(self.range_exponent), int(other.range_exponent))
            self.histogram = self._coarsened(exponent) + other._coarsened(exponent)
            self.range_exponent = torch.tensor(exponent, dtype=torch.int64)
        self.min_val = torch.minimum(self.min_val, other.min_val)
        self.max_val = torch.maximum(self.max_val, other.max_val)

    def search_range(self) -> tuple[float, float]:
        """The clipping range ``(a, b)`` with the least expected quantization error: candidates
        on ``search_points`` steps of the bins the data occupies, the outermost two the data's
        own minimum and maximum."""
        searched = self._least_error(self.qmax - self.qmin)
        return (float(self.min_val), float(self.max_val)) if searched is None else searched[:2]

    def expected_sqnr_db(self, seven_bit: bool) -> float | None:
        """The SQNR, in dB, of the values seen quantized on the best clipping range of the full grid or
        of the 7-bit one (what ``reduce_range`` costs a value: the difference), from the histogram;
        None where it is empty or all zero."""
        qmin, qmax = self._grid(seven_bit)
        searched = self._least_error(qmax - qmin)
        edges = self.bin_edges()
        centres = (edges[:-1] + edges[1:]) / 2
        signal = float((self.histogram * centres * centres).sum())
        if searched is None or signal <= 0:
            return None
        return 10.0 * math.log10(signal / max(searched[2], signal * 1e-12))

    def _least_error(self, levels: int) -> tuple[float, float, float] | None:
        """``(a, b, error)``: the clipping range of least expected squared error on a grid of ``levels``
        steps (module docstring), and that error; None for an empty histogram."""
        n = self.histogram
        occupied = torch.nonzero(n).flatten()
        lo, hi = float(self.min_val), float(self.max_val)
        if occupied.numel() == 0:
            return None
        first, last = int(occupied[0]), int(occupied[-1]) + 1
        edges = self.bin_edges()
        c = (edges[:-1] + edges[1:]) / 2
        zero = torch.zeros(1, dtype=torch.float64)
        cum_n, cum_s, cum_q = (torch.cat([zero, torch.cumsum(v, 0)]) for v in (n, n * c, n * c * c))
        idx = torch.unique(torch.linspace(first, last, self.search_points + 1, dtype=torch.float64).round().long())
        candidates = edges[idx].clamp(lo, hi)
        a, b = candidates[:, None], candidates[None, :]
        ia, ib = idx[:, None], idx[None, :]
        # values below a clip to a: sum n (a - c)^2 over bins left of a
        left = a * a * cum_n[ia] - 2 * a * cum_s[ia] + cum_q[ia]
        right = (cum_q[-1] - cum_q[ib]) - 2 * b * (cum_s[-1] - cum_s[ib]) + b * b * (cum_n[-1] - cum_n[ib])
        inside = (cum_n[ib] - cum_n[ia]).clamp(min=0)
        a0, b0 = a.clamp(max=0.0), b.clamp(min=0.0)
        if self.symmetric:
            width = 2 * torch.maximum(-a0, b0)
        else:
            width = b0 - a0
        step = width / levels
        err = left + right + inside * step * step / 12
        err = torch.where(ib > ia, err, torch.full_like(err, float("inf")))
        best = int(torch.argmin(err))
        i, j = divmod(best, err.shape[1])
        return float(candidates[i]), float(candidates[j]), float(err.flatten()[best])

    def qparams(self) -> QParams:
        if not self.has_data:
            return self.choose(self.min_val, self.max_val)
        a, b = self.search_range()
        return self.choose(torch.tensor(a), torch.tensor(b))


class PercentileObserver(HistogramObserver):
    """Clips each tail at a percentile of the values seen (ONNX Runtime's "Percentile" method):
    ``percentile=99.99`` keeps all but the 0.01% smallest and the 0.01% largest values; with
    ``symmetric=True`` the range is ``[-t, t]``, ``t`` that percentile of ``|x|``. Read off the
    fixed-grid histogram at bin edges (the outer edge of the bin the percentile falls in, within
    the data's own min and max), so it merges across shards exactly as :class:`HistogramObserver`.
    """

    def __init__(
        self, dtype: torch.dtype = torch.uint8, symmetric: bool = False, percentile: float = 99.99,
        bins: int = 2048, reduce_range: bool | str = False,
    ) -> None:
        super().__init__(dtype, symmetric, bins, reduce_range=reduce_range)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"graphquant: percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def search_range(self) -> tuple[float, float]:
        lo, hi = float(self.min_val), float(self.max_val)
        n = self.histogram
        total = float(n.sum())
        if total == 0:
            return lo, hi
        edges = self.bin_edges()
        keep = self.percentile / 100.0 * total
        if self.symmetric:
            half = self.bins // 2
            magnitude = n[half:] + n[:half].flip(0)  # |x| on [0, R): folding the grid is exact
            i = int(torch.searchsorted(torch.cumsum(magnitude, 0), keep))
            t = float(edges[half + min(i, half - 1) + 1])
            return max(lo, -t), min(hi, t)
        cum = torch.cumsum(n, 0)
        upper = int(torch.searchsorted(cum, keep))  # the bin where the upper tail starts
        lower = int(torch.searchsorted(cum, total - keep, right=True))  # the bin where the lower tail ends
        a, b = float(edges[min(lower, self.bins - 1)]), float(edges[min(upper, self.bins - 1) + 1])
        return max(lo, min(a, hi)), min(hi, max(b, lo))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, percentile={self.percentile}"


class EntropyObserver(HistogramObserver):
    """TensorRT's entropy calibration: the threshold ``t`` whose quantized distribution loses the
    least information, by the KL divergence between the histogram up to ``t`` (the values beyond
    it folded into its last bin) and that histogram rounded to the levels ``[0, t]`` gets. With
    ``symmetric=True`` it is the histogram of ``|x|`` and half the grid's levels (TensorRT's
    int8); otherwise the side that reaches further from zero is thresholded and the other kept
    whole, and ``[0, t]`` gets its share of the grid. ``search_points`` candidates between the
    levels' width and the data's extent. Merges across shards exactly (the fixed-grid histogram).
    """

    def search_range(self) -> tuple[float, float]:
        lo, hi = float(self.min_val), float(self.max_val)
        half = self.bins // 2
        n = self.histogram
        if self.symmetric:
            side, other = n[half:] + n[:half].flip(0), 0.0
        elif hi >= -lo:
            side, other = n[half:], max(0.0, -lo)
        else:
            side, other = n[:half].flip(0), max(0.0, hi)
        occupied = torch.nonzero(side).flatten()
        steps = self.qmax - self.qmin
        smallest = (steps + 1) // 2 if self.symmetric else 2
        if occupied.numel() == 0 or int(occupied[-1]) + 1 <= smallest:
            return lo, hi
        last = int(occupied[-1]) + 1
        width = math.ldexp(1.0, int(self.range_exponent)) / half
        best, best_kl = last, math.inf
        for i in torch.unique(torch.linspace(smallest, last, self.search_points).round().long()).tolist():
            t = i * width
            levels = (steps + 1) // 2 if self.symmetric else max(2, round(steps * t / (t + other)))
            if i < levels:
                continue  # fewer bins than levels: nothing is rounded away yet
            kl = _kl_of_threshold(side, i, levels)
            if kl < best_kl:
                best, best_kl = i, kl
        t = best * width
        if self.symmetric:
            return max(lo, -t), min(hi, t)
        return (lo, min(hi, t)) if hi >= -lo else (max(lo, -t), hi)


def _kl_of_threshold(magnitude: torch.Tensor, bins: int, levels: int) -> float:
    """KL(P || Q): P the first ``bins`` bins of ``magnitude`` with the rest added to the last, Q
    their quantization to ``levels`` levels (each level's mass spread over its non-empty bins)."""
    p = magnitude[:bins].clone()
    p[-1] += magnitude[bins:].sum()
    kept = magnitude[:bins]
    group = torch.div(torch.arange(bins) * levels, bins, rounding_mode="floor")  # each bin's level
    mass = torch.zeros(levels, dtype=kept.dtype).index_add_(0, group, kept)
    nonzero = torch.zeros(levels, dtype=kept.dtype).index_add_(0, group, (kept > 0).to(kept.dtype))
    q = torch.where(kept > 0, mass[group] / nonzero[group].clamp(min=1), torch.zeros_like(kept))
    p, q = p / p.sum(), q / q.sum().clamp(min=1e-30)
    mask = p > 0
    return float((p[mask] * torch.log(p[mask] / q[mask].clamp(min=1e-12))).sum())


class SmoothingObserver(Observer):
    """The input of linears smoothed by SmoothQuant (:class:`graphquant.qconfig.SmoothQuant`): the
    minimum and maximum of each channel of the last axis (the one a linear sums over) and, for the
    alpha search, up to ``rows`` sample rows: the rows with the smallest keys, a row's key a fixed
    random projection of its values (a uniform sample of every row seen, kept in key order).

    ``qparams()`` spans the exact range of ``x / smoothing`` once convert has set ``smoothing``
    (one factor per channel; see graphquant.passes.smooth), and of ``x`` before; ``folded`` is set
    where the op producing ``x`` now produces ``x / smoothing`` itself. A row's key depends on the
    row alone, so the sample is a function of the rows seen, not of their order or batching: merging
    shards (the channels' minima and maxima, and the smallest-key rows of both samples) gives what
    one observer that saw everything holds, bit for bit, however the data was split.
    """

    min_val: torch.Tensor
    max_val: torch.Tensor
    samples: torch.Tensor
    sample_keys: torch.Tensor
    smoothing: torch.Tensor

    def __init__(self, dtype: torch.dtype = torch.uint8, symmetric: bool = False, reduce_range: bool | str = False,
                 rows: int = 0) -> None:
        super().__init__(dtype, symmetric, reduce_range)
        self.rows = rows
        self.folded = False
        for name in ("min_val", "max_val", "samples", "smoothing"):
            self.register_buffer(name, torch.empty(0))
        self.register_buffer("sample_keys", torch.empty(0, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0 or not x.is_floating_point() or x.dim() == 0:
            return x
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        finite = torch.isfinite(rows).all(1)
        if not bool(finite.all()):
            warnings.warn(f"graphquant: calibration data has {int((~finite).sum())} rows with NaN/Inf values at "
                          f"{self.where or 'an observer'}; they are ignored. Clean the calibration data",
                          stacklevel=2)
            rows = rows[finite]
        if rows.shape[0]:
            self.observe(rows)
            self._add_channel_sums(x)
            self.num_batches += 1
        return x

    def observe(self, x: torch.Tensor) -> None:
        if self.min_val.numel() and x.shape[1] != self.min_val.numel():
            raise GraphQuantError(f"graphquant: {self.where or 'a smoothed input'} had {self.min_val.numel()} channels "
                                  f"and now has {x.shape[1]}")
        lo, hi = torch.aminmax(x, dim=0)
        if self.min_val.numel() == 0:
            self.min_val, self.max_val, self.samples = lo, hi, x[:0]
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        if self.rows:
            self._keep_sample(x, self._keys(x))

    @staticmethod
    def _keys(rows: torch.Tensor) -> torch.Tensor:
        """Each row's key: the fractional part of a fixed random projection (float64), a function of the
        row's values alone."""
        projection = torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        return torch.frac((rows.double() @ projection) * 1024.0).abs()

    def _keep_sample(self, rows: torch.Tensor, keys: torch.Tensor) -> None:
        """The ``rows`` smallest-key rows of the sample and ``rows``, in key order (ties: equal rows)."""
        samples, sample_keys = torch.cat([self.samples, rows]), torch.cat([self.sample_keys, keys])
        order = torch.sort(sample_keys, stable=True).indices[: self.rows]
        self.samples, self.sample_keys = samples[order], sample_keys[order]

    def smoothed_range(self, smoothing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The range of ``x / smoothing`` (exact: every factor is positive)."""
        return (self.min_val / smoothing).min(), (self.max_val / smoothing).max()

    def qparams(self) -> QParams:
        smoothing = self.smoothing if self.smoothing.numel() else torch.ones_like(self.min_val)
        return self.choose(*self.smoothed_range(smoothing))

    def _merge_statistics(self, other: Observer) -> None:
        assert isinstance(other, SmoothingObserver)  # checked by merge: the same kind
        if not self.min_val.numel():
            self.samples, self.sample_keys = other.samples[:0], other.sample_keys[:0]
        if self.rows:
            self._keep_sample(other.samples, other.sample_keys)
        _merge_extremes(self, other)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rows={self.rows}"


class FixedQParamsObserver(Observer):
    """qparams from an op's known output range (sigmoid: [0, 1], tanh: [-1, 1]); data
    is not needed, so it never reports "saw no data"."""

    def __init__(self, lo: float, hi: float, dtype: torch.dtype = torch.uint8) -> None:
        super().__init__(dtype, symmetric=False)
        self.lo, self.hi = lo, hi
        self.num_batches += 1

    def observe(self, x: torch.Tensor) -> None:
        pass

    def qparams(self) -> QParams:
        return choose_qparams(torch.tensor(self.lo), torch.tensor(self.hi), self.dtype, symmetric=False)

    def extra_repr(self) -> str:
        return f"range=[{self.lo}, {self.hi}]"


class SharedQParams(ChannelMeans):
    """Marks a value that reuses another observer's qparams (e.g. the output of
    ``flatten`` reuses its input's). ``source`` is the name of the observer whose qparams
    apply; it records only channel means, where bias correction asks for them."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source
        self._init_channel_means()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point() and x.numel():
            self._add_channel_sums(x)
        return x

    def merge(self, other: SharedQParams) -> None:
        """Fold in ``other``'s channel sums (sharded calibration)."""
        self._merge_channel_sums(other)

    def extra_repr(self) -> str:
        return f"source={self.source}"


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average_minmax": MovingAverageMinMaxObserver,
    "per_channel_minmax": PerChannelMinMaxObserver,
    "per_channel_float_qparams": PerChannelFloatQParamsObserver,
    "histogram": HistogramObserver,  # the range of least expected squared error: the "MSE" method
    "mse": HistogramObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
}
