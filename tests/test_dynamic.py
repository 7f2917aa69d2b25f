"""Dynamic quantization: int8 weights at convert time, activation qparams per batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphquant as gq
from graphquant.kernels import onednn
from graphquant.quant_math import sqnr
from graphquant.testing import float_output_step


class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 16)
        self.lstm = nn.LSTM(16, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc2(torch.relu(self.fc1(x)))
        return h, self.fc2(torch.relu(self.fc1(-x)))  # fc1 and fc2 are each called twice


def _model() -> TwoLinears:
    torch.manual_seed(0)
    return TwoLinears().eval()


def _kernels(model: nn.Module) -> list[str]:
    return [str(n.target) for n in model.graph.nodes if "qlinear_dynamic" in str(n.target)]  # type: ignore[union-attr]


@pytest.mark.parametrize("qconfig", [
    gq.default_dynamic_qconfig, gq.per_channel_dynamic_qconfig, gq.per_token_dynamic_qconfig,
    gq.get_default_dynamic_qconfig(reduce_range=True), gq.get_default_dynamic_qconfig(True, reduce_range=True),
])
@pytest.mark.parametrize("backend", ["onednn", "portable"])
def test_kernel_matches_reference_and_float(qconfig, backend):  # type: ignore[no-untyped-def]
    model, x = _model(), torch.randn(4, 10, 32)
    ref = gq.quantize_dynamic(model, {"": qconfig}, example_inputs=(x,), debug=True, backend=backend)
    q = gq.quantize_dynamic(model, {"": qconfig}, example_inputs=(x,), backend=backend)
    assert len(_kernels(q)) == 4
    assert not any(n.target is torch.ops.aten.linear.default for n in q.graph.nodes)
    # each fc1's relu runs inside it (post-op), in the kernel graph only
    assert [n.args[5:] for n in q.graph.nodes if "qlinear_dynamic" in str(n.target)].count(("relu", [])) == 2
    assert not any(n.target is torch.ops.aten.relu.default for n in q.graph.nodes)
    assert sum(n.target is torch.ops.aten.relu.default for n in ref.graph.nodes) == 2
    scripted = gq.to_torchscript(q)
    for got, want, expected, twin in zip(q(x), ref(x), model(x), scripted(x), strict=True):
        assert float((got - want).abs().max()) <= float_output_step(want)  # float out: nothing rounds it
        assert sqnr(expected, got) >= 30.0
        torch.testing.assert_close(twin, got)


def test_shared_weights_are_quantized_and_stored_once():
    model, x = _model(), torch.randn(2, 3, 32)
    q = gq.quantize_dynamic(model, {"": gq.default_dynamic_qconfig}, example_inputs=(x,))
    int8 = [name for name, b in q.named_buffers() if b.dtype == torch.int8]
    assert len(int8) == 2, int8
    float_weights = [name for name, b in list(q.named_parameters()) + list(q.named_buffers())
                     if b.dtype == torch.float32 and b.dim() == 2]
    assert float_weights == [], float_weights


def test_int8_weights_take_under_30_percent_of_float():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    x = torch.randn(2, 256)
    q = gq.quantize_dynamic(model, {"": gq.default_dynamic_qconfig}, example_inputs=(x,))
    float_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "weight" in n)
    int8_bytes = sum(b.numel() * b.element_size() for n, b in q.named_buffers() if "weight" in n)
    assert int8_bytes <= 0.30 * float_bytes, (int8_bytes, float_bytes)


def test_lazy_capture_on_first_call():
    model, x = _model(), torch.randn(5, 10, 32)
    q = gq.quantize_dynamic_jit(model, {"": gq.default_dynamic_qconfig})
    assert q.graphquant_report is None
    out = q(x)
    assert sqnr(model(x)[0], out[0]) >= 30.0
    assert q(torch.randn(2, 10, 32))[0].shape == (2, 10, 16)
    assert q.graphquant_report is not None


def test_seed_prepare_convert_names():
    model, x = _model(), torch.randn(5, 10, 32)
    prepared = gq.prepare_dynamic_jit(model, {"": gq.per_channel_dynamic_qconfig})
    q = gq.convert_dynamic_jit(prepared)
    assert sqnr(model(x)[1], q(x)[1]) >= 30.0


def test_qconfig_dict_none_keeps_float():
    model, x = _model(), torch.randn(2, 3, 32)
    q = gq.quantize_dynamic(model, {"": gq.default_dynamic_qconfig, "fc2": None}, example_inputs=(x,))
    assert len(_kernels(q)) == 2
    assert sum(n.target is torch.ops.aten.linear.default for n in q.graph.nodes) == 2


def test_float16_weights_saturate_with_a_warning_naming_the_layer():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    with torch.no_grad():
        model[0].weight[0, 0] = 1e6
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match=r"0: weights beyond the float16 range"):
        q = gq.quantize_dynamic(model, {"": gq.float16_dynamic_qconfig}, example_inputs=(x,))
    w16 = [b for b in q.buffers() if b.dtype == torch.float16]
    assert len(w16) == 1 and float(w16[0].max()) == 65504.0
    x = torch.randn(3, 4)
    expected = torch.nn.functional.linear(x, model[0].weight.clamp(-65504, 65504).half().float(), model[0].bias)
    torch.testing.assert_close(q(x), expected)


def test_static_qconfig_in_dynamic_is_refused():
    with pytest.raises(gq.GraphQuantError, match="static qconfig; use it with quantize / prepare"):
        gq.quantize_dynamic(_model(), {"": gq.default_qconfig}, example_inputs=(torch.randn(1, 3, 32),))
    with pytest.raises(gq.GraphQuantError, match="dynamic qconfig; use it with quantize_dynamic"):
        gq.prepare_jit(_model(), {"": gq.default_dynamic_qconfig})


def test_lstm_stays_float_and_the_report_says_so():
    class WithLSTM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.lstm = nn.LSTM(8, 8, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lstm(self.fc(x))[0]

    model, x = WithLSTM().eval(), torch.randn(2, 5, 8)
    q = gq.quantize_dynamic(model, {"": gq.default_dynamic_qconfig}, example_inputs=(x,))
    lines = [n for n in gq.report(q).float_nodes if n.module_path == "lstm" and "lstm" in n.op]
    assert lines and "no quantized pattern for aten.lstm" in lines[0].reason
    assert sqnr(model(x), q(x)) >= 30.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_batch_runs_alike_in_torchscript(bad):  # type: ignore[no-untyped-def]
    """A batch with no usable range takes the math path of the per-batch quantize in the kernel and
    in its TorchScript twin alike (torch's one-pass quantize would raise on its zero point)."""
    model, x = _model(), torch.randn(4, 10, 32)
    q = gq.quantize_dynamic(model, {"": gq.default_dynamic_qconfig}, example_inputs=(x,))
    scripted = gq.to_torchscript(q)
    x[0, 0, 0] = bad
    for got, twin in zip(q(x), scripted(x), strict=True):
        assert got.shape == twin.shape == (4, 10, 16)
        torch.testing.assert_close(twin, got, equal_nan=True)
    clean = torch.randn(4, 10, 32)
    torch.testing.assert_close(scripted(clean)[0], q(clean)[0])


@pytest.mark.skipif(not onednn.available(), reason="oneDNN kernels")
def test_per_token_kernel_feeds_onednn_uint8_with_the_int8_values():
    """oneDNN's int8-source GEMM runs a reference kernel on some x86 CPUs (AMD EPYC: 2000x slower),
    so the per-token values go in as uint8 shifted by 128 (reaching 255: on a CPU without VNNI the
    exact split of kernels.x86 takes them). The result is exact integer math on the int8 values,
    rescaled in float32: every partial sum here is an integer below 2 ** 24, so only the two
    float32 rescales round (a few ulp)."""
    from graphquant.kernels.dynamic import qlinear_dynamic
    from graphquant.quant_math import quantize_dynamic_tensor

    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 32) * 4, torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    w_scale, bias = torch.rand(16) * 0.01 + 1e-3, torch.randn(16)
    q, scale, _ = quantize_dynamic_tensor(x, True)
    assert q.dtype == torch.int8
    assert int(q.min()) == -128 or int(q.max()) == 127  # the shifted values reach 0 or 255
    packed = onednn.pack_linear(w)
    want = (torch.nn.functional.linear(q.double(), w.double()) * w_scale.double() * scale.double()).float() + bias
    torch.testing.assert_close(qlinear_dynamic(x, packed, w_scale, bias, True), want, rtol=1e-6, atol=1e-6)


def test_reduce_range_puts_each_batch_on_the_7bit_grid_at_the_cost_of_one_bit() -> None:
    """``get_default_dynamic_qconfig(reduce_range=True)``: per tensor 0..127, per token -64..63
    (both reached), in the reference and kernel graphs alike; about one bit (6 dB) of SQNR."""
    x = torch.randn(6, 9, 32) * 3
    for per_token, lo, hi in ((False, 0, 127), (True, -64, 63)):
        q, scale, zero_point = torch.ops.graphquant.quantize_dynamic(x, per_token, 127)
        assert int(q.min()) == lo and int(q.max()) == hi
        q8, scale8, _ = torch.ops.graphquant.quantize_dynamic(x, per_token)
        assert int(q8.max()) > 127 if not per_token else int(q8.min()) < -64
        torch.testing.assert_close(scale, scale8 * (255 / 127), rtol=1e-6, atol=0)  # the same range, 7 bits
    model, x = _model(), torch.randn(4, 10, 32)
    sqnrs = {}
    for reduce_range in (False, True):
        qconfig = gq.get_default_dynamic_qconfig(per_token=True, reduce_range=reduce_range)
        q = gq.quantize_dynamic(model, {"": qconfig}, example_inputs=(x,))
        kwargs = [n.kwargs for n in q.graph.nodes if "qlinear_dynamic" in str(n.target)]
        bits = {"x_qmax": 127} if reduce_range else {}  # 8-bit graphs unchanged; fc2 reads a relu: asymmetric rows
        assert kwargs == [bits, {**bits, "asymmetric": True}] * 2, kwargs
        assert {n.activation_bits for n in q.graphquant_report.quantized} == {7 if reduce_range else 8}
        sqnrs[reduce_range] = min(sqnr(e, g) for e, g in zip(model(x), q(x), strict=True))
    assert 3.0 < sqnrs[False] - sqnrs[True] < 9.0, sqnrs


def test_dynamic_options_are_checked_by_name() -> None:
    with pytest.raises(gq.GraphQuantError, match=r"'dynamic' activations take the options \['reduce_range'\], got \['bits'\]"):
        gq.ObserverSpec("dynamic", options=(("bits", 7),))
    with pytest.raises(gq.GraphQuantError, match="one_sided_rows is 'asymmetric' .* or 'symmetric', got 'sometimes'"):
        gq.get_default_dynamic_qconfig(per_token=True, one_sided_rows="sometimes")
    with pytest.raises(gq.GraphQuantError, match="qmax must be 255 or 127"):
        torch.ops.graphquant.quantize_dynamic(torch.randn(2, 4), False, 100)
    with pytest.raises(gq.GraphQuantError, match="x_qmax must be 255 or 127"):
        torch.ops.graphquant.qlinear_dynamic(torch.randn(2, 4), torch.ones(3, 4, dtype=torch.int8), torch.ones(3), None,
                                             False, "none", [], 100)


class FFN(nn.Module):
    """BERT's feed-forward block: the output projection reads a GELU, one-sided (>= -0.17)."""

    def __init__(self) -> None:
        super().__init__()
        self.dense_in = nn.Linear(32, 128)
        self.dense_out = nn.Linear(128, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_out(torch.nn.functional.gelu(self.dense_in(x)))


@pytest.mark.parametrize("backend", ["onednn", "portable"])
def test_per_token_rows_of_a_one_sided_input_are_asymmetric(backend):  # type: ignore[no-untyped-def]
    """Per token, a linear reading a GELU gets uint8 rows on their own [min, max] (zero point per
    row): its input's grid doubles against symmetric int8 rows, and the kernels (oneDNN: the zero
    points taken off after the GEMM with the column sums of the same call) match the reference
    graph to what float allows."""
    torch.manual_seed(0)
    model, x = FFN().eval(), torch.randn(4, 12, 32)
    qconfig = gq.per_token_dynamic_qconfig
    q = gq.quantize_dynamic(model, {"": qconfig}, example_inputs=(x,), backend=backend)
    ref = gq.quantize_dynamic(model, {"": qconfig}, example_inputs=(x,), debug=True, backend=backend)
    assert [n.kwargs.get("asymmetric", False) for n in q.graph.nodes if "qlinear_dynamic" in str(n.target)] == \
        [False, True]
    rows = [n for n in ref.graph.nodes if "quantize_dynamic" in str(n.target) and "dequantize" not in str(n.target)]
    assert [n.kwargs.get("asymmetric", False) for n in rows] == [False, True]
    got, want, expected = q(x), ref(x), model(x)
    assert float((got - want).abs().max()) <= float_output_step(want), float((got - want).abs().max())
    torch.testing.assert_close(gq.to_torchscript(q)(x), got)
    symmetric = gq.quantize_dynamic(model, {"": gq.get_default_dynamic_qconfig(True, one_sided_rows="symmetric")},
                                    example_inputs=(x,), backend=backend)
    assert not any(n.kwargs.get("asymmetric") for n in symmetric.graph.nodes)
    gain = sqnr(expected, got) - sqnr(expected, symmetric(x))
    assert gain >= 1.5, gain  # measured 2.1 dB here (40.5 vs 38.4 dB): dense_out's input grid doubles


def test_asymmetric_rows_hold_their_range_and_zero_point():
    """quantize_dynamic(asymmetric=True): each row's min and max reach 0 and 255 (or its range widened
    to 0), the zero point puts 0.0 on the grid, and dequantizing is within half a step."""
    x = torch.nn.functional.gelu(torch.randn(5, 7, 64) * 3)
    q, scale, zero_point = torch.ops.graphquant.quantize_dynamic(x, True, 255, True)
    assert q.dtype == torch.uint8 and scale.shape == zero_point.shape == (5, 7, 1)
    assert bool((q.amax(-1) == 255).all()) and bool((q.amin(-1) == 0).all())
    assert bool(((zero_point > 0) & (zero_point < 64)).all())  # GELU's small negative tail: a low zero point
    err = ((q.double() - zero_point) * scale - x).abs()
    assert bool((err <= scale / 2 + 1e-6).all())
