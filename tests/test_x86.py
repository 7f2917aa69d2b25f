"""Exact int8 on every x86 CPU (kernels/x86.py): worst-case operands through every oneDNN GEMM and
conv kernel, held to exact integer math (the portable backend), on this CPU, on the float32 path
over the integer values forced, and in a child process with ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN's saturating kernels)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import graphquant as gq
from graphquant.kernels import onednn, portable, x86
from graphquant.kernels.dynamic import qlinear_dynamic
from graphquant.observers import HistogramObserver, MinMaxObserver

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this PyTorch has no oneDNN int8 ops")
ops = torch.ops.graphquant
ROOT = Path(__file__).resolve().parent.parent
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def _cpu_has_vnni() -> bool:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    return any(flag in flags for flag in VNNI_FLAGS)


def _worst_uint8(shape: tuple[int, ...], channel_axis: int, seed: int = 0) -> torch.Tensor:
    """Random uint8 with every other input channel at 255: 255 beside 255 in the kernels' pairs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    index = [slice(None)] * len(shape)
    index[channel_axis] = slice(0, None, 2)
    x[tuple(index)] = 255
    return x


def _worst_int8(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    """Random int8 weights with the first input channels at the ends of the range (127, -128)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)
    w[:, 0::4] = 127
    w[:, 1::4] = -128
    w[: shape[0] // 2, 2::4] = 127
    return w


def _out_qparams(real: torch.Tensor) -> tuple[float, int]:
    """Output scale and zero point spanning ``real``: a step is 1/255 of its range."""
    lo, hi = min(float(real.min()), 0.0), max(float(real.max()), 0.0)
    scale = (hi - lo) / 255
    return scale, int(round(-lo / scale))


def _assert_within_one_step(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype == torch.uint8 and got.shape == want.shape
    assert int((got.int() - want.int()).abs().max()) <= 1, "more than one output step from exact integer math"


def _assert_float_exact(got: torch.Tensor, want: torch.Tensor) -> None:
    """A float32 output never rounded to a grid: what float32 rescaling allows, nothing more."""
    tol = 1e-5 * float(want.abs().max())
    assert float((got.double() - want.double()).abs().max()) <= tol


# ---------------------------------------------------------------------------------------------
# worst-case operands, every kernel: (oneDNN op call, portable op call)

KernelCase = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def _linear(post_op: str, args: list[float], float_out: bool) -> KernelCase:
    def run() -> tuple[torch.Tensor, torch.Tensor]:
        x, w = _worst_uint8((6, 7, 320), -1), _worst_int8((24, 320))
        w_scale, bias = torch.rand(24) * 0.01 + 1e-3, torch.randn(24)
        real = portable.qlinear(x, 0.02, 131, w, w_scale, bias, 1.0, 0, post_op, args, float_out=True)
        scale, zp = _out_qparams(real)
        want = portable.qlinear(x, 0.02, 131, w, w_scale, bias, scale, zp, post_op, args, float_out=float_out)
        got = ops.qlinear(x, 0.02, 131, onednn.pack_linear(w), w_scale, bias, scale, zp, post_op, args, float_out)
        return got, want

    return run


def _conv(dim: int, groups: int, post_op: str, args: list[float], stride: int = 1, out: int = 16,
          size: int = 5) -> KernelCase:
    def run() -> tuple[torch.Tensor, torch.Tensor]:
        channels, out_channels = (256, out) if groups == 1 else (32, 32)
        spatial = (size,) * dim
        x = _worst_uint8((2, channels, *spatial), 1)
        w = _worst_int8((out_channels, channels // groups, *(3,) * dim))
        w_scale, bias = torch.rand(out_channels) * 0.01 + 1e-3, torch.randn(out_channels)
        conv = ([stride] * dim, [1] * dim, [1] * dim, groups)
        acc = portable.conv_nd(x.double() - 127, w.double(), *conv)
        real = acc * (0.03 * w_scale.double()).reshape(1, -1, *[1] * dim) + bias.double().reshape(1, -1, *[1] * dim)
        scale, zp = _out_qparams(portable.apply_post_op(real, post_op, args))
        want = portable.qconv(x, 0.03, 127, w, w_scale, bias, *conv, scale, zp, post_op, args)
        packed = onednn.pack_conv(w, w_scale, 0.03, 127, *conv, x_shape=list(x.shape))
        got = getattr(ops, f"qconv{dim}d")(x, 0.03, 127, packed, w_scale, bias, *conv, scale, zp, post_op, args)
        return got, want

    return run


def _conv_add(dim: int, post_op: str) -> KernelCase:
    def run() -> tuple[torch.Tensor, torch.Tensor]:
        x = _worst_uint8((2, 256, *(6,) * dim), 1)
        w = _worst_int8((16, 256, *(3,) * dim))
        w_scale, bias = torch.rand(16) * 0.01 + 1e-3, torch.randn(16)
        conv = ([1] * dim, [1] * dim, [1] * dim, 1)
        accum = torch.randint(0, 256, (2, 16, *(6,) * dim), dtype=torch.uint8)
        acc = portable.conv_nd(x.double() - 140, w.double(), *conv)
        shape = (1, -1, *[1] * dim)
        real = acc * (0.02 * w_scale.double()).reshape(shape) + bias.double().reshape(shape)
        real = real + (accum.double() - 100) * 0.5
        scale, zp = _out_qparams(portable.apply_post_op(real, post_op, []))
        want = portable.qconv_add(x, 0.02, 140, w, w_scale, bias, *conv, accum, 0.5, 100, scale, zp, post_op)
        packed = onednn.pack_conv(w, w_scale, 0.02, 140, *conv)
        kept = accum.clone()
        got = getattr(ops, f"qconv{dim}d_add")(x, 0.02, 140, packed, w_scale, bias, *conv, accum, 0.5, 100, scale, zp,
                                               post_op)
        assert torch.equal(accum, kept)  # not donated: the graph's accum is left as it was
        return got, want

    return run


def _dynamic(per_token: bool, post_op: str, x_qmax: int = 255) -> KernelCase:
    def run() -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(4, 9, 384, generator=g) * 3
        x[..., ::2] = x[..., ::2].abs() + 6  # full-range uint8 (per tensor) / int8 near +127 (per token)
        w = _worst_int8((32, 384))
        w_scale, bias = torch.rand(32) * 0.01 + 1e-3, torch.randn(32)
        want = qlinear_dynamic(x, w, w_scale, bias, per_token, post_op, (), x_qmax)  # portable: exact integer sums
        return qlinear_dynamic(x, onednn.pack_linear(w), w_scale, bias, per_token, post_op, (), x_qmax), want

    return run


CASES: dict[str, KernelCase] = {
    "linear": _linear("none", [], False),
    "linear_relu": _linear("relu", [], False),
    "linear_hardtanh": _linear("hardtanh", [-1.0, 2.0], False),
    "linear_gelu": _linear("gelu", [], False),
    "linear_float_out": _linear("none", [], True),
    "linear_gelu_float_out": _linear("gelu", [], True),
    "conv1d": _conv(1, 1, "none", []),
    "conv1d_relu": _conv(1, 1, "relu", []),
    "conv2d": _conv(2, 1, "none", []),
    "conv2d_relu": _conv(2, 1, "relu", []),
    "conv2d_hardtanh": _conv(2, 1, "hardtanh", [0.0, 6.0]),
    "conv2d_hardswish": _conv(2, 1, "hardswish", []),
    "conv2d_silu_strided": _conv(2, 1, "silu", [], stride=2),
    "conv2d_grouped": _conv(2, 4, "none", []),
    "conv2d_depthwise": _conv(2, 32, "relu", []),
    # a weight large beside its output: the saturating CPU's path runs it as two int8 calls
    "conv2d_large_weight": _conv(2, 1, "relu", [], out=128, size=2),
    "conv3d": _conv(3, 1, "none", []),
    "conv3d_gelu": _conv(3, 1, "gelu", []),
    "conv1d_add": _conv_add(1, "none"),
    "conv2d_add": _conv_add(2, "none"),
    "conv2d_add_relu": _conv_add(2, "relu"),
    "dynamic_per_tensor": _dynamic(False, "none"),
    "dynamic_per_tensor_relu": _dynamic(False, "relu"),
    "dynamic_per_token": _dynamic(True, "none"),
    "dynamic_per_token_gelu": _dynamic(True, "gelu"),
    # reduce_range: the batch onto 0..127 (per tensor) or -64..63 shifted to 0..127 (per token)
    "dynamic_per_tensor_7bit": _dynamic(False, "relu", 127),
    "dynamic_per_token_7bit": _dynamic(True, "none", 127),
}
@pytest.mark.parametrize("case", sorted(CASES))
def test_worst_case_operands_match_exact_integer_math(case: str) -> None:
    """On this CPU, whichever path the probe picks: within one step of the portable kernel
    (a float32 output within float32 rescaling of it)."""
    got, want = CASES[case]()
    if want.dtype == torch.uint8:
        _assert_within_one_step(got, want)
    else:
        _assert_float_exact(got, want)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_float32_path_over_the_integers_is_exact_on_any_cpu(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The saturating CPU's path forced (``saturates()`` answers True): each 8-bit layer runs the
    float32 op over its integer values, exact on every CPU; its algebra (zero point, per-channel
    scale, bias, post-op, one rounding, the residual sum written into the accum) and the 1-d /
    3-d / grouped / dynamic call sites are held to the portable kernels."""
    monkeypatch.setattr(x86, "_SATURATES", {False: True, True: True})
    calls: list[str] = []
    with torch.profiler.profile() as prof:
        got, want = CASES[case]()
    calls = [e.count for e in prof.key_averages() if e.key.startswith("onednn::q") and "prepack" not in e.key]
    if case == "conv2d_large_weight":  # 128 x 256 x 3 x 3 weights for 2 x 2 outputs: two exact 7-bit calls
        assert calls == [2] and x86.TWO_CALLS_WEIGHTS_PER_OUTPUT * 4 < 128 * 256 * 9
    elif case.endswith("_7bit"):
        assert calls == [1]  # 7-bit activations: one int8 call, exact by range
    else:
        assert calls == []  # the float32 op over the integers: no int8 oneDNN call, which could saturate
    if want.dtype == torch.uint8:
        _assert_within_one_step(got, want)
    else:
        _assert_float_exact(got, want)


def test_a_depthwise_conv_keeps_one_int8_call_where_only_the_gemm_saturates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the GEMM kernels saturate and the depthwise kernel does not (oneDNN on AVX2, measured
    under the cap above), a depthwise conv runs oneDNN's one int8 call and the report says so."""
    monkeypatch.setattr(x86, "_SATURATES", {False: True, True: False})
    with torch.profiler.profile() as prof:
        got, want = CASES["conv2d_depthwise"]()
    calls = [e.count for e in prof.key_averages() if e.key.startswith("onednn::q") and "prepack" not in e.key]
    assert calls == [1]
    _assert_within_one_step(got, want)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1)).eval()
    data = [(torch.randn(2, 8, 6, 6),)]
    qmodel = gq.quantize(model, {"": gq.get_default_qconfig("x86", reduce_range=False)},
                         lambda m, d: [m(*b) for b in d], [data], example_inputs=data[0])
    paths = {n.module_path: n.cpu_path for n in qmodel.graphquant_report.quantized}
    assert paths == {"0": "int8-dw", "1": "avx2-fp32"}
    scripted = gq.to_torchscript(qmodel)
    assert scripted.x86_saturation_depthwise.depthwise and not scripted.x86_saturation.depthwise
    # the default (reduce_range="auto"): the GEMM-shaped conv's input on 7 bits, one int8 call on this CPU,
    # with what that cost its input; the depthwise conv keeps 8 bits
    qmodel = gq.quantize(model, {"": gq.get_default_qconfig("x86")}, lambda m, d: [m(*b) for b in d], [data],
                         example_inputs=data[0])
    nodes = {n.module_path: n for n in gq.report(qmodel).quantized if n.op == "aten.conv2d.default"}
    assert {path: n.cpu_path for path, n in nodes.items()} == {"0": "int8-dw", "1": "7-bit"}
    cost = nodes["1"].bits_cost_db
    assert nodes["0"].bits_cost_db is None and cost is not None and 3.0 < cost < 9.0, cost  # about 6 dB a bit
    assert f"its input {cost:.1f} dB below 8 bits" in str(gq.report(qmodel))


def test_probe_answers_for_this_cpu() -> None:
    """No VNNI flag in /proc/cpuinfo (and no ISA cap) means saturation, and the probe says so;
    with VNNI it does not saturate."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA") or not Path("/proc/cpuinfo").exists():
        pytest.skip("the expected answer follows from the CPU's flags only without an ISA cap")
    assert x86.probe_saturates() == (not _cpu_has_vnni())
    assert x86.saturates() == x86.probe_saturates()


# ---------------------------------------------------------------------------------------------
# under ONEDNN_MAX_CPU_ISA=AVX2, in a child process


def _child(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    full_env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", **env}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=full_env, cwd=ROOT,
                          timeout=600)


def test_the_avx2_cap_runs_avx2_kernels_that_saturate_and_graphquant_stays_exact(tmp_path: Path) -> None:
    """The cap is honoured by this PyTorch (ONEDNN_VERBOSE reports the AVX2 ISA and no AVX-512 or AMX
    implementation runs), the bare
    oneDNN call saturates under it (what the tests would catch), the probe sees it, and every
    worst-case case above is exact there."""
    result = _child(
        """
        import torch
        from graphquant.kernels import onednn, x86
        x = torch.full([4, 256], 255, dtype=torch.uint8)
        w = torch.full([8, 256], 127, dtype=torch.int8)
        y = torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, onednn.pack_linear(w), torch.ones(8),
                                               torch.zeros(8, dtype=torch.int64), None, 1.0, 0, torch.float32,
                                               "none", [], "")
        print("BARE_ERROR", float((y - 256 * 255 * 127).abs().max() / (256 * 255 * 127)))
        print("SATURATES", x86.saturates())
        print("DEPTHWISE_SATURATES", x86.saturates(True))
        """,
        tmp_path,
        ONEDNN_VERBOSE="1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    implementations = [line for line in lines if line.startswith("onednn_verbose") and ",exec," in line]
    assert implementations and all("avx512" not in line and "amx" not in line for line in implementations)
    assert any(line.startswith("onednn_verbose") and "cpu,isa:Intel AVX2" in line for line in lines)
    values = dict(line.split(" ", 1) for line in lines if line.startswith(("BARE_ERROR", "SATURATES", "DEPTHWISE")))
    assert float(values["BARE_ERROR"]) > 0.1  # the bare kernel is 10%+ of its range off: saturation
    assert values["SATURATES"] == "True"
    # oneDNN's AVX2 depthwise kernel multiplies in int32: measured here, so depthwise convs keep one
    # int8 call (and the worst-case depthwise case below holds it to exact integer math)
    assert values["DEPTHWISE_SATURATES"] == "False"
    suite = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                            "worst_case or over_the_integers"], capture_output=True, text=True, cwd=ROOT, timeout=900,
                           env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert suite.returncode == 0, suite.stdout[-3000:]
    assert f"{2 * len(CASES)} passed" in suite.stdout


class _Net(nn.Module):
    """A conv block with a residual join, then linears joined by an int8 add: every static oneDNN path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(64, 64, 1)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 256)
        self.fc2 = nn.Linear(256, 32)
        self.fc3 = nn.Linear(256, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y) + y)
        h = torch.relu(self.fc1(y.flatten(1)))
        return self.fc2(h) + self.fc3(h)  # a rounded output (int8 add): one step is its scale


def _wide(*shape: int) -> torch.Tensor:
    return torch.randn(*shape) * 3 + torch.sign(torch.randn(*shape)) * 2


def _calibrate(model: nn.Module, batches: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for batch in batches:
            model(batch)


@pytest.mark.parametrize("reduce_range", [False, True])
def test_saved_on_this_cpu_and_loaded_under_the_cap_stays_within_a_step(tmp_path: Path, reduce_range: bool) -> None:
    """A model quantized and saved here (.pt2 and TorchScript) and loaded in a process whose oneDNN
    saturates: every runtime within one step of the reference graph; one warning on load naming
    reduce_range for 8-bit models, none for 7-bit ones; the report names the path, and the 7-bit
    model runs one oneDNN call per layer, the 8-bit one two."""
    torch.manual_seed(0)
    model = _Net().eval()
    batches = [_wide(4, 64, 4, 4) for _ in range(3)]
    # every op int8 (the add after fc2 and fc3 too: a rounded output)
    qconfig = {"": dataclasses.replace(gq.get_default_qconfig("x86", reduce_range=reduce_range), ops="all")}
    qmodel = gq.quantize_jit(copy.deepcopy(model), qconfig, _calibrate, [batches])
    reference = gq.quantize_jit(copy.deepcopy(model), qconfig, _calibrate, [batches], debug=True)
    x = _wide(4, 64, 4, 4)
    gq.save(qmodel, tmp_path / "model.pt2")
    torch.jit.save(gq.to_torchscript(qmodel), tmp_path / "model.ts")
    with torch.no_grad():
        torch.save({"x": x, "reference": reference(x), "here": qmodel(x)}, tmp_path / "io.pt")
    step = float(qmodel.graphquant_report.quantized[-1].scale or 0.0)
    assert step > 0
    result = _child(
        f"""
        import json, warnings, torch
        import graphquant as gq
        io = torch.load({str(tmp_path / "io.pt")!r})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = gq.load({str(tmp_path / "model.pt2")!r})
        scripted = torch.jit.load({str(tmp_path / "model.ts")!r})
        with torch.no_grad():
            outs = {{"pt2": loaded(io["x"]), "ts": scripted(io["x"])}}
            with torch.profiler.profile() as prof:
                loaded(io["x"])
        calls = sum(e.count for e in prof.key_averages() if e.key.startswith("onednn::q") and "prepack" not in e.key)
        steps = {{k: float((v - io["reference"]).abs().max()) / {step} for k, v in outs.items()}}
        print(json.dumps({{"steps": steps, "warnings": [str(w.message) for w in caught if "saturate" in str(w.message)],
                          "report": str(loaded.graphquant_report), "onednn_calls": calls}}))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert all(s <= 1.0 + 1e-4 for s in out["steps"].values()), out["steps"]
    if reduce_range:
        assert out["warnings"] == [] and "[7-bit]" in out["report"] and "[avx2-fp32]" not in out["report"]
        assert out["onednn_calls"] == 5  # one int8 call per conv and linear: the 7-bit grid stays on oneDNN
    else:
        assert out["onednn_calls"] == 0  # every conv and linear runs the float32 op over its integers
        assert len(out["warnings"]) == 1 and "reduce_range=True" in out["warnings"][0]
        assert "5 int8 layers with 8-bit activations" in out["warnings"][0]
        assert "[avx2-fp32]" in out["report"] and "[7-bit]" not in out["report"]


# ---------------------------------------------------------------------------------------------
# reduce_range: the quantize-time remedy


@pytest.mark.parametrize("observer", [MinMaxObserver, HistogramObserver])
def test_reduce_range_calibrates_onto_0_127(observer: type) -> None:
    x = torch.linspace(-1.0, 3.0, 1000)
    full, reduced = observer(), observer(reduce_range=True)
    full(x)
    reduced(x)
    q_full, q_reduced = full.qparams(), reduced.qparams()
    assert q_reduced.qmin == 0 and q_reduced.qmax == 127  # the grid ends at 127: no tail reaches the next layer
    assert abs(float(q_reduced.scale) / float(q_full.scale) - 255 / 127) < 0.02
    hi = reduced.search_range()[1] if isinstance(reduced, HistogramObserver) else 3.0  # the range it chose
    top = float(torch.tensor(hi) / q_reduced.scale + q_reduced.zero_point)
    assert 126.5 <= top <= 127.5  # the calibrated range spans 0..127 (its edge within half a step)


def test_reduce_range_is_for_uint8_activations_only() -> None:
    with pytest.raises(gq.GraphQuantError, match="reduce_range is for uint8 activations"):
        MinMaxObserver(torch.int8, symmetric=True, reduce_range=True)


def test_reduce_range_survives_the_qconfig_round_trip() -> None:
    qconfig = gq.get_default_qconfig("x86", reduce_range=True)
    again = gq.QConfig.from_dict(json.loads(json.dumps(qconfig.to_dict())))
    assert again == qconfig and again.activation.create().reduce_range
