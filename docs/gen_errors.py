"""Regenerate docs/errors.md: run each bad input and record the message graphquant raises.

    python docs/gen_errors.py            # rewrite docs/errors.md
    python docs/gen_errors.py --check    # exit 1 if docs/errors.md is out of date

The messages are the real ones, produced here, not copied from the source: when a message
changes, rerun this script. A case whose call no longer raises is listed as "(no error)"; a
case that is meant to work (the numeric edge cases) returns what was checked, and a case that
warns instead of raising shows its warning.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from torch import nn

import graphquant as gq
from graphquant import capture, qconfig
from graphquant.tools import numerics
from graphquant.kernels import onednn, portable
from graphquant.qconfig import ObserverSpec, QConfig
from graphquant.quant_math import sqnr

OUT = Path(__file__).resolve().parent / "errors.md"
TMP = Path(tempfile.mkdtemp(prefix="graphquant-errors-"))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


class Branchy(nn.Module):
    """A Python ``if`` on a tensor value: export cannot pick a branch for every input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


X = torch.randn(2, 3, 8, 8)
QD = {"": gq.default_qconfig}


def net() -> Net:
    return Net().eval()


def _prepared_never_called() -> gq.PreparedModel:
    return gq.prepare(net(), QD)


def _calibrated() -> gq.PreparedModel:
    prepared = gq.prepare(net(), QD, (X,))
    gq.calibrate(prepared, [X])
    return prepared


def _program_file(quantized: bool) -> str:
    path = TMP / ("quantized.pt2" if quantized else "float.pt2")
    if quantized:
        prepared = gq.prepare(net(), QD, (X,))
        gq.calibrate(prepared, [X])
        gq.save(gq.convert(prepared, inplace=True), str(path))
    else:
        torch.export.save(torch.export.export(net(), (X,)), str(path))
    return str(path)


def _no_onednn() -> object:
    prepared = _calibrated()
    with mock.patch.object(onednn, "available", return_value=False):
        return gq.convert(prepared, backend="onednn")


def _index_outside_table() -> object:
    table = nn.Sequential(nn.Embedding(10, 8)).eval()
    qmodel = gq.quantize_dynamic(table, {"": gq.embedding_qconfig}, (torch.tensor([[1, 2]]),))
    return qmodel(torch.tensor([[3, 10]]))


def _observers_saw_nothing() -> object:
    prepared = gq.prepare(net(), QD, (X,))
    gq.calibrate(prepared, [])
    return gq.convert(prepared)


@functools.cache
def _quantized(kind: str) -> nn.Module:
    """A quantized ``Net`` (static, kernels), ``Mlp`` (dynamic) or ``Net`` saved and loaded."""
    if kind == "dynamic":
        return gq.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)).eval(), example_inputs=(torch.randn(2, 4),))
    quantized = gq.convert(_calibrated())
    if kind == "loaded":
        gq.save(quantized, str(TMP / "net.pt2"))
        return gq.load(str(TMP / "net.pt2"))
    if kind == "torchscript":
        torch.jit.save(gq.to_torchscript(quantized), str(TMP / "net.ts"))
        return torch.jit.load(str(TMP / "net.ts"))
    return quantized


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * mask


def _two_batches() -> object:
    model = gq.quantize_dynamic(TwoInputs().eval(), example_inputs=(torch.randn(2, 4), torch.ones(2, 4)))
    return model(torch.randn(3, 4), torch.ones(2, 4))


class FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(2, -1))


def _fixed_batch() -> object:
    model = gq.quantize_dynamic(FixedBatch().eval(), example_inputs=(torch.randn(2, 8),))
    return model(torch.randn(3, 8))


def _nan_calibration() -> object:
    prepared = gq.prepare(net(), QD, (X,))
    bad = X.clone()
    bad[0, 0, 0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is what this case shows
        gq.calibrate(prepared, [bad])
    return prepared


class ConvFc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _edge_case(change: str, qconfig: QConfig | None = None) -> str:
    """Quantize ``ConvFc`` with one numeric edge case on both backends; what was checked."""
    torch.manual_seed(0)
    model = ConvFc().eval()
    data = [torch.randn(2, 3, 8, 8)]
    with torch.no_grad():
        if change == "constant":
            data = [torch.zeros(2, 3, 8, 8)]
        elif change == "zero channel":
            model.conv.weight[1] = 0.0
        elif change == "1e30":
            model.conv.weight.mul_(1e30)
            model.fc.weight.mul_(1e-30)
        elif change == "bias":
            model.conv.weight.mul_(1e-4)
            model.conv.bias.fill_(3.0)
            data = [data[0] * 1e-3]
    results = []
    for backend in ("onednn", "portable"):
        prepared = gq.prepare(model, {"": qconfig or QConfig(activation=ObserverSpec("minmax"))}, (data[0],))
        gq.calibrate(prepared, data)
        kernel, reference = gq.convert(prepared, backend=backend), gq.convert(prepared, debug=True, backend=backend)
        x = data[0]
        step = [n.scale for n in gq.report(kernel).quantized if n.scale is not None][-1]
        y = kernel(x)
        if not bool(torch.isfinite(y).all()):
            return f"{backend}: non-finite output"
        steps = float((y - reference(x)).abs().max()) / step
        results.append(f"{backend} {steps:.0f} step(s) from the reference, SQNR {sqnr(model(x), y):.0f} dB")
    return "no error: " + "; ".join(results)


def _layouts() -> str:
    results = []
    for backend in ("onednn", "portable"):
        quantized = gq.convert(_calibrated(), backend=backend)
        x = torch.randn(2, 3, 8, 16)[..., ::2]
        same = all(torch.equal(quantized(v), quantized(x.contiguous()))
                   for v in (x, x.contiguous(memory_format=torch.channels_last)))
        results.append(f"{backend} {'bit-identical to' if same else 'DIFFERS from'} the contiguous input")
    return "no error: " + "; ".join(results)


def _one_wide_dilated() -> str:
    w, w_scale = torch.randint(-127, 128, (2, 2, 2, 1), dtype=torch.int8), torch.full((2,), 0.01)
    args = ([1, 2], [1, 1], [1, 2], 1)
    x = torch.randint(0, 256, (2, 2, 6, 1), dtype=torch.uint8)
    a = onednn.qconv(x, 0.1, 10, onednn.pack_conv(w, w_scale, 0.1, 10, *args), w_scale, None, *args, 0.5, 2, "none")
    b = portable.qconv(x, 0.1, 10, w, w_scale, None, *args, 0.5, 2, "none")
    return f"no error: oneDNN {int((a.int() - b.int()).abs().max())} step(s) from the portable kernel"


_W8 = torch.randint(-127, 128, (4, 8), dtype=torch.int8)
_U8 = torch.randint(0, 256, (2, 8), dtype=torch.uint8)


# (bad input, where it is raised, the call)
CASES: list[tuple[str, str, Callable[[], object]]] = [
    # capture
    ("a function instead of a module", "capture.check_capturable", lambda: gq.prepare(lambda x: x, QD)),
    ("batch-norm left in training mode", "capture.check_capturable", lambda: gq.prepare(Net(), QD, (X,))),
    ("data-dependent control flow, with partial=False", "capture.capture",
     lambda: gq.prepare(Branchy().eval(), {"": gq.default_qconfig}, (torch.randn(2, 4),), partial=False)),
    ("partial=\"yes\"", "api.PreparedModel",
     lambda: gq.prepare(Branchy().eval(), {"": gq.default_qconfig}, (torch.randn(2, 4),), partial="yes")),
    ("a scripted `if` on a tensor in a quantized module", "capture.check_control_flow",
     lambda: gq.prepare(torch.jit.script(Branchy().eval()), QD, (torch.randn(2, 4),))),
    ("a .pt2 path that does not exist", "capture.load_program", lambda: gq.prepare(str(TMP / "missing.pt2"), QD)),
    ("a .pt2 file written by graphquant.save, to quantize again", "capture.load_program",
     lambda: gq.prepare(_program_file(quantized=True), QD)),
    # qconfig
    ("qconfig_dict is not a dict", "qconfig.check_qconfig_dict", lambda: gq.prepare(net(), gq.default_qconfig)),  # type: ignore[arg-type]
    ("a qconfig_dict key that is not a string", "qconfig.check_qconfig_dict", lambda: gq.prepare(net(), {0: None})),  # type: ignore[dict-item]
    ("a qconfig_dict key naming no module (typo)", "qconfig.check_qconfig_dict",
     lambda: gq.prepare(net(), {"": gq.default_qconfig, "fc2": None})),
    ("a torch.ao QConfig as a value", "qconfig.check_qconfig_dict",
     lambda: gq.prepare(net(), {"": torch.ao.quantization.get_default_qconfig("x86")})),  # type: ignore[dict-item]
    ("an unknown observer name", "qconfig.ObserverSpec", lambda: gq.ObserverSpec("minmaxx")),
    ("an observer dtype other than uint8 / int8", "qconfig.ObserverSpec",
     lambda: gq.ObserverSpec("minmax", torch.int32)),
    ("a per-channel observer without an axis", "qconfig.ObserverSpec", lambda: gq.ObserverSpec("per_channel_minmax")),
    ("asymmetric int8 weights", "qconfig.QConfig",
     lambda: gq.QConfig(weight=gq.ObserverSpec("minmax", torch.int8, symmetric=False))),
    ("int8 activations for static quantization", "qconfig.QConfig",
     lambda: gq.QConfig(activation=gq.ObserverSpec("minmax", torch.int8, symmetric=True))),
    ("float16 weights for static quantization", "qconfig.QConfig",
     lambda: gq.QConfig(weight=gq.ObserverSpec("minmax", torch.float16, symmetric=True))),
    ("a QConfig dict of another version", "qconfig.QConfig.from_dict",
     lambda: gq.QConfig.from_dict({**gq.default_qconfig.to_dict(), "version": 0})),
    ("an unknown backend for the default qconfig", "qconfig.get_default_qconfig",
     lambda: gq.get_default_qconfig("arm")),
    ("per-row float qparams (embedding tables) with an observed activation", "qconfig.QConfig",
     lambda: gq.QConfig(weight=gq.ObserverSpec("per_channel_float_qparams", torch.uint8, axis=0))),
    # embeddings
    ("a 4-bit embedding table with an odd embedding_dim", "patterns.context",
     lambda: gq.quantize_dynamic(nn.Sequential(nn.Embedding(10, 7)).eval(), {"": gq.embedding_4bit_qconfig},
                                 (torch.tensor([[1, 2]]),))),
    ("an index outside a quantized embedding table", "kernels.embedding", _index_outside_table),
    # api
    ("example_inputs that are not a tuple", "api.prepare", lambda: gq.prepare(net(), QD, example_inputs=3)),  # type: ignore[arg-type]
    ("a dynamic qconfig given to prepare / quantize", "api.prepare",
     lambda: gq.prepare(net(), {"": gq.default_dynamic_qconfig}, (X,))),
    ("a static qconfig given to quantize_dynamic", "api.prepare_dynamic",
     lambda: gq.quantize_dynamic(net(), {"": gq.default_qconfig}, (X,))),
    ("inplace=True on a TorchScript module", "api.prepare",
     lambda: gq.prepare(torch.jit.script(net()), QD, inplace=True)),
    ("calibrate on a plain module", "api.calibrate", lambda: gq.calibrate(net(), [X])),  # type: ignore[arg-type]
    ("convert on a plain module", "api.convert", lambda: gq.convert(net())),  # type: ignore[arg-type]
    ("convert before any calibration call", "api.convert", lambda: gq.convert(_prepared_never_called())),
    ("calibration with no batches", "passes.lower", _observers_saw_nothing),
    ("an unknown backend", "api.convert", lambda: gq.convert(_calibrated(), backend="fbgemm")),
    ("backend='onednn' where PyTorch has no oneDNN int8 ops", "api.convert", _no_onednn),
    ("quantize without run_fn", "api.quantize", lambda: gq.quantize(net(), QD, None, [[X]])),  # type: ignore[arg-type]
    ("run_args that are not a list or tuple", "api.quantize", lambda: gq.quantize(net(), QD, gq.calibrate, X)),  # type: ignore[arg-type]
    ("report of a model graphquant did not convert", "api.report", lambda: gq.report(net())),
    # numerics
    ("numerics.compare, static, without calibration data", "numerics.compare",
     lambda: numerics.compare(net(), None, None, [X])),
    ("numerics.compare given one tensor instead of a list of batches", "numerics.compare",
     lambda: numerics.compare(net(), None, X, None)),
    # calibration data
    ("calibration data with NaN or Inf (skipped, with a warning)", "observers.Observer", _nan_calibration),
    ("a float64 example input", "inputs.specs_from_examples",
     lambda: gq.prepare(net(), QD, (X.double(),))),
    ("a half example input", "inputs.specs_from_examples", lambda: gq.prepare(net(), QD, (X.half(),))),
    ("an example batch of size 0", "inputs.specs_from_examples", lambda: gq.prepare(net(), QD, (X[:0],))),
    # inference inputs (every converted, prepared, loaded or lazily captured model checks them)
    ("an inference input of another rank", "inputs.InputCheck", lambda: _quantized("static")(X[0])),
    ("an inference input with another channel count", "inputs.InputCheck",
     lambda: _quantized("static")(torch.randn(2, 4, 8, 8))),
    ("an inference input of another spatial size", "inputs.InputCheck",
     lambda: _quantized("static")(torch.randn(2, 3, 9, 8))),
    ("a float64 inference input", "inputs.InputCheck", lambda: _quantized("static")(X.double())),
    ("a half inference input", "inputs.InputCheck", lambda: _quantized("static")(X.half())),
    ("an inference batch of size 0", "inputs.InputCheck", lambda: _quantized("static")(X[:0])),
    ("an inference input on another device", "inputs.InputCheck",
     lambda: _quantized("static")(torch.empty(2, 3, 8, 8, device="meta"))),
    ("a list instead of a tensor", "inputs.InputCheck", lambda: _quantized("static")(X.tolist())),
    ("inputs with different batch sizes", "inputs.InputCheck", _two_batches),
    ("another batch size where the model fixes it (x.reshape(2, -1))", "inputs.InputCheck", _fixed_batch),
    ("a float64 input to a dynamic model", "inputs.InputCheck",
     lambda: _quantized("dynamic")(torch.randn(2, 4).double())),
    ("a bad input to a model from graphquant.load", "inputs.InputCheck", lambda: _quantized("loaded")(X[0])),
    ("a bad input to a to_torchscript module (no graphquant needed)", "kernels.scripted.check_input",
     lambda: _quantized("torchscript")(X.double())),
    # kernels (each checks its arguments before oneDNN or torch sees them)
    ("an unpacked weight given to oneDNN qlinear (was SIGSEGV)", "kernels.onednn.qlinear",
     lambda: onednn.qlinear(_U8, 0.1, 0, _W8, torch.ones(4), None, 0.1, 0, "none")),
    ("stride 0 when packing a conv weight (was SIGFPE)", "kernels.onednn.pack_conv",
     lambda: onednn.pack_conv(_W8.reshape(4, 2, 2, 2), torch.ones(4), 0.1, 0, [0, 1], [0, 0], [1, 1], 1)),
    ("a 1-wide kernel with dilation 2, padding 1 and stride 2 (was SIGSEGV in oneDNN)", "kernels.onednn",
     _one_wide_dilated),
    ("a NaN weight scale when packing", "kernels.onednn.pack_conv",
     lambda: onednn.pack_conv(_W8.reshape(4, 2, 2, 2), torch.tensor([1.0, float("nan"), 1.0, 1.0]), 0.1, 0,
                              [1, 1], [0, 0], [1, 1], 1)),
    ("a NaN weight scale given to a oneDNN linear", "kernels.onednn.check_scale_values",
     lambda: onednn.qlinear(_U8, 0.1, 0, onednn.pack_linear(_W8), torch.tensor([1.0, float("nan"), 1.0, 1.0]), None,
                            0.1, 0, "none")),
    ("a float64 weight scale given to a portable kernel", "kernels.portable.check_inputs",
     lambda: portable.qlinear(_U8, 0.1, 0, _W8, torch.ones(4, dtype=torch.float64), None, 0.1, 0, "none")),
    ("an option other than reduce_range for dynamic activations", "qconfig.ObserverSpec",
     lambda: gq.ObserverSpec("dynamic", options=(("bits", 7),))),
    ("a dynamic quantize onto a grid other than 255 or 127", "quant_math.quantize_dynamic_tensor",
     lambda: torch.ops.graphquant.quantize_dynamic(X, False, 100)),
    ("time_kernels on a float model", "kernel_timing.time_kernels", lambda: gq.time_kernels(net(), (X,))),
    ("a zero activation scale", "kernels.portable.check_qparams",
     lambda: portable.qlinear(_U8, 0.0, 0, _W8, torch.ones(4), None, 0.1, 0, "none")),
    ("a zero point of 300 for uint8", "kernels.portable.check_qparams",
     lambda: portable.qlinear(_U8, 0.1, 300, _W8, torch.ones(4), None, 0.1, 0, "none")),
    ("a float activation given to an int8 kernel", "kernels.portable.check_inputs",
     lambda: portable.qlinear(_U8.float(), 0.1, 0, _W8, torch.ones(4), None, 0.1, 0, "none")),
    ("a quantize with a NaN scale", "kernels.quantize.quantize_per_tensor",
     lambda: torch.ops.graphquant.quantize_per_tensor(X, float("nan"), 0, 0, 255, torch.uint8)),
    # numeric edge cases: meant to work; the table shows what was checked
    ("a constant (all-zero) activation", "quant_math.choose_qparams", lambda: _edge_case("constant")),
    ("an all-zero weight output channel, per channel", "quant_math.choose_qparams",
     lambda: _edge_case("zero channel")),
    ("an all-zero weight output channel, per tensor", "quant_math.choose_qparams",
     lambda: _edge_case("zero channel", QConfig(activation=ObserverSpec("minmax"),
                                                weight=ObserverSpec("minmax", torch.int8, symmetric=True)))),
    ("weights of 1e30 feeding weights of 1e-30", "quant_math.choose_qparams", lambda: _edge_case("1e30")),
    ("a bias beyond int32 at scale x_scale * w_scale", "kernels", lambda: _edge_case("bias")),
    ("non-contiguous and channels-last inputs", "kernels", _layouts),
]


def _message(call: Callable[[], object]) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = call()
    except gq.GraphQuantError as error:
        text = str(error)
    except UserWarning as warning:  # a case that warns, turned into an error to be shown
        text = f"(warning) {warning}"
    except torch.jit.Error as error:  # TorchScript raises its own type, with our words inside
        text = f"torch.jit.Error: {error}"
    except Exception as error:  # noqa: BLE001 - listed as what it is: not a GraphQuantError
        text = f"{type(error).__name__} (not a GraphQuantError): {error}"
    else:
        return result if isinstance(result, str) else "(no error)"
    lines = [line.strip() for line in text.replace(str(TMP), "<dir>").splitlines() if line.strip()]
    # torch's own message, quoted inside ours, can run to many lines: keep its first and our last
    shown = lines[0] if len(lines) == 1 else f"{lines[0]} [...] {lines[-1]}"
    return shown.replace("|", "\\|")


HEADER = """# Errors: bad inputs and what graphquant says

Every problem graphquant can name is a `graphquant.GraphQuantError` (a `RuntimeError`, so code
that caught PyTorch's quantization errors keeps working, and a `ValueError`, as the kernels'
argument checks were). Messages say what is wrong, where
(module path, node) and the way out. This table is generated by `python docs/gen_errors.py`,
which runs each bad input; the messages are the real ones (paths shortened to `<dir>`).

| bad input | raised in | message |
| --- | --- | --- |
"""

CLI = """
## Command line

`graphquant` prints the same messages on stderr and exits with:

| code | meaning |
| --- | --- |
| 0 | done |
| 1 | a check failed: `check` found the kernel missing or more than one step from the reference (or `--min-sqnr` not met); `compare` found a kernel more than one step from its reference (a lowering bug) |
| 2 | usage error: bad arguments, an unreadable or invalid `--qconfig` file, a `--skip` / `--qconfig` key that is not a module path of the model, a qconfig whose kind does not match `--mode` |
| 3 | the model or the data could not be loaded (bad `module:name` spec, missing file, not TorchScript, empty data) or the model could not be captured or run on the data |
| 4 | graphquant failed on a model it loaded (conversion, or saving with `--out`) |
"""


def render() -> str:
    rows = [f"| {bad} | `{where}` | {_message(call)} |" for bad, where, call in CASES]
    return HEADER + "\n".join(rows) + "\n" + CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    try:
        text = render()
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
    if args.check:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run python docs/gen_errors.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(CASES)} cases)")
    return 0


_ = (capture, qconfig)  # the rooms the table covers

if __name__ == "__main__":
    raise SystemExit(main())
