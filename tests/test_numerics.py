"""Layer-by-layer numerics: the ruined layer is found, the suggestion keeps it float, the
HTML report parses, and a broken kernel is pinned to its own node."""

from __future__ import annotations

import base64
import math
from html.parser import HTMLParser

import pytest
import torch
from conftest import calibration_batches, make_net
from torch import fx, nn

import graphquant as gq
from graphquant.graph import MATCH
from graphquant.quant_math import sqnr
from graphquant.tools import numerics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ThreeConvs(nn.Module):
    """conv -> relu, three times, then a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return self.fc(torch.flatten(x, 1))


def ruined_model() -> ThreeConvs:
    """conv2's output channel 0 is 1000x larger and conv3 reads it 1000x smaller: the float
    function is unchanged (relu is positively homogeneous), but conv2's per-tensor output
    range is now set by channel 0 and its other seven channels round to zero."""
    torch.manual_seed(0)
    model = ThreeConvs().eval()
    with torch.no_grad():
        model.conv2.weight[0] *= 1000
        model.conv2.bias[0] *= 1000
        model.conv3.weight[:, 0] /= 1000
    return model


def _data(seed: int, n: int, batch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n)]


HELD_OUT = _data(2, 2, 8)


def output_sqnr(model: nn.Module) -> float:
    """eval_fn: SQNR of the model's output against the float model's, on held-out data (dB)."""
    reference = ruined_model()
    with torch.no_grad():
        return sqnr(torch.cat([reference(x) for x in HELD_OUT]), torch.cat([model(x) for x in HELD_OUT]))


@pytest.fixture(scope="module")
def ruined_report() -> numerics.NumericsReport:
    return numerics.compare(
        ruined_model(), {"": gq.get_default_qconfig("x86")}, _data(1, 3, 4), HELD_OUT, eval_fn=output_sqnr
    )


def test_ruined_layer_ranks_first(ruined_report: numerics.NumericsReport) -> None:
    worst = ruined_report.nodes[0]
    assert worst.module_path == "conv2" and worst.pattern == "conv2d_relu"
    assert worst.layer_sqnr is not None and worst.layer_sqnr < 3.0  # seven of eight channels crushed
    assert worst.channel_range_ratio > 100
    healthy = [n for n in ruined_report.nodes if n.module_path in ("conv1", "fc")]
    assert all(n.layer_sqnr is not None and n.layer_sqnr > 30.0 for n in healthy)
    # whole-tensor SQNR of conv2's own output hides the damage behind channel 0's power
    assert worst.reference_sqnr > 15.0
    assert all(n.max_step_diff <= numerics.STEP_TOLERANCE for n in ruined_report.nodes)
    assert [n.module_path for n in ruined_report.nodes][-1] == ""  # the flatten shares qparams: last


def test_suggestion_names_the_ruined_layer_first_and_gives_accuracy_back(
    ruined_report: numerics.NumericsReport,
) -> None:
    suggested = ruined_report.suggested_qconfig_dict
    assert next(iter(suggested)) == "conv2"
    assert suggested["conv2"] is None
    assert suggested["conv3"] is None  # it reads conv2's crushed output
    assert "conv1" not in suggested and suggested[""] is not None
    accuracy = ruined_report.accuracy
    assert accuracy is not None and accuracy.suggested is not None
    assert accuracy.float_model == math.inf
    assert accuracy.suggested > accuracy.quantized + 10.0
    text = str(ruined_report)
    assert "'conv2': None" in text and "accuracy:" in text


class _TableAndImages(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.images: list[str] = []
        self._cell: list[str] | None = None
        self._in_table = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table" and ("id", "numerics") in attrs:
            self._in_table = True
        elif tag == "tr" and self._in_table:
            self.rows.append([])
        elif tag in ("td", "th") and self._in_table:
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs).get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._in_table = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_html_report_has_the_table_and_the_plot(ruined_report: numerics.NumericsReport, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    path = tmp_path / "numerics.html"
    ruined_report.to_html(str(path))
    parser = _TableAndImages()
    parser.feed(path.read_text(encoding="utf-8"))
    header, *rows = parser.rows
    assert header == list(numerics._COLUMNS)
    assert len(rows) == len(ruined_report.nodes)
    assert rows == ruined_report.table()[1:]
    assert rows[0][1:3] == [ruined_report.nodes[0].node, "conv2"]
    (src,) = parser.images
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    png = base64.b64decode(src[len(prefix):], validate=True)
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1000, 400)  # sized for a screen, however many layers


def test_html_report_leads_with_the_verdict(ruined_report: numerics.NumericsReport) -> None:
    """What a user opens the page for comes first: the verdict (the model's SQNR), what was kept float and
    why, the suggestion, the plot; the table of every layer last. (Checked rendered in headless Chromium.)"""
    text = ruined_report.to_html()
    order = [text.index(f'id="{part}"') for part in ("verdict", "kept-float", "suggestion", "plot", "numerics")]
    assert order == sorted(order)
    verdict = text[order[0]:text.index("</p>", order[0])]
    assert f"{ruined_report.output_kernel_sqnr:.1f} dB SQNR against float" in verdict
    assert "Worst layer: conv2" in verdict
    assert "&#x27;conv2&#x27;: None" in text[order[2]:order[3]]  # the suggestion (escaped), before the plot


def test_kept_float_groups_the_float_ops_by_reason() -> None:
    """A transformer block under the default: residual adds kept float by the chains rule, grouped, with why."""
    from graphquant.report import NodeReport

    why = "kept float (qconfig ops='chains'): its input is the float32 output of linear layer.{}.out"
    nodes = [NodeReport(f"add_{i}", "aten.add.Tensor", f"layer.{i}", False, reason=why.format(i)) for i in range(5)]
    nodes += [NodeReport("arange", "aten.arange.default", "", False,
                         reason="no quantized pattern for aten.arange.default")]
    kept = numerics.KeptFloat.group(nodes)
    assert [(k.op, k.count) for k in kept] == [("aten.add.Tensor", 5), ("other ops", 1)]
    assert str(kept[0]).startswith("5 x aten.add.Tensor (layer.0, layer.1, layer.2 and 2 more): kept float")
    assert "arange" in str(kept[1])


def test_a_broken_kernel_is_pinned_to_its_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that writes 3 steps too high is reported at its node, and only there: each
    kernel is fed the reference's integers, so the error does not spread downstream."""
    line_up = numerics._line_up
    broken: list[str] = []

    def line_up_with_broken_conv(*args, **kwargs):  # type: ignore[no-untyped-def]
        graphs = line_up(*args, **kwargs)
        node = next(n for n in graphs.kernel.graph.nodes if MATCH in n.meta and "qconv2d" in str(n.target))
        good = node.target

        def off_by_three(*a, **k):  # type: ignore[no-untyped-def]
            return (good(*a, **k).to(torch.int32) + 3).clamp(0, 255).to(torch.uint8)

        node.target = off_by_three
        broken.append(node.meta[MATCH].output.name)
        return graphs

    monkeypatch.setattr(numerics, "_line_up", line_up_with_broken_conv)
    report = numerics.compare(make_net(), None, calibration_batches(n=2), calibration_batches(n=1, seed=5))
    suspects = [n.node for n in report.lowering_suspects]
    assert suspects == broken
    (bad,) = report.lowering_suspects
    assert 2.5 < bad.max_step_diff <= 3.0 + 1e-4
    assert "LOWERING" in str(report)


class _TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.b = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x)))


def test_dynamic_compare_needs_no_calibration() -> None:
    torch.manual_seed(0)
    inputs = [torch.randn(2, 5, 16) for _ in range(2)]
    report = numerics.compare(_TwoLinears().eval(), None, None, inputs, dynamic=True)
    assert report.mode == "dynamic"
    assert sorted(n.module_path for n in report.nodes) == ["a", "b"]
    for n in report.nodes:
        assert n.kind == "dynamic" and n.scale is None
        assert n.layer_sqnr is not None and n.layer_sqnr > 30.0
        assert n.max_step_diff <= numerics.STEP_TOLERANCE
    assert not report.suggestion.keep_float


def test_names_line_up_across_capture_prepare_and_convert() -> None:
    """The premise of the report: a match's output node has one name in all three graphs."""
    net = make_net()
    batches = calibration_batches(n=1)
    prepared = gq.prepare(net, {"": gq.default_qconfig}, batches[0])
    gq.calibrate(prepared, batches)
    reference, kernel = gq.convert(prepared, debug=True), gq.convert(prepared)
    float_gm = numerics.fold_bn(numerics.capture(net, batches[0]))
    graphs = numerics._line_up(float_gm, reference, kernel)
    float_names = {n.name: n.target for n in float_gm.graph.nodes}
    assert graphs.matches
    for m in graphs.matches:
        assert float_names[m.output.name] == m.output.target
        assert isinstance(graphs.kernel_at[m.output.name], fx.Node)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(gq.GraphQuantError, match="calibration data"):
        numerics.compare(make_net(), None, None, calibration_batches(n=1))
    with pytest.raises(gq.GraphQuantError, match="iterable of batches"):
        numerics.compare(make_net(), None, torch.randn(2, 3, 16, 16), None)


def test_seven_bit_kernels_line_up_with_their_reference() -> None:
    """On a 7-bit grid the kernel graph clamps each kernel's output at 127 (passes/lower): numerics reads
    the clamped value, as the graph carries it, so no kernel is taken for a lowering bug (before: 44-57
    steps reported on a conv whose raw uint8 output ran past 127)."""
    qconfig = gq.get_default_qconfig("x86", reduce_range=True)
    report = numerics.compare(make_net(), {"": qconfig}, calibration_batches(n=2), calibration_batches(n=1, seed=5))
    assert not report.lowering_suspects, [(n.node, n.max_step_diff) for n in report.lowering_suspects]
    assert all(n.max_step_diff <= 1.0 for n in report.nodes)
