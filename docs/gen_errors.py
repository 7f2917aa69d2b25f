"""Regenerate docs/errors.md: run each bad input and record the message graphquant raises.

    python docs/gen_errors.py            # rewrite docs/errors.md
    python docs/gen_errors.py --check    # exit 1 if docs/errors.md is out of date

The messages are the real ones, produced here, not copied from the source: when a message
changes, rerun this script. A case whose call no longer raises is listed as "(no error)".
"""

from __future__ import annotations

import argparse
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
from graphquant import capture, numerics, qconfig
from graphquant.kernels import onednn

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


class ScriptIf(nn.Module):
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


# (bad input, where it is raised, the call)
CASES: list[tuple[str, str, Callable[[], object]]] = [
    # capture
    ("a function instead of a module", "capture.check_capturable", lambda: gq.prepare(lambda x: x, QD)),
    ("batch-norm left in training mode", "capture.check_capturable", lambda: gq.prepare(Net(), QD, (X,))),
    ("data-dependent control flow", "capture.capture",
     lambda: gq.prepare(Branchy().eval(), {"": gq.default_qconfig}, (torch.randn(2, 4),))),
    ("a scripted `if` on a tensor in a quantized module", "capture.check_control_flow",
     lambda: gq.prepare(torch.jit.script(ScriptIf().eval()), QD, (torch.randn(2, 4),))),
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
]


def _message(call: Callable[[], object]) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
    except gq.GraphQuantError as error:
        text = str(error)
    except Exception as error:  # noqa: BLE001 - listed as what it is: not a GraphQuantError
        text = f"{type(error).__name__} (not a GraphQuantError): {error}"
    else:
        return "(no error)"
    lines = [line.strip() for line in text.replace(str(TMP), "<dir>").splitlines() if line.strip()]
    # torch's own message, quoted inside ours, can run to many lines: keep its first and our last
    shown = lines[0] if len(lines) == 1 else f"{lines[0]} [...] {lines[-1]}"
    return shown.replace("|", "\\|")


HEADER = """# Errors: bad inputs and what graphquant says

Every problem graphquant can name is a `graphquant.GraphQuantError` (a `RuntimeError`, so code
that caught PyTorch's quantization errors keeps working). Messages say what is wrong, where
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
