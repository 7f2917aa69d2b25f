"""Reliability (issue 7): bad inference inputs are named errors on every kind of quantized
model, numeric edge cases hold on both backends, the kernel wrappers survive a fuzz run in a
child process, eight threads agree with a sequential run, and quantizing is deterministic."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import calibration_batches, make_net, run_batches
from torch import nn

import graphquant as gq
from graphquant.inputs import INPUT_CHECK
from graphquant.kernels import onednn, portable
from graphquant.qconfig import ObserverSpec, QConfig
from graphquant.quant_math import sqnr
from graphquant.testing import float_output_step

BACKENDS = [
    pytest.param("onednn", marks=pytest.mark.skipif(not onednn.available(), reason="no oneDNN int8 ops")),
    "portable",
]
TESTS = Path(__file__).resolve().parent
PER_CHANNEL = QConfig(activation=ObserverSpec("minmax"))
PER_TENSOR = QConfig(activation=ObserverSpec("minmax"), weight=ObserverSpec("minmax", torch.int8, symmetric=True))


class Mlp(nn.Module):
    """linear -> relu -> linear over the last dimension of a (batch, tokens, 16) input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * mask


def _mlp() -> Mlp:
    torch.manual_seed(0)
    return Mlp().eval()


# ------------------------------------------------------------------------------ inference inputs

IMAGE, TOKENS = (1, 3, 16, 16), (2, 5, 16)


@functools.cache
def _model(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A quantized model of ``kind`` and the shape it was captured with (batch dynamic)."""
    qd = {"": gq.default_qconfig}
    if kind.startswith("static"):
        _, backend, mode = kind.split("-")
        model = gq.quantize(make_net(), qd, run_batches, [calibration_batches(2)], example_inputs=(torch.randn(IMAGE),),
                            debug=mode == "reference", backend=backend)
        return model, IMAGE
    if kind == "dynamic-kernel":
        return gq.quantize_dynamic(_mlp(), example_inputs=(torch.randn(TOKENS),)), TOKENS
    if kind == "dynamic-reference":
        return gq.quantize_dynamic(_mlp(), example_inputs=(torch.randn(TOKENS),), debug=True), TOKENS
    if kind == "dynamic-lazy":
        lazy = gq.quantize_dynamic(_mlp())
        lazy(torch.randn(TOKENS))  # captured and converted here
        return lazy, TOKENS
    assert kind == "prepared"
    prepared = gq.prepare(make_net(), qd, (torch.randn(IMAGE),))
    gq.calibrate(prepared, calibration_batches(1))
    return prepared, IMAGE


MODELS = ["static-onednn-kernel", "static-portable-kernel", "static-onednn-reference", "dynamic-kernel",
          "dynamic-reference", "dynamic-lazy", "prepared"]
if not onednn.available():
    MODELS = [m for m in MODELS if "onednn" not in m]

# bad input: (make it from the captured shape, what the message must say about it, the way out)
BAD_INPUTS: dict[str, tuple[Callable[[tuple[int, ...]], Any], str, str]] = {
    "rank": (lambda s: torch.randn(s[1:]), "is {r1}-d with shape {s1}", "re-quantize with example inputs"),
    "size": (lambda s: torch.randn(1, s[1] + 1, *s[2:]), "dimension 1 must be {c}, got {c1}",
             "re-quantize with example inputs of shape"),
    "float64": (lambda s: torch.randn(s, dtype=torch.float64), "is torch.float64", "Cast it with x.float()"),
    "half": (lambda s: torch.randn(s).half(), "is torch.float16", "Cast it with x.float()"),
    "batch 0": (lambda s: torch.randn(0, *s[1:]), "has batch size 0", "Skip empty batches"),
    "device": (lambda s: torch.empty(s, device="meta"), "is on meta", "Move it with x.to('cpu')"),
    "not a tensor": (lambda s: torch.randn(s).tolist(), "is a list, not a tensor", "captured with"),
}


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
@pytest.mark.parametrize("kind", MODELS)
def test_bad_inference_input_is_named(kind: str, bad: str) -> None:
    model, shape = _model(kind)
    make, what, way_out = BAD_INPUTS[bad]
    x = make(shape)
    state = {k: v.clone() for k, v in model.state_dict().items()} if kind == "prepared" else {}
    with pytest.raises(gq.GraphQuantError) as error:
        model(x)
    message = str(error.value)
    captured = f"captured with {len(shape)}-d (batch, {', '.join(map(str, shape[1:]))}) torch.float32 on cpu"
    assert message.startswith("graphquant: <model> input 0 (x) ")
    assert captured in message
    sizes = {"r1": len(shape) - 1, "s1": tuple(shape[1:]), "c": shape[1], "c1": shape[1] + 1}
    assert what.format(**sizes) in message
    assert way_out in message
    for name, value in state.items():  # the check runs before the observers: a bad batch is not recorded
        assert torch.equal(value, model.state_dict()[name]), name


@pytest.mark.parametrize("kind", MODELS)
def test_good_inputs_still_run_at_any_batch(kind: str) -> None:
    model, shape = _model(kind)
    for batch in (1, 3):
        x = torch.randn(batch, *shape[1:])
        out = model(x)
        assert out.shape[0] == batch and bool(torch.isfinite(out).all())
    layouts = [torch.randn(3, *shape[1:]).contiguous(memory_format=torch.channels_last)] if len(shape) == 4 else []
    for x in layouts + [torch.randn(3, *shape[1:-1], 2 * shape[-1])[..., ::2]]:  # strides are not checked
        if kind == "prepared":  # float convs: oneDNN picks its algorithm by layout (on AVX2 the sums round apart)
            torch.testing.assert_close(model(x), model(x.contiguous()), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(model(x), model(x.contiguous()))


def test_inputs_must_share_the_batch_size() -> None:
    example = (torch.randn(2, 4, 16), torch.ones(2, 4, 8))
    model = gq.quantize_dynamic(TwoInputs().eval(), example_inputs=example)
    assert model(torch.randn(3, 4, 16), torch.ones(3, 4, 8)).shape == (3, 4, 8)
    with pytest.raises(gq.GraphQuantError, match=r"input 1 \(mask\) has batch size 2, but an earlier input has 3"):
        model(torch.randn(3, 4, 16), torch.ones(2, 4, 8))
    with pytest.raises(gq.GraphQuantError, match=r"input 1 \(mask\) is torch.int64; .* Cast it with mask.float\(\)"):
        model(torch.randn(3, 4, 16), torch.ones(3, 4, 8, dtype=torch.int64))


class FixedBatch(nn.Module):
    """``reshape(2, -1)`` pins the batch: capture falls back to static shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(2, -1))


def test_a_fixed_batch_is_named() -> None:
    with pytest.warns(UserWarning, match="fixed batch size"):
        model = gq.quantize_dynamic(FixedBatch().eval(), example_inputs=(torch.randn(2, 8),))
    assert model(torch.randn(2, 8)).shape == (2, 4)
    with pytest.raises(gq.GraphQuantError, match=r"input 0 \(x\) has shape \(3, 8\): the batch size is fixed at 2, "
                       r"got 3; the model was captured with 2-d \(2, 8\)"):
        model(torch.randn(3, 8))


@pytest.mark.parametrize("example,needle", [
    (torch.randn(2, 3, 16, 16, dtype=torch.float64), r"example input 0 \(x\) is torch.float64; .* with .float\(\)"),
    (torch.randn(2, 3, 16, 16).half(), r"example input 0 \(x\) is torch.float16"),
    (torch.randn(0, 3, 16, 16), r"example input 0 \(x\) has batch size 0 .* pass an example batch with data"),
])
def test_capture_refuses_examples_no_int8_graph_fits(example: torch.Tensor, needle: str) -> None:
    with pytest.raises(gq.GraphQuantError, match=needle):
        gq.prepare(make_net(), {"": gq.default_qconfig}, (example,))
    lazy = gq.prepare(make_net(), {"": gq.default_qconfig})  # captured on the first calibration call
    with pytest.raises(gq.GraphQuantError, match=needle):
        gq.calibrate(lazy, [example])


def test_the_check_survives_save_load_and_torchscript(tmp_path: Path) -> None:
    model, shape = _model("static-portable-kernel" if not onednn.available() else "static-onednn-kernel")
    gq.save(model, tmp_path / "q.pt2")
    loaded = gq.load(tmp_path / "q.pt2")
    torch.jit.save(gq.to_torchscript(model), tmp_path / "q.ts")
    scripted = torch.jit.load(tmp_path / "q.ts")
    x = torch.randn(2, *shape[1:])
    assert torch.equal(loaded(x), model(x)) and torch.equal(scripted(x), model(x))
    for bad, needle in [(x.double(), "is torch.float64"), (x[0], "is 3-d with shape (3, 16, 16)"),
                        (x[:0], "has batch size 0")]:
        with pytest.raises(gq.GraphQuantError) as error:
            loaded(bad)
        assert needle in str(error.value) and "captured with 4-d (batch, 3, 16, 16)" in str(error.value)
    # TorchScript raises torch.jit.Error (ValueError inside) with the same words, no graphquant needed
    for bad, needle in [(x.double(), "input 0 (x) has the wrong dtype"), (x[0], "is 3-d with shape [3, 16, 16]"),
                        (x[:0], "has batch size 0"), (x[:, :2], "dimension 1 must be 3, got 2")]:
        with pytest.raises(torch.jit.Error) as ts_error:
            scripted(bad)
        assert needle in str(ts_error.value) and "captured with 4-d (batch, 3, 16, 16)" in str(ts_error.value)


def test_the_check_costs_microseconds() -> None:
    """The check runs on every call of models benchmarked at batch 1: a few attribute reads."""
    model, shape = _model("static-portable-kernel")
    check, x = getattr(model, INPUT_CHECK), torch.randn(shape)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(200):
            check(x)
        best = min(best, (time.perf_counter() - start) / 200)
    assert best < 20e-6, f"input check took {best * 1e6:.1f} µs per call"
    assert not hasattr(model, "_guards_fn")  # export's slower check is replaced, not run twice


# ------------------------------------------------------------------------------ numeric edge cases


class ConvFc(nn.Module):
    """conv -> relu -> flatten -> linear: the linear's output scale is the model's output step."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _conv_fc(scale_conv: float = 1.0, scale_fc: float = 1.0) -> ConvFc:
    torch.manual_seed(0)
    model = ConvFc().eval()
    with torch.no_grad():
        model.conv.weight.mul_(scale_conv)
        model.fc.weight.mul_(scale_fc)
    return model


def _quantize_both(
    model: nn.Module, calibration: list[torch.Tensor], backend: str, qconfig: QConfig = PER_CHANNEL
) -> tuple[gq.PreparedModel, nn.Module, nn.Module]:
    """The calibrated prepared model, its kernel graph and its reference graph."""
    prepared = gq.prepare(model, {"": qconfig}, (calibration[0],))
    gq.calibrate(prepared, calibration)
    return prepared, gq.convert(prepared, backend=backend), gq.convert(prepared, debug=True, backend=backend)


def _output_step(quantized: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    """The model output's quantization step; a last linear that writes float32 has none, and then
    one step is what float32 arithmetic allows (as the harness counts it)."""
    last = gq.report(quantized).quantized[-1]
    if last.scale is not None:
        return float(last.scale)
    with torch.no_grad():
        y = reference(x)
    return float_output_step(y)


def _assert_close(model: nn.Module, quantized: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    """Finite; the kernel within one output step of the reference; both near float (SQNR >= 25 dB:
    a silently zeroed layer, the 1e-30 failure, gives about 0 dB)."""
    step = _output_step(quantized, reference, x)
    assert 0 < step < float("inf")
    with torch.no_grad():
        y, y_ref, y_float = quantized(x), reference(x), model(x)
    assert bool(torch.isfinite(y).all())
    assert float((y - y_ref).abs().max()) <= step * 1.001
    assert sqnr(y_float, y) >= 25.0, sqnr(y_float, y)


@pytest.mark.parametrize("value", [0.0, 2.5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_activation_keeps_a_positive_scale(backend: str, value: float) -> None:
    x = torch.full((2, 3, 8, 8), value)
    prepared, quantized, reference = _quantize_both(_conv_fc(), [x], backend)
    graph = prepared.graph_module
    assert graph is not None
    first = graph.get_submodule("observer_0").qparams()  # the input: a zero range for value 0
    assert 0 < float(first.scale) < float("inf")
    assert torch.equal(first.zero_point, torch.tensor(0)) if value == 0.0 else True
    _assert_close(prepared, quantized, reference, x[:1])


@pytest.mark.parametrize("qconfig", [PER_CHANNEL, PER_TENSOR], ids=["per_channel", "per_tensor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_weight_channel(backend: str, qconfig: QConfig) -> None:
    model = _conv_fc()
    with torch.no_grad():
        model.conv.weight[1] = 0.0
        model.fc.weight[2] = 0.0
    x = calibration_batches(2, batch=2)
    x = [b[:, :, :8, :8] for b in x]
    _, quantized, reference = _quantize_both(model, x, backend, qconfig)
    _assert_close(model, quantized, reference, x[0])
    with torch.no_grad():  # the zero row gives its bias alone, to within one output step
        y = quantized(x[0])[:, 2]
    assert float((y - model.fc.bias[2]).abs().max()) <= _output_step(quantized, reference, x[0]) * 1.001


@pytest.mark.parametrize("qconfig", [PER_CHANNEL, PER_TENSOR], ids=["per_channel", "per_tensor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_of_1e30_and_1e_minus_30(backend: str, qconfig: QConfig) -> None:
    """conv weights 1e30 feed linear weights 1e-30: the product is O(1). A scale floor of
    float32 eps (1.2e-7) used to round every 1e-30 weight to 0: a silent zero."""
    model = _conv_fc(1e30, 1e-30)
    x = [b[:, :, :8, :8] for b in calibration_batches(2, batch=2)]
    _, quantized, reference = _quantize_both(model, x, backend, qconfig)
    _assert_close(model, quantized, reference, x[0])
    assert float(model(x[0]).abs().max()) > 10 * _output_step(quantized, reference, x[0])  # not a trivially zero output


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_of_1e30_alone(backend: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e30)
        model[0].bias.mul_(1e30)
    x = [torch.randn(4, 16)]
    _, quantized, reference = _quantize_both(model, x, backend)
    _assert_close(model, quantized, reference, x[0])
    assert _output_step(quantized, reference, x[0]) > 1e25  # the step follows the output's 1e30 magnitude


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_bias_overflow(backend: str) -> None:
    """bias / (x_scale * w_scale) far beyond int32: both kernels add the bias in float, exactly."""
    model = _conv_fc(1e-4, 1e-4)
    with torch.no_grad():
        model.conv.bias.fill_(3.0)
        model.fc.bias.fill_(1e3)
    x = [b[:, :, :8, :8] * 1e-3 for b in calibration_batches(2, batch=2)]
    prepared, quantized, reference = _quantize_both(model, x, backend)
    graph = prepared.graph_module
    assert graph is not None
    x_scale = float(graph.get_submodule("observer_0").qparams().scale)
    w_scale = float(model.conv.weight.abs().amax()) / 127.5
    assert 3.0 / (x_scale * w_scale) > 2**31  # the int32 bias of a fixed-point kernel would overflow
    _assert_close(model, quantized, reference, x[0])


def test_bias_is_added_as_a_real_number_when_the_output_grid_is_finer_than_the_accumulators() -> None:
    """A finding of the fuzz test (seed 791922): with an output scale (1e-4) finer than x_scale *
    w_scale (about 1e-3), a bias rounded onto the accumulator grid put the portable kernel 4 steps
    from the real value. Both kernels now round ``acc * x_scale * w_scale + bias`` once: the
    portable one to the nearest step of the float64 value, oneDNN within one step of it."""
    from graphquant.kernels import onednn, portable

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randint(0, 256, (1, 2, 1, 5, 3), dtype=torch.uint8, generator=g)
        w = torch.randint(-127, 128, (4, 2, 1, 1, 2), dtype=torch.int8, generator=g)
        w_scale, bias = torch.rand(4, generator=g) * 0.01 + 0.001, torch.randn(4, generator=g)
        args = ([1, 1, 1], [0, 1, 1], [1, 1, 2], 1)
        acc = torch.nn.functional.conv3d(x.double() - 50, w.double(), None, 1, (0, 1, 1), (1, 1, 2))
        real = acc * 0.2111 * w_scale.double().view(1, -1, 1, 1, 1) + bias.double().view(1, -1, 1, 1, 1)
        want = (real.clamp(min=0) / 1e-4).round().add(104).clamp(0, 255)  # relu, then one rounding
        got = portable.qconv(x, 0.2111, 50, w, w_scale, bias, *args, 1e-4, 104, "relu")
        assert torch.equal(got.double(), want)
        if onednn.available():
            packed = onednn.pack_conv(w, w_scale, 0.2111, 50, *args)
            fast = onednn.qconv(x, 0.2111, 50, packed, w_scale, bias, *args, 1e-4, 104, "relu")
            assert int((fast.int() - got.int()).abs().max()) <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_channels_last_inputs(backend: str) -> None:
    static = gq.quantize(make_net(), {"": gq.default_qconfig}, run_batches, [calibration_batches(2)], backend=backend)
    x = torch.randn(2, 3, 16, 16)
    sliced = torch.zeros(2, 3, 16, 32)[..., ::2]
    sliced.copy_(x)
    permuted = torch.zeros(2, 16, 16, 3).permute(0, 3, 1, 2)
    permuted.copy_(x)
    expected = static(x)
    for view in (x.contiguous(memory_format=torch.channels_last), sliced, permuted):
        assert not view.is_contiguous()
        assert torch.equal(static(view), expected)
    dynamic = gq.quantize_dynamic(_mlp(), example_inputs=(torch.randn(TOKENS),), backend=backend)
    t = torch.randn(2, 5, 16)
    transposed = torch.zeros(2, 16, 5).transpose(1, 2)
    transposed.copy_(t)
    assert not transposed.is_contiguous()
    assert torch.equal(dynamic(transposed), dynamic(t))


# ------------------------------------------------------------------------------ faults


def _child_env() -> dict[str, str]:
    path = os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@pytest.mark.skipif(not onednn.available(), reason="no oneDNN int8 ops")
def test_one_wide_dilated_kernel_does_not_crash_onednn() -> None:
    """A crash the fuzz test found: oneDNN (torch 2.13) with a 1-wide kernel, dilation 2, padding
    and stride 2 wrote out of bounds (SIGSEGV). The dilation of a 1-wide kernel changes nothing, so
    the oneDNN calls pass 1; in a child, so that a regression fails this test, not the run."""
    script = """if True:
        import torch, graphquant
        from graphquant.kernels import onednn, portable
        w, ws = torch.randint(-127, 127, (2, 2, 2, 1), dtype=torch.int8), torch.full((2,), 0.01)
        args = ([1, 2], [1, 1], [1, 2], 1)
        x = torch.randint(0, 255, (2, 2, 6, 1), dtype=torch.uint8)
        a = onednn.qconv(x, 0.1, 10, onednn.pack_conv(w, ws, 0.1, 10, *args), ws, None, *args, 0.5, 2, "none")
        b = portable.qconv(x, 0.1, 10, w, ws, None, *args, 0.5, 2, "none")
        print(tuple(a.shape), int((a.int() - b.int()).abs().max()))
    """
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                           env=_child_env())
    assert child.returncode == 0, f"returncode {child.returncode}: {child.stderr[-2000:]}"
    shape, steps = child.stdout.strip().rsplit(" ", 1)
    assert shape == "(2, 2, 7, 2)" and int(steps) <= 1


def test_fuzzed_kernels_refuse_bad_arguments_and_never_crash(tmp_path: Path) -> None:
    """hypothesis drives the kernel wrappers in a child (tests/fuzz_kernels.py): a signal would
    kill the child, not this run. Findings: any exception but GraphQuantError, a conv or linear
    with a broken argument that runs (a missing guard), a valid one that is refused, and a valid
    one more than one step from the portable kernel's exact integer math."""
    last_case = tmp_path / "last_case.txt"
    seed = int(os.environ.get("GRAPHQUANT_FUZZ_SEED", time.time_ns() % 1_000_000))  # new cases each run
    child = subprocess.run([sys.executable, str(TESTS / "fuzz_kernels.py"), "25", str(last_case), str(seed)],
                           capture_output=True, text=True, timeout=120, env=_child_env())
    last = last_case.read_text() if last_case.exists() else "(none)"
    assert child.returncode >= 0, (f"the fuzz child died by signal {-child.returncode} on: {last} "
                                   f"(rerun: GRAPHQUANT_FUZZ_SEED={seed})")
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["findings"] == [], f"seed {seed}: " + json.dumps(report["findings"][:5], indent=1)
    assert report["cases"] > 300 and report["ok"] > 50 and report["refused"] > 50, report
    assert report["checked"] > 50, report  # valid convs and linears held to the portable kernels


def _parallel_matches_sequential(model: nn.Module, inputs: list[torch.Tensor]) -> None:
    with torch.no_grad():
        expected = [model(x) for x in inputs]
        with ThreadPoolExecutor(max_workers=8) as pool:
            for _ in range(3):
                got = list(pool.map(model, inputs))
                for a, b in zip(got, expected, strict=True):
                    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eight_threads_give_the_sequential_outputs(backend: str) -> None:
    g = torch.Generator().manual_seed(3)
    static = gq.quantize(make_net(), {"": gq.default_qconfig}, run_batches, [calibration_batches(2)], backend=backend)
    _parallel_matches_sequential(static, [torch.randn(2, 3, 16, 16, generator=g) for _ in range(8)])
    dynamic = gq.quantize_dynamic(_mlp(), example_inputs=(torch.randn(TOKENS),), backend=backend)
    _parallel_matches_sequential(dynamic, [torch.randn(2, 5, 16, generator=g) for _ in range(8)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantizing_twice_is_bit_identical_everywhere(backend: str) -> None:
    """Weights, qparams, the generated code, the report and the outputs: static and dynamic."""

    def static() -> nn.Module:
        return gq.quantize(make_net(), {"": gq.default_qconfig}, run_batches, [calibration_batches(2)],
                           backend=backend)

    def dynamic() -> nn.Module:
        return gq.quantize_dynamic(_mlp(), example_inputs=(torch.randn(TOKENS),), backend=backend)

    for make, x in ((static, torch.randn(2, 3, 16, 16)), (dynamic, torch.randn(2, 5, 16))):
        a, b = make(), make()
        state_a, state_b = a.state_dict(), b.state_dict()
        assert state_a.keys() == state_b.keys() and len(state_a) > 0
        for name in state_a:
            assert torch.equal(state_a[name], state_b[name]), name
        assert a.code == b.code
        assert gq.report(a).nodes == gq.report(b).nodes
        assert torch.equal(a(x), b(x))


def test_inplace_false_leaves_the_model_alone_dynamic() -> None:
    """Static is covered by tests/test_api.py::test_inplace_false_never_changes_the_model."""
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gq.quantize_dynamic(model, example_inputs=(torch.randn(TOKENS),))
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert type(model) is Mlp


@pytest.mark.skipif(not onednn.available(), reason="this PyTorch has no oneDNN int8 ops")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dim", [2, 3])
def test_small_strided_padded_convs_that_onednn_gets_wrong_match_exact_integer_math(threads: int, dim: int) -> None:
    """oneDNN's int8 conv is silently wrong on some small shapes (the fuzz test found x (1, 2, 5, 3, 3),
    w (4, 2, 3, 1, 3), stride (1, 1, 2), padding (1, 0, 0): 82 steps off at 1 thread): a strided dim
    whose output is one wide, and 3-d convs with padding on small inputs (depth 1, padding 1).
    graphquant rewrites both (kernels/x86.py); 300 random small convs of that kind, every one held
    to exact integer math (measured before the rewrite: about 1 in 100 wrong, 1 in 3 of the
    one-wide ones)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads * 10 + dim)

        def draw(lo: int, hi: int) -> int:
            return int(torch.randint(lo, hi + 1, (1,), generator=g))

        one_wide = 0
        for _ in range(300):
            kernel = [draw(1, 3) for _ in range(dim)]
            stride = [draw(1, 2) for _ in range(dim - 1)] + [2]
            padding = [draw(0, 1) for _ in range(dim)]
            dilation = [1 + (draw(0, 2) == 2) for _ in range(dim)]
            reach = [(k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True)]
            size = [max(1, r - 2 * p) + draw(0, 2) for r, p in zip(reach, padding, strict=True)]
            x = torch.randint(0, 256, (draw(1, 2), 3, *size), dtype=torch.uint8, generator=g)
            w = torch.randint(-128, 128, (4, 3, *kernel), dtype=torch.int8, generator=g)
            w_scale, bias = torch.rand(4, generator=g) * 0.01 + 1e-3, torch.randn(4, generator=g)
            conv = (stride, padding, dilation, 1)
            want = portable.qconv(x, 0.05, 20, w, w_scale, bias, *conv, 0.3, 100, "none", [])
            packed = onednn.pack_conv(w, w_scale, 0.05, 20, *conv)
            got = getattr(torch.ops.graphquant, f"qconv{dim}d")(x, 0.05, 20, packed, w_scale, bias, *conv, 0.3, 100,
                                                                "none", [])
            assert got.shape == want.shape
            assert int((got.int() - want.int()).abs().max()) <= 1, (tuple(x.shape), kernel, stride, padding, dilation)
            one_wide += got.shape[-1] == 1
        assert one_wide > 30  # the shapes oneDNN gets wrong most often are well represented
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not onednn.available(), reason="no oneDNN int8 ops")
def test_dilated_taps_that_all_fall_in_the_padding_do_not_crash_onednn() -> None:
    """A crash the fuzz test found: oneDNN (torch 2.13) writes out of bounds (SIGSEGV) when every
    dilated tap of some output lies in the padding (depth 1, kernel 2, dilation 2, padding 1,
    float32 out). graphquant pads such inputs itself with the zero point; in a child, so that a
    regression fails this test, not the run."""
    script = """if True:
        import torch, graphquant
        from graphquant.kernels import onednn, portable
        torch.manual_seed(0)
        x = torch.randint(0, 256, (2, 4, 1, 5, 4), dtype=torch.uint8)
        w, ws, b = torch.randint(-128, 128, (1, 4, 2, 2, 2), dtype=torch.int8), torch.full((1,), 0.01), torch.randn(1)
        args = ([2, 2, 2], [1, 0, 1], [2, 1, 1], 1)
        packed = onednn.pack_conv(w, ws, 0.638, 83, *args)
        worst = 0
        for post_op in ("hardswish", "none", "gelu"):
            a = onednn.qconv(x, 0.638, 83, packed, ws, b, *args, 0.5, 100, post_op, [])
            c = portable.qconv(x, 0.638, 83, w, ws, b, *args, 0.5, 100, post_op, [])
            worst = max(worst, int((a.int() - c.int()).abs().max()))
        print(tuple(a.shape), worst)
    """
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                           env=_child_env())
    assert child.returncode == 0, f"returncode {child.returncode}: {child.stderr[-2000:]}"
    shape, steps = child.stdout.strip().rsplit(" ", 1)
    assert shape == "(2, 1, 1, 2, 3)" and int(steps) <= 1
