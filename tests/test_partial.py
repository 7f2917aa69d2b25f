"""Partial graph mode: a model that torch.export cannot capture whole is quantized region by region."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import graphquant as gq
from graphquant.quant_math import sqnr


class Gate(nn.Module):
    """An `if` on a tensor value: export cannot capture it. The threshold lies between the means
    of the stem's output on bright images (``torch.rand``) and on dark ones (half as bright)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.threshold = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > self.threshold:
            return torch.relu(self.a(x))
        return torch.relu(self.b(x))


class ItemScale(nn.Module):
    """A `.item()` whose value feeds Python arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        peak = x.abs().amax().item()
        return self.conv(x) * (1.0 / max(peak, 1.0))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))) + x


class Net(nn.Module):
    """Exportable stem and head; a data-dependent branch, an .item() and a loop over a Python list
    whose length depends on the data between them. ``fixed=True`` is the exportable twin: the
    same weights, with the branch, the scale and the loop count the example inputs take."""

    def __init__(self, fixed: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.gate = Gate()
        self.scale = ItemScale()
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        self.fixed = fixed
        with torch.no_grad():
            bright, dark = self.stem(batches(1)[0]).mean(), self.stem(batches(1)[0] / 2).mean()
        self.gate.threshold = float(bright + dark) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.fixed:
            x = torch.relu(self.gate.a(x))
            x = self.scale.conv(x)
            blocks = list(self.blocks)
        else:
            bright = bool(x.mean() > self.gate.threshold)
            x = self.scale(self.gate(x))
            blocks = list(self.blocks)[: 3 if bright else 2]  # how many: decided by the data
        for block in blocks:
            x = block(x)
        return self.head(x)


def batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(4, 3, 12, 12, generator=g) for _ in range(n)]  # positive: gate takes a, peak < 1


def _run(model: nn.Module, data: list[torch.Tensor]) -> None:
    for b in data:
        model(b)


def _quantize(model: nn.Module, **kwargs):  # type: ignore[no-untyped-def]
    return gq.quantize(model, {"": gq.default_qconfig}, _run, [batches()], example_inputs=(batches()[0],), **kwargs)


def test_the_parts_that_export_become_int8_and_the_rest_stays_eager():
    model = Net().eval()
    with pytest.warns(UserWarning, match=r"Net does not export whole.*quantized 7 parts.*partial=False"):
        q = _quantize(model)
    assert isinstance(q, Net) and q is not model  # a copy of the user's model, behaving like it
    report = gq.report(q)
    regions = {r.path: r for r in report.regions}
    assert set(regions) == {"stem", "gate.a", "scale.conv", "blocks.0", "blocks.1", "blocks.2", "head"}, regions
    eager = {p.path: p.reason for p in report.eager}
    assert set(eager) == {"", "gate", "gate.b", "scale"}, eager  # a ModuleList is not called: its blocks are
    assert re.search(r"\(at test_partial.py:\d+: if x.mean\(\) > self.threshold:\)$", eager["gate"]), eager
    assert re.search(r"\(at test_partial.py:\d+: return self.conv\(x\) \* \(1.0 / max\(peak, 1.0\)\)\)$",
                     eager["scale"]), eager
    assert eager[""].startswith("Could not guard on data-dependent expression"), eager
    assert eager["gate.b"] == "not called on the example inputs"
    # inside regions no conv or linear is float
    float_compute = [n for n in report.float_nodes if n.op in ("aten.conv2d.default", "aten.linear.default")]
    assert not float_compute, float_compute
    assert len([n for n in report.quantized if "conv" in n.op or "linear" in n.op]) == 7
    assert all(r.sqnr_db is not None and r.sqnr_db > 25 for r in report.regions), report.regions
    text = str(report)
    assert "partial graph mode: 7 regions quantized, 4 parts eager" in text and "eager  gate: " in text


def test_partial_output_is_as_faithful_as_whole_graph_quantization_of_the_exportable_twin():
    model, twin = Net().eval(), Net(fixed=True).eval()
    x = batches(2, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q, whole = _quantize(model), _quantize(twin)
    assert not gq.report(whole).regions  # the twin exports: quantized whole, as before
    with torch.no_grad():
        for b in x:
            torch.testing.assert_close(model(b), twin(b))  # the twin is the same function on this data
            partial_db, whole_db = sqnr(model(b), q(b)), sqnr(twin(b), whole(b))
            assert partial_db >= whole_db - 3.0, (partial_db, whole_db)  # a requantization per border
            assert partial_db >= 25.0, partial_db


def test_control_flow_between_regions_keeps_working():
    """A dark batch takes the other branch (the float conv the example never reached) and another
    number of blocks; the regions before and after run on it as on any batch."""
    mixed = batches() + [b / 2 for b in batches(seed=2)]  # calibrated on both kinds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = gq.quantize(Net().eval(), {"": gq.default_qconfig}, _run, [mixed], example_inputs=(batches()[0],))
    model, dark = Net().eval(), batches(1, seed=7)[0] / 2
    with torch.no_grad():
        assert model.stem(dark).mean() < model.gate.threshold
        assert sqnr(model(dark), q(dark)) > 25


def test_partial_false_refuses_and_a_model_that_exports_is_unchanged():
    with pytest.raises(gq.GraphQuantError, match=r"torch.export could not capture Net"):
        _quantize(Net().eval(), partial=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        whole = _quantize(Net(fixed=True).eval())
    assert not [w for w in caught if "graphquant" in str(w.message)]  # no partial-mode warning
    assert isinstance(whole, torch.fx.GraphModule)
    with pytest.raises(gq.GraphQuantError, match=r"partial must be True, False or 'auto'"):
        _quantize(Net().eval(), partial="yes")


def test_partial_true_quantizes_an_exportable_model_by_regions():
    q = _quantize(Net(fixed=True).eval(), partial=True)
    regions = {r.path for r in gq.report(q).regions}
    assert {"stem", "head", "blocks.0"} <= regions, regions


def test_qconfig_dict_applies_under_each_region():
    qconfig_dict = {"": gq.default_qconfig, "blocks.1": None, "head.2": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = gq.quantize(Net().eval(), qconfig_dict, _run, [batches()], example_inputs=(batches()[0],))
    report = gq.report(q)
    assert "blocks.1" not in {r.path for r in report.regions}
    linears = [n for n in report.nodes if n.op == "aten.linear.default"]
    assert linears and all(not n.quantized for n in linears), linears


def test_dynamic_partial():
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.inp = nn.Linear(16, 32)
            self.out = nn.Linear(32, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            if h.sum() > 0:
                h = torch.relu(h)
            return self.out(h)

    model = Encoder().eval()
    x = torch.randn(4, 16)
    with pytest.warns(UserWarning, match="does not export whole"):
        q = gq.quantize_dynamic(model, {"": gq.default_dynamic_qconfig}, example_inputs=(x,))
    assert {r.path for r in gq.report(q).regions} == {"inp", "out"}
    with torch.no_grad():
        assert sqnr(model(x), q(x)) > 30


def test_save_and_load_round_trip_bit_identical_in_a_fresh_process(tmp_path):  # type: ignore[no-untyped-def]
    """One archive: a .pt2 program per region, the float rest, the report. A process that never
    saw the quantized model loads it from the class alone (Net(), found by its module path)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = _quantize(Net().eval())
    path = tmp_path / "net_partial.pt2"
    gq.save(q, path)
    assert (tmp_path / "net_partial.manifest.json").exists()
    x = torch.cat([batches(1, seed=9)[0], batches(1, seed=9)[0] / 2])  # bright and dark: both branches
    with torch.no_grad():
        want = q(x)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch, graphquant as gq\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        f"q = gq.load({str(path)!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(q(x), {str(tmp_path / 'got.pt')!r})\n"
        "r = gq.report(q)\n"
        "print(type(q).__name__, len(r.regions), len(r.eager))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=str(Path(__file__).parent.parent))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "Net 7 4"
    assert torch.equal(torch.load(tmp_path / "got.pt"), want)
    # in this process, with the float model passed in
    loaded = gq.load(path, float_model=Net().eval())
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    with pytest.raises(gq.GraphQuantError, match=r"saved from a test_partial:Net, float_model is a .*Block"):
        gq.load(path, float_model=Block())


def test_to_torchscript_refuses_a_partial_model_it_cannot_compile_and_says_what_to_do():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = _quantize(Net().eval())
    with pytest.raises(gq.GraphQuantError, match=r"Net was quantized region by region.*TorchScript cannot compile "
                                                 r"its eager parts.*graphquant.save"):
        gq.to_torchscript(q)
    x = batches(1, seed=3)[0]
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()  # the regions are back in place


class Gated(nn.Module):
    """Exportable parts around an `if` TorchScript compiles."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.gate = Gate()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        with torch.no_grad():
            bright, dark = self.stem(batches(1)[0]).mean(), self.stem(batches(1)[0] / 2).mean()
        self.gate.threshold = float(bright + dark) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(self.stem(x)))


def test_to_torchscript_scripts_a_partial_model_whose_eager_parts_compile(tmp_path):  # type: ignore[no-untyped-def]
    mixed = batches() + [b / 2 for b in batches(seed=2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = gq.quantize(Gated().eval(), {"": gq.default_qconfig}, _run, [mixed], example_inputs=(batches()[0],))
    assert {r.path for r in gq.report(q).regions} == {"stem", "gate.a", "head"}
    scripted = gq.to_torchscript(q)
    torch.jit.save(scripted, tmp_path / "gated.ts")
    loaded = torch.jit.load(tmp_path / "gated.ts")
    bright, dark = batches(1, seed=8)[0], batches(1, seed=8)[0] / 2  # both branches
    with torch.no_grad():
        for x in (bright, dark):
            assert torch.equal(loaded(x), q(x)) and torch.equal(scripted(x), q(x))


def test_check_graph_mode_op_on_a_model_that_does_not_export_whole():
    from graphquant.testing import check_graph_mode_op

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = check_graph_mode_op(Net().eval(), [(b,) for b in batches()], "qconv2d", tracing=True)
    assert result.max_step_diff <= 1.0 and result.sqnr > 25, result
    with warnings.catch_warnings(), pytest.raises(AssertionError, match="expected graphquant::qlinear_dynamic"):
        warnings.simplefilter("ignore")
        check_graph_mode_op(Net().eval(), [(b,) for b in batches()], "graphquant::qlinear_dynamic", tracing=True)


def test_accuracy_control_and_compare_on_a_model_that_does_not_export_whole():
    """Accuracy control returns whole regions to float, lowest region SQNR first; the layer-by-layer
    comparison, which needs one graph, says so and names the way out."""
    model = Net().eval()

    def neg_mse(m: nn.Module) -> float:
        with torch.no_grad():
            return -float(sum((m(x) - model(x)).pow(2).mean() for x in batches(2, seed=6)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q, report = gq.quantize_with_accuracy_control(model, {"": gq.default_qconfig}, _run, [batches()], neg_mse,
                                                      max_drop=0.0, example_inputs=(batches()[0],))
        first = _quantize(Net().eval())
    lowest_first = [r.path for r in sorted(gq.report(first).regions, key=lambda r: r.sqnr_db)]
    assert report.ranking == tuple(lowest_first) and len(lowest_first) == 7, report
    assert report.met and report.keep_float == report.ranking  # max_drop 0: every region float
    assert not gq.report(q).regions  # nothing left to quantize: the float model, as eager code
    with pytest.raises(gq.GraphQuantError, match=r"compare lines up one graph of the whole model, and Net does not "
                                                 r"export whole .*compare one of its submodules"):
        gq.numerics.compare(model, None, batches())
