"""QConfig: checks itself, round-trips, resolves by module path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphquant as gq
from graphquant import GraphQuantError, ObserverSpec, QConfig, get_default_qconfig
from graphquant.observers import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver
from graphquant.qconfig import resolve


def test_presets():
    x86 = get_default_qconfig("x86")
    assert isinstance(x86.activation.create(), HistogramObserver)
    weight = x86.weight.create()
    assert isinstance(weight, PerChannelMinMaxObserver) and weight.symmetric and weight.dtype == torch.int8
    assert isinstance(get_default_qconfig("portable").activation.create(), MinMaxObserver)
    with pytest.raises(GraphQuantError, match="unknown backend 'arm'"):
        get_default_qconfig("arm")


def test_round_trip_through_dict():
    qc = QConfig(ObserverSpec("moving_average_minmax", options=(("averaging_constant", 0.1),)))
    d = qc.to_dict()
    assert d["version"] == 1
    assert QConfig.from_dict(d) == qc


@pytest.mark.parametrize("kwargs,needle", [
    (dict(observer="kl"), "unknown observer 'kl'"),
    (dict(observer="per_channel_minmax"), "needs axis"),
    (dict(observer="minmax", axis=0), "takes no axis"),
])
def test_observer_spec_checks_itself(kwargs, needle):  # type: ignore[no-untyped-def]
    with pytest.raises(GraphQuantError, match=needle):
        ObserverSpec(**kwargs)


def test_asymmetric_int8_weights_refused():
    with pytest.raises(GraphQuantError, match="int8 weights must be symmetric"):
        QConfig(weight=ObserverSpec("per_channel_minmax", torch.int8, symmetric=False, axis=0))


def test_resolution_most_specific_wins():
    a, b = get_default_qconfig("x86"), get_default_qconfig("portable")
    table = {"": a, "encoder": b, "encoder.layer.1": None}
    assert resolve(table, "head").qconfig is a
    assert resolve(table, "encoder.layer.0.attn").qconfig is b
    assert resolve(table, "encoder.layer.0.attn").key == "encoder"
    r = resolve(table, "encoder.layer.1.ffn")
    assert r.qconfig is None and r.key == "encoder.layer.1"
    assert resolve({"encoder": a}, "decoder").qconfig is None


def test_qconfig_dict_by_type_spells_out_paths():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Linear(2, 2), nn.Conv1d(1, 1, 1)))
    qc = gq.default_qconfig
    assert gq.qconfig_dict_by_type(model, {nn.Linear: qc}) == {"": None, "0": qc, "2.0": qc}
    assert gq.qconfig_dict_by_type(model, {nn.Linear: qc}, default=qc, keep_float=["2.0"]) == {"": qc, "0": qc, "2.0": None}
    with pytest.raises(gq.GraphQuantError, match=r"keep_float path '2\.5' matches no module.*did you mean"):
        gq.qconfig_dict_by_type(model, {nn.Linear: qc}, keep_float=["2.5"])
