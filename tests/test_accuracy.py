"""Quantization under an accuracy budget: layers back to float, most harmful first, bisected."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_batches, make_net, run_batches

import graphquant as gq


def _outlier_net():  # type: ignore[no-untyped-def]
    """make_net with fc1's first output channel 300x larger and fc2's matching input 300x smaller:
    the same float function (relu is positively homogeneous), but fc1's per-tensor output grid
    now spends itself on one channel and crushes the other 63."""
    net = make_net()
    with torch.no_grad():
        net.fc1.weight[0] *= 300
        net.fc1.bias[0] *= 300
        net.fc2.weight[:, 0] /= 300
    return net


HELD_OUT = calibration_batches(4, seed=5)


def neg_mse(model) -> float:  # type: ignore[no-untyped-def]
    """Higher is better: minus the mean squared error against the float model's outputs."""
    reference = make_net()
    with torch.no_grad():
        return -float(sum((model(x) - reference(x)).pow(2).mean() for x in HELD_OUT) / len(HELD_OUT))


# the default qconfig without SmoothQuant, which would smooth fc2's outlier input once fc1 is float
PLAIN = gq.QConfig()


def test_the_worst_layer_and_its_reader_go_back_to_float_in_few_steps():
    net = _outlier_net()
    full = gq.quantize(net, {"": PLAIN}, run_batches, [calibration_batches()])
    drop_all_int8 = -neg_mse(full)
    assert drop_all_int8 > 1e-4, drop_all_int8  # the outlier channel costs accuracy
    q, report = gq.quantize_with_accuracy_control(net, {"": PLAIN}, run_batches, [calibration_batches()],
                                                  neg_mse, max_drop=drop_all_int8 / 20)
    assert report.met and report.ranking[:2] == ("fc1", "fc2"), report
    assert report.keep_float == ("fc1", "fc2"), report
    chosen = next(step for step in report.steps if step.keep_float == report.keep_float)
    assert neg_mse(q) == chosen.metric and chosen.drop <= drop_all_int8 / 20
    assert all(step.drop > drop_all_int8 / 20 for step in report.steps if len(step.keep_float) < 2)
    # one full quantization, the most layers float, then a bisection over 4 layers: 2 more
    assert len(report.steps) <= 2 + 2, report
    assert report.steps[0].keep_float == () and abs(report.steps[0].drop - drop_all_int8) < 1e-9
    names = {n.module_path for n in gq.report(q).quantized if n.op in ("aten.conv2d.default", "aten.linear.default")}
    assert names == {"conv1", "conv2"}, names
    assert "met with 2 layers float" in str(report) and "kept float (most harmful first): fc1, fc2" in str(report)
    again, report2 = gq.quantize_with_accuracy_control(net, {"": PLAIN}, run_batches,
                                                       [calibration_batches()], neg_mse, max_drop=drop_all_int8 / 20)
    assert [s.keep_float for s in report2.steps] == [s.keep_float for s in report.steps]  # deterministic
    assert [s.metric for s in report2.steps] == [s.metric for s in report.steps]


def test_a_drop_already_met_costs_one_quantization():
    net = make_net()
    q, report = gq.quantize_with_accuracy_control(net, {"": gq.default_qconfig}, run_batches, [calibration_batches()],
                                                  neg_mse, max_drop=1.0)
    assert report.met and report.keep_float == () and len(report.steps) == 1 and report.ranking == ()


def test_an_unreachable_drop_returns_the_most_float_model_and_says_so():
    net = _outlier_net()
    q, report = gq.quantize_with_accuracy_control(net, {"": gq.default_qconfig}, run_batches, [calibration_batches()],
                                                  neg_mse, max_drop=0.0)
    assert not report.met and report.keep_float == report.ranking and "NOT met" in str(report)
    with pytest.raises(gq.GraphQuantError, match="max_drop must be a finite number >= 0"):
        gq.quantize_with_accuracy_control(net, {"": gq.default_qconfig}, run_batches, [calibration_batches()],
                                          neg_mse, max_drop=-1)
