"""The ``graphquant`` command line: each verb run as a subprocess on tests/cli_models.py, and
the exit codes of bad input (in process, which is quicker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_models import calibration, make_model

import graphquant
from graphquant import cli

TESTS = Path(__file__).resolve().parent
MODEL = "cli_models:make_model"
DATA = "cli_models:calibration"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "graphquant", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or TESTS.parent, timeout=300)


def test_quantize(tmp_path: Path) -> None:
    qconfig = tmp_path / "qconfig.json"
    qconfig.write_text(json.dumps({"": graphquant.get_default_qconfig("x86").to_dict(), "conv2": "portable"}))
    done = run_cli("quantize", MODEL, "--data", DATA, "--qconfig", str(qconfig), "--skip", "fc")
    assert done.returncode == cli.EXIT_OK, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("graphquant conversion (kernel,")
    assert any(line.split()[:3] == ["int8", "conv2", "aten.conv2d.default"] for line in lines)
    assert any(line.split()[:2] == ["float", "fc"] and "qconfig_dict['fc'] is None" in line for line in lines)
    sqnr = float(lines[-1].split(":")[1].split()[0])
    assert sqnr > 25.0
    assert "calibrating" in done.stderr  # the progress bar


def test_check(capsys: pytest.CaptureFixture[str]) -> None:
    done = run_cli("check", MODEL, "--data", DATA, "--op", "qconv2d", "-q")
    assert done.returncode == cli.EXIT_OK, done.stderr
    assert "qconv2d" in done.stdout and "qlinear" in done.stdout
    assert done.stdout.rstrip().endswith("PASS")
    # a failing check, in process (quicker): exit code 1 and what failed
    assert cli.main(["check", MODEL, "--data", DATA, "--op", "qconv3d", "-q"]) == cli.EXIT_CHECK_FAILED
    assert "FAIL: kernel qconv3d is not in the int8 graph" in capsys.readouterr().out


def test_compare(tmp_path: Path) -> None:
    html, suggestion = tmp_path / "numerics.html", tmp_path / "keep.json"
    done = run_cli("compare", MODEL, "--data", DATA, "--inputs", "cli_models:held_out", "--eval",
                   "cli_models:agreement", "--report", str(html), "--suggest-out", str(suggestion))
    assert done.returncode == cli.EXIT_OK, done.stderr
    out = done.stdout
    assert out.startswith("graphquant numerics (static,") and "SQNR against float" in out.splitlines()[0]
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "node"])
    table = [line.split() for line in lines[start:start + 5]]
    assert table[0][:3] == ["rank", "node", "module"]
    assert sorted(row[2] for row in table[1:]) == ["<model>", "conv1", "conv2", "fc"]
    assert "accuracy: float 1" in out
    assert html.read_text().count("<tr") == 5
    assert "" in json.loads(suggestion.read_text())
    assert "comparing" in done.stderr
    # the suggestion is a --qconfig file
    assert cli.main(["quantize", MODEL, "--data", DATA, "--qconfig", str(suggestion), "-q"]) == cli.EXIT_OK


def test_explain(tmp_path: Path) -> None:
    qconfig = tmp_path / "qconfig.json"
    qconfig.write_text(json.dumps({"": "x86", "fc": None, "unused": "portable"}))
    done = run_cli("explain", MODEL, "--data", DATA, "--qconfig", str(qconfig))
    assert done.returncode == cli.EXIT_OK, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:] if line and not line.startswith("keys")}
    assert rows["conv2d"].split()[2:5] == ["conv1", "''", "static"] and "conv2d_relu -> qconv2d" in rows["conv2d"]
    assert rows["linear"].split()[2:5] == ["fc", "'fc'", "None"] and "qconfig_dict['fc'] is None" in rows["linear"]
    assert "keys that matched nothing: 'unused'" in done.stdout


def test_bench() -> None:
    done = run_cli("bench", MODEL, "--data", DATA, "--iters", "3", "--warmup", "1", "-q")
    assert done.returncode == cli.EXIT_OK, done.stderr
    latency = next(line for line in done.stdout.splitlines() if line.startswith("latency ms")).split()
    size = next(line for line in done.stdout.splitlines() if line.startswith("size MB")).split()
    assert float(latency[2]) > 0 and float(latency[3]) > 0 and "speedup" in latency
    assert float(size[2]) > 3 * float(size[3])  # int8 weights


def test_help_shows_examples_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "graphquant compare" in text and "exit codes:" in text
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compare", "--help"])
    assert "--report" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["frobnicate"])
    assert exit_.value.code == cli.EXIT_USAGE
    assert cli.main(["quantize", MODEL, "--data", DATA, "--skip", "fc2", "-q"]) == cli.EXIT_USAGE
    assert "did you mean 'fc'" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"": "fbgemm-ish"}))
    assert cli.main(["quantize", MODEL, "--data", DATA, "--qconfig", str(bad), "-q"]) == cli.EXIT_USAGE
    assert "unknown preset 'fbgemm-ish'" in capsys.readouterr().err
    dyn = tmp_path / "dyn.json"
    dyn.write_text(json.dumps({"": "dynamic"}))
    assert cli.main(["explain", MODEL, "--data", DATA, "--qconfig", str(dyn), "-q"]) == cli.EXIT_USAGE
    assert "pass --mode dynamic" in capsys.readouterr().err


def test_load_errors_exit_3(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["quantize", "cli_models:nope", "--data", DATA]) == cli.EXIT_LOAD
    assert "has no attribute 'nope'" in capsys.readouterr().err
    assert cli.main(["quantize", "cli_models:not_a_model", "--data", DATA]) == cli.EXIT_LOAD
    assert "not a torch.nn.Module" in capsys.readouterr().err
    assert cli.main(["quantize", MODEL, "--data", "no_such_module:data"]) == cli.EXIT_LOAD
    assert "cannot import 'no_such_module'" in capsys.readouterr().err
    tensors = tmp_path / "calib.pt"
    torch.save(calibration(), tensors)
    assert cli.main(["quantize", str(tensors), "--data", str(tensors)]) == cli.EXIT_LOAD
    assert "as a TorchScript model" in capsys.readouterr().err
    empty = tmp_path / "empty.pt"
    torch.save([], empty)
    assert cli.main(["quantize", MODEL, "--data", str(empty)]) == cli.EXIT_LOAD
    assert "holds no batches" in capsys.readouterr().err


def test_torchscript_and_pt2_inputs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A TorchScript file and a float .pt2 program quantize like the module they came from."""
    model, data = make_model(), tmp_path / "calib.pt"
    torch.save(calibration(), data)
    scripted = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(model), str(scripted))
    assert cli.main(["quantize", str(scripted), "--data", str(data), "-q"]) == cli.EXIT_OK
    assert "int8   conv1" in capsys.readouterr().out
    program = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (calibration()[0],)), str(program))
    code = cli.main(["quantize", str(program), "--data", str(data), "--skip", "fc", "-q"])
    out = capsys.readouterr()
    assert code == cli.EXIT_OK, out.err
    assert "int8   conv2" in out.out and "qconfig_dict['fc'] is None" in out.out


def test_out_saves_or_says_why(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "q.pt2"
    code = cli.main(["quantize", MODEL, "--data", DATA, "--out", str(target), "-q"])
    out = capsys.readouterr()
    assert code == cli.EXIT_OK, out.err
    assert f"wrote {target}" in out.out
    loaded = graphquant.load(str(target))
    x = calibration()[0]
    assert loaded(x).shape == make_model()(x).shape


def test_out_into_a_missing_directory_is_refused_before_the_work(capsys: pytest.CaptureFixture[str],
                                                                 tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "q.pt2"
    code = cli.main(["quantize", MODEL, "--data", DATA, "--out", str(target), "-q"])
    out = capsys.readouterr()
    assert code != cli.EXIT_OK and not target.exists()
    assert f"directory {target.parent} does not exist" in out.err and "os.makedirs" in out.err
    assert "int8" not in out.out  # refused before quantizing


def test_reduce_range_presets_give_7bit_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The 7-bit presets for x86 CPUs without VNNI: every GEMM / conv reads a 7-bit activation
    (the manifest's x86 record counts them), static and dynamic."""
    from graphquant.deploy.program import manifest

    for mode, preset, layers in (("static", "x86_reduce_range", 3), ("dynamic", "per_token_dynamic_reduce_range", 1),
                                 ("dynamic", "dynamic_reduce_range", 1)):
        qconfig = tmp_path / f"{preset}.json"
        qconfig.write_text(json.dumps({"": preset}))
        out = tmp_path / f"{preset}.pt2"
        assert cli.main(["quantize", MODEL, "--data", DATA, "--mode", mode, "--qconfig", str(qconfig), "--out",
                         str(out), "-q"]) == cli.EXIT_OK
        record = manifest(graphquant.load(out))["x86"]
        assert record["layers_7bit"] == layers and record["layers_8bit"] == 0, (preset, record)
    capsys.readouterr()


def test_tune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A drop already met costs one quantization; max-drop 0 needs every layer float; a spent time
    budget exits 1 and says so."""
    out = tmp_path / "tuned.pt2"
    assert cli.main(["tune", MODEL, "--data", DATA, "--eval", "cli_models:agreement", "--max-drop", "0.5",
                     "--out", str(out), "-q"]) == cli.EXIT_OK
    printed = capsys.readouterr().out
    assert "max drop 0.5: met with 0 layers float, 1 quantizations" in printed and out.exists(), printed
    # every layer float meets max-drop 0; a budget spent after the first quantization does not
    assert cli.main(["tune", MODEL, "--data", DATA, "--eval", "cli_models:worst_for_int8", "--max-drop", "0",
                     "-q"]) == cli.EXIT_OK
    assert "met with 3 layers float" in capsys.readouterr().out
    assert cli.main(["tune", MODEL, "--data", DATA, "--eval", "cli_models:worst_for_int8", "--max-drop", "0",
                     "--budget", "0", "-q"]) == cli.EXIT_CHECK_FAILED
    assert "NOT met (time budget spent) with 0 layers float, 1 quantizations" in capsys.readouterr().out
