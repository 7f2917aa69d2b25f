"""graphquant.time_kernels and ``graphquant explain --time``: each int8 GEMM / conv kernel against
the float32 op it replaced. Times are not asserted (they are measured in benchmarks/); what is
checked is that every kernel is found, that the float32 op timed beside it is the op it replaced
(same result within quantization error), and what the report and the CLI make of the verdict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_models import calibration, make_model
from torch import nn

import graphquant as gq
from graphquant import cli
from graphquant.kernels import onednn
from graphquant.quant_math import sqnr
from graphquant.tools import kernel_timing


class _Every(nn.Module):
    """conv+relu, depthwise conv, conv with a residual add, conv1d, transposed conv, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.residual = nn.Conv2d(8, 8, 1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.conv1d = nn.Conv1d(4, 6, 3)
        self.fc = nn.Linear(6 * 254, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        y = self.depthwise(y)
        y = self.residual(y) + y
        z = self.up(y)  # (N, 4, 16, 16)
        z = self.conv1d(z.flatten(2))  # (N, 6, 254)
        return self.fc(z.flatten(1))


def _quantized(backend: str | None = None) -> tuple[Any, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = _Every().eval()
    data = [(torch.randn(2, 4, 8, 8),) for _ in range(3)]
    qmodel = gq.quantize(model, {"": gq.get_default_qconfig("x86")}, lambda m, d: [m(*b) for b in d], [data],
                         example_inputs=data[0], backend=backend)
    return qmodel, data[0]


def _real(call: kernel_timing.KernelCall, out: torch.Tensor) -> torch.Tensor:
    if out.is_floating_point():
        return out
    return (out.float() - call.args["out_zero_point"]) * call.args["out_scale"]


@pytest.mark.parametrize("backend", ["onednn", "portable"])
def test_every_kernel_is_found_and_timed_against_the_op_it_replaced(backend: str) -> None:
    if backend == "onednn" and not onednn.available():
        pytest.skip("this PyTorch has no oneDNN int8 ops")
    qmodel, inputs = _quantized(backend)
    calls = kernel_timing.kernel_calls(qmodel, inputs)
    kernels = sorted(c.kernel for c in calls)
    assert kernels == ["qconv1d", "qconv2d", "qconv2d", "qconv2d_add", "qconv_transpose2d", "qlinear"]
    assert {c.module_path for c in calls} == {"conv", "depthwise", "residual", "up", "conv1d", "fc"}
    for call in calls:
        got = _real(call, call.run())
        want = kernel_timing.float_op(call.kernel, call.args)()
        assert got.shape == want.shape, call.kernel
        # the same op: the int8 kernel differs from float32 on the same real inputs by weight and
        # output rounding only (a wrong op, weight layout or scale axis would be near 0 dB)
        assert sqnr(want, got) > 35.0, (call.kernel, sqnr(want, got))  # measured 41-49 dB, 110+ unrounded
    timings = gq.time_kernels(qmodel, inputs, rounds=2)
    assert [(t.node, t.module_path, t.kernel) for t in timings] == [(c.node, c.module_path, c.kernel) for c in calls]
    assert all(t.int8_ms > 0 and t.float_ms > 0 for t in timings)
    report_nodes = {n.node for n in qmodel.graphquant_report.quantized}
    assert {t.node for t in timings} <= report_nodes  # the report's node names, so the two line up
    paths = {t.module_path: t.cpu_path for t in timings}
    if backend == "portable":
        assert set(paths.values()) == {""}
    else:
        # no oneDNN transposed conv; the conv: one call (VNNI, or 7 bits where the default chose them) or float32
        assert paths["up"] == "" and paths["conv"] in ("vnni", "7-bit", "avx2-fp32")


def test_the_report_and_explain_name_the_layers_slower_than_float(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 tmp_path: Path) -> None:
    """A kernel slower than its float32 op is marked in the report, and ``explain --time`` gives the
    --skip options and a --qconfig file that keeps those layers float."""
    qmodel, inputs = _quantized()

    def fake_median_ms(fns: list[Any], rounds: int) -> list[float]:  # int8 slower for every conv, not the linear
        return [1.0, 2.0] if fake_median_ms.linear else [3.0, 2.0]  # type: ignore[attr-defined]

    calls = iter(c.kernel for c in kernel_timing.kernel_calls(qmodel, inputs))

    def median(fns: list[Any], rounds: int) -> list[float]:
        fake_median_ms.linear = next(calls) == "qlinear"  # type: ignore[attr-defined]
        return fake_median_ms(fns, rounds)

    monkeypatch.setattr(kernel_timing, "_median_ms", median)
    timings = gq.time_kernels(qmodel, inputs)
    assert [t.slower_than_float for t in timings] == [t.kernel != "qlinear" for t in timings]
    assert [t.speedup for t in timings if t.kernel == "qlinear"] == [2.0]
    text = str(qmodel.graphquant_report)
    assert "5 of 6 slower than float32" in text
    assert sum("slower than float32 here: keep it float" in line for line in text.splitlines()) == 5
    assert json.loads(qmodel.graphquant_report.to_json())["timings"][0]["int8_ms"] == 3.0

    # explain --time on the CLI's model: conv1, conv2 and fc
    monkeypatch.setattr(kernel_timing, "_median_ms", lambda fns, rounds: [3.0, 2.0])
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    keep = tmp_path / "keep.json"
    assert cli.main(["explain", "cli_models:make_model", "--data", "cli_models:calibration", "--time", "--rounds", "3",
                     "--suggest-out", str(keep), "-q"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "3 of 3 slower than float32" in out
    assert "--skip conv1 --skip conv2 --skip fc" in out
    suggested = json.loads(keep.read_text())
    assert suggested["conv1"] is None and suggested["conv2"] is None and suggested["fc"] is None
    assert cli.main(["quantize", "cli_models:make_model", "--data", "cli_models:calibration", "--qconfig", str(keep),
                     "-q"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert not any(line.split()[:1] == ["int8"] and line.split()[1] in ("conv1", "conv2", "fc")
                   for line in out.splitlines())


def test_bad_arguments_are_refused_by_name() -> None:
    with pytest.raises(gq.GraphQuantError, match=r"time_kernels: wants the quantized GraphModule, got SmallNet"):
        gq.time_kernels(make_model(), calibration()[0])
    qmodel, inputs = _quantized()
    with pytest.raises(gq.GraphQuantError, match="rounds must be at least 1, got 0"):
        gq.time_kernels(qmodel, inputs, rounds=0)
