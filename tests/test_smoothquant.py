"""SmoothQuant: per-channel factors move activation outliers into the weights, for one multiply at run time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphquant as gq
from graphquant.observers import SmoothingObserver
from graphquant.passes.smooth import smoothing_factors
from graphquant.quant_math import sqnr


class Block(nn.Module):
    """A LayerNorm with three outlier channels (as trained transformers have: large, and read with
    small weights) read by three linears and a float residual, then a GELU feed-forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(32)
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)
        with torch.no_grad():
            self.norm.weight[:3] = 40.0
            for linear in (self.q, self.k, self.v, self.up):
                linear.weight[:, :3] /= 40.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        h = h + self.q(h) * self.k(h) / 8 + self.v(h)
        return self.down(F.gelu(self.up(h)))


class PreNormBlock(nn.Module):
    """Pre-LN attention input (GPT-2, ViT, LLaMA): the residual reads the block's input, so only the
    three linears read the LayerNorm, whose outlier channels can take the factors."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(32)
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        with torch.no_grad():
            self.norm.weight[:3] = 40.0
            self.norm.bias.uniform_(-1.0, 1.0)
            for linear in (self.q, self.k, self.v):
                linear.weight[:, :3] /= 40.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.q(h) * self.k(h) / 8 + self.v(h)


def _data() -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 10, 32, generator=g),) for _ in range(4)]


def _quantize(model: nn.Module, smoothquant: gq.SmoothQuant | None, **kwargs):  # type: ignore[no-untyped-def]
    qconfig_dict = gq.qconfig_dict_by_type(model, {nn.Linear: gq.QConfig(smoothquant=smoothquant)})
    data = _data()
    return gq.quantize(model, qconfig_dict, lambda m, bs: [m(*b) for b in bs], [data], example_inputs=data[0],
                       **kwargs)


def _ops(model: nn.Module) -> list[str]:
    return [str(n.target) for n in model.graph.nodes if n.op == "call_function"]  # type: ignore[union-attr]


def test_smoothing_raises_fidelity_and_adds_one_multiply():
    model = Block().eval()
    x = torch.randn(8, 10, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(x)
        plain, smoothed = _quantize(model, None), _quantize(model, gq.SmoothQuant(0.5))
        gain = sqnr(want, smoothed(x)) - sqnr(want, plain(x))
    assert gain >= 10.0, gain
    # one multiply before each smoothed input's quantize (norm, residual sum), nothing else
    assert len(_ops(smoothed)) == len(_ops(plain)) + 2
    assert _ops(smoothed).count("aten.mul.Tensor") == _ops(plain).count("aten.mul.Tensor") + 2
    lines = gq.report(smoothed).smoothing
    assert [(s.linears, s.alpha) for s in lines] == [(("q", "k", "v"), 0.5), (("up",), 0.5), (("down",), None)]
    assert "SmoothQuant: 2 of 3 inputs smoothed" in str(gq.report(smoothed))
    assert "q, k, v: alpha 0.5" in str(gq.report(smoothed))
    # post-LN: the residual reads the LayerNorm too, so its output is multiplied, not the LayerNorm folded
    assert lines[0].folded == "" and "one multiply before the quantize" in str(lines[0])
    assert "it is the aten.gelu.default after up, which the int8 linear applies" in lines[2].reason
    # the float model is untouched
    with torch.no_grad():
        assert torch.equal(model(x), want)


@pytest.mark.parametrize("backend", ["onednn", "portable"])
def test_a_layer_norm_read_only_by_the_group_takes_the_factors(backend):  # type: ignore[no-untyped-def]
    """Pre-LN: 1/s folds into the LayerNorm's weight and bias; the graph is the unsmoothed one."""
    model = PreNormBlock().eval()
    x = torch.randn(8, 10, 32, generator=torch.Generator().manual_seed(2))
    plain = _quantize(model, None, backend=backend)
    smoothed = _quantize(model, gq.SmoothQuant(0.5), backend=backend)
    reference = _quantize(model, gq.SmoothQuant(0.5), backend=backend, debug=True)
    with torch.no_grad():
        want, got = model(x), smoothed(x)
        gain = sqnr(want, got) - sqnr(want, plain(x))
        ref = reference(x)
    assert gain >= 10.0, gain
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert _ops(smoothed) == _ops(plain)  # nothing added at run time
    # the LayerNorm's new constants are the float ones over the formula's factors
    with torch.no_grad():
        h = torch.cat([model.norm(*b) for b in _data()]).reshape(-1, 32)
    s = smoothing_factors(h.abs().amax(0), torch.cat([model.q.weight, model.k.weight, model.v.weight]).abs().amax(0),
                          0.5)
    assert torch.allclose(smoothed.norm_weight_smoothed, model.norm.weight / s, rtol=1e-6)
    assert torch.allclose(smoothed.norm_bias_smoothed, model.norm.bias / s, rtol=1e-6)
    (line,) = gq.report(smoothed).smoothing
    assert (line.linears, line.alpha, line.folded) == (("q", "k", "v"), 0.5, "layer_norm")
    assert "q, k, v: alpha 0.5, factors" in str(line) and "folded into layer_norm" in str(line)
    with torch.no_grad():  # the float model is untouched
        assert torch.equal(model(x), want)


def test_fused_activations_are_smoothed_on_request():
    """The GELU's output smoothed too: the GELU leaves the up linear's kernel."""
    model = Block().eval()
    q = _quantize(model, gq.SmoothQuant(0.5, fused_activations=True))
    assert [s.alpha for s in gq.report(q).smoothing] == [0.5, 0.5, 0.5]
    assert "aten.gelu.default" in _ops(q)
    assert "aten.gelu.default" not in _ops(_quantize(model, gq.SmoothQuant(0.5)))


@pytest.mark.parametrize("backend", ["onednn", "portable"])
def test_kernels_match_the_reference(backend):  # type: ignore[no-untyped-def]
    """The linears write float at the border: kernel and reference agree to float rounding."""
    model = Block().eval()
    x = torch.randn(8, 10, 32, generator=torch.Generator().manual_seed(3))
    kernel = _quantize(model, gq.SmoothQuant(0.5), backend=backend)
    reference = _quantize(model, gq.SmoothQuant(0.5), backend=backend, debug=True)
    with torch.no_grad():
        got, want = kernel(x), reference(x)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    assert "graphquant.qlinear" in str(kernel.graph)


def test_factors_follow_the_formula_and_the_range_is_exact():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(100, 16, generator=g) * torch.linspace(0.1, 30, 16)
    w = torch.randn(8, 16, generator=g)
    observer = SmoothingObserver()
    observer(x)
    amax, wmax = x.abs().amax(0), w.abs().amax(0)
    s = smoothing_factors(amax, wmax, 0.5)
    assert torch.allclose(s, (amax / wmax).sqrt(), rtol=1e-6)
    lo, hi = observer.smoothed_range(s)
    assert float(lo) == float((x / s).min()) and float(hi) == float((x / s).max())
    zero = smoothing_factors(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]), 0.5)
    assert zero.tolist() == [1.0, 1.0]  # a silent channel or an all-zero weight column is left alone


def test_observer_shards_merge_to_one_pass():
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(3, 20, 8, generator=g) * (i + 1) for i in range(6)]
    whole = SmoothingObserver(rows=40)
    for b in batches:
        whole(b)
    shards = [SmoothingObserver(rows=40) for _ in range(3)]
    for i, b in enumerate(batches):
        shards[i // 2](b)
    shards[0].merge(shards[1])
    shards[0].merge(shards[2])
    for name in ("min_val", "max_val", "samples"):
        assert torch.equal(getattr(shards[0], name), getattr(whole, name)), name
    assert whole.samples.shape == (40, 8)
    assert shards[0].qparams().scalar() == whole.qparams().scalar()


def test_auto_alpha_is_searched_per_group():
    model = Block().eval()
    x = torch.randn(8, 10, 32, generator=torch.Generator().manual_seed(2))
    auto = _quantize(model, gq.SmoothQuant("auto"))
    lines = gq.report(auto).smoothing
    assert all(s.alpha is None or s.alpha in gq.SmoothQuant().alphas for s in lines)
    assert lines[0].alpha is not None  # the outlier channels: smoothing wins
    with torch.no_grad():
        want = model(x)
        assert sqnr(want, auto(x)) >= sqnr(want, _quantize(model, None)(x)) + 10.0


class Shared(nn.Module):
    """One linear called on two inputs: its weight cannot take two sets of factors."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.other = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.fc(y) + self.other(y)


def test_a_weight_read_twice_is_not_smoothed_and_the_report_says_why():
    model = Shared().eval()
    data = [(torch.randn(2, 8), torch.randn(2, 8)) for _ in range(2)]
    qconfig_dict = gq.qconfig_dict_by_type(model, {nn.Linear: gq.QConfig(smoothquant=gq.SmoothQuant())})
    q = gq.quantize(model, qconfig_dict, lambda m, bs: [m(*b) for b in bs], [data], example_inputs=data[0])
    lines = {s.linears: s for s in gq.report(q).smoothing}
    assert lines[("fc",)].alpha is None and "its weight is also read by" in lines[("fc",)].reason
    assert lines[("fc", "other")].alpha is None  # y's group holds fc too
    with torch.no_grad():
        assert sqnr(model(*data[0]), q(*data[0])) >= 30.0


def test_an_input_already_quantized_is_reported():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    data = [(torch.randn(4, 8),) for _ in range(2)]
    q = gq.quantize(model, {"": gq.QConfig(smoothquant=gq.SmoothQuant())}, lambda m, bs: [m(*b) for b in bs], [data],
                    example_inputs=data[0])
    lines = {s.linears: s for s in gq.report(q).smoothing}
    assert lines[("0",)].alpha == 0.5 and lines[("2",)].alpha is None
    assert "the output of a quantized op" in lines[("2",)].reason


def test_qconfig_checks_and_round_trip():
    with pytest.raises(gq.GraphQuantError, match=r"alpha is a number in \[0, 1\] or 'auto', got 1.5"):
        gq.SmoothQuant(1.5)
    with pytest.raises(gq.GraphQuantError, match="SmoothQuant is for static linears"):
        gq.QConfig(gq.ObserverSpec("dynamic"), gq.ObserverSpec("minmax", torch.int8, symmetric=True),
                   gq.SmoothQuant())
    qconfig = gq.QConfig(smoothquant=gq.SmoothQuant("auto", (0.4, 0.6), rows=64, fused_activations=True))
    assert gq.QConfig.from_dict(qconfig.to_dict()) == qconfig
    assert "smoothquant" not in gq.QConfig().to_dict()
    assert gq.default_qconfig.smoothquant == gq.SmoothQuant("auto")  # the default smooths where it measures better
    assert gq.QConfig.from_dict(gq.default_qconfig.to_dict()) == gq.default_qconfig


@pytest.mark.parametrize("block, alphas", [(Block, [0.5, 0.5, None]), (PreNormBlock, [0.5])])
def test_saved_and_scripted_models_keep_the_smoothing(tmp_path, block, alphas):  # type: ignore[no-untyped-def]
    model = block().eval()
    x = torch.randn(2, 10, 32)
    q = _quantize(model, gq.SmoothQuant(0.5))
    gq.save(q, tmp_path / "block.pt2")
    loaded = gq.load(tmp_path / "block.pt2")
    scripted = gq.to_torchscript(q)
    with torch.no_grad():
        want = q(x)
        assert torch.equal(loaded(x), want)
        assert torch.allclose(scripted(x), want, rtol=0, atol=1e-5 * float(want.abs().max()))
    assert [s.alpha for s in gq.report(loaded).smoothing] == alphas
