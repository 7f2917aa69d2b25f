"""End to end through the public verbs and the seed's *_jit names."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_batches, make_net, run_batches
from torch import nn

import graphquant as gq
from graphquant.quant_math import sqnr
from graphquant.testing import float_output_step

KERNELS = ("graphquant.qconv2d", "graphquant.qlinear")


def _kernel_calls(model: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in model.graph.nodes if str(n.target).startswith("graphquant.q")
            and "quantize" not in str(n.target)]


def test_static_end_to_end(net):  # type: ignore[no-untyped-def]
    """conv-bn-relu-conv-relu-flatten-linear-relu-linear: four int8 kernels, <= 1 step, >= 30 dB."""
    batches = calibration_batches()
    ref = gq.quantize_jit(net, {"": gq.default_qconfig}, run_batches, [batches], debug=True)
    q = gq.quantize_jit(net, {"": gq.default_qconfig}, run_batches, [batches])
    calls = _kernel_calls(q)
    assert sorted(calls) == sorted(["graphquant.qconv2d.default"] * 2 + ["graphquant.qlinear.default"] * 2)
    assert not any(n.target is torch.ops.aten.conv2d.default for n in q.graph.nodes)
    assert not any(n.target is torch.ops.aten.linear.default for n in q.graph.nodes)
    # uint8 flows between kernels: only the input quantize remains; the last linear, read by
    # nothing quantized, writes float32 itself (no output rounding, no dequantize)
    targets = [n.target for n in q.graph.nodes]
    assert targets.count(torch.ops.graphquant.quantize_per_tensor.default) == 1
    assert targets.count(torch.ops.graphquant.dequantize_per_tensor.default) == 0
    assert q.graphquant_report.quantized[-1].scale is None
    for batch in (1, 8):
        x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(100 + batch))
        with torch.no_grad():
            y, y_ref, y_q = net(x), ref(x), q(x)
        assert y_q.shape == (batch, 10) and y_q.dtype == torch.float32
        step = float_output_step(y_ref)  # the last linear writes float32: nothing rounds it
        assert float((y_ref - y_q).abs().max()) <= step
        assert sqnr(y, y_q) >= 30.0


def test_reference_graph_keeps_float_weights(net):  # type: ignore[no-untyped-def]
    ref = gq.quantize(net, {"": gq.default_qconfig}, run_batches, [calibration_batches()], debug=True)
    convs = [n for n in ref.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert len(convs) == 2
    for conv in convs:
        assert conv.args[1].target is torch.ops.graphquant.dequantize_per_channel.default
        assert conv.args[0].target is torch.ops.graphquant.dequantize_per_tensor.default
    float_weights = [b for name, b in ref.named_buffers() if b.dtype == torch.float32 and b.dim() == 4]
    assert float_weights, "reference graph must keep float conv weights"


def test_lazy_capture_and_batch_sizes(net):  # type: ignore[no-untyped-def]
    prepared = gq.prepare_jit(net, {"": gq.default_qconfig})
    assert prepared.graph_module is None
    run_batches(prepared, calibration_batches())
    assert prepared.graph_module is not None
    q = gq.convert_jit(prepared)
    assert q(torch.randn(8, 3, 16, 16)).shape == (8, 10)
    assert q(torch.randn(1, 3, 16, 16)).shape == (1, 10)


def test_example_inputs_capture_at_batch_one(net):  # type: ignore[no-untyped-def]
    prepared = gq.prepare(net, {"": gq.default_qconfig}, example_inputs=(torch.randn(1, 3, 16, 16),))
    gq.calibrate(prepared, calibration_batches())
    q = gq.convert(prepared)
    assert q(torch.randn(8, 3, 16, 16)).shape == (8, 10)


def test_inplace_false_never_changes_the_model(net):  # type: ignore[no-untyped-def]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    gq.quantize_jit(net, {"": gq.default_qconfig}, run_batches, [calibration_batches()])
    after = net.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert type(net).__name__ == "ConvBnReluNet"


def test_inplace_true_turns_the_model_into_the_quantized_graph():
    net = make_net()
    x = torch.randn(2, 3, 16, 16)
    expected = gq.quantize_jit(make_net(), {"": gq.default_qconfig}, run_batches, [calibration_batches()])(x)
    out = gq.quantize_jit(net, {"": gq.default_qconfig}, run_batches, [calibration_batches()], inplace=True)
    assert out is net
    assert isinstance(net, torch.fx.GraphModule)
    assert torch.equal(net(x), expected)


def test_quantizing_twice_is_bit_identical(net):  # type: ignore[no-untyped-def]
    x = torch.randn(3, 3, 16, 16)
    a = gq.quantize_jit(net, {"": gq.default_qconfig}, run_batches, [calibration_batches()])(x)
    b = gq.quantize_jit(net, {"": gq.default_qconfig}, run_batches, [calibration_batches()])(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("run_fn,run_args,needle", [
    (None, [[]], "needs calibration"),
    (run_batches, None, "run_args must be a list"),
])
def test_missing_calibration_is_a_clear_error(net, run_fn, run_args, needle):  # type: ignore[no-untyped-def]
    with pytest.raises(gq.GraphQuantError, match=needle):
        gq.quantize_jit(net, {"": gq.default_qconfig}, run_fn, run_args)


def test_convert_before_calibration_names_the_observers(net):  # type: ignore[no-untyped-def]
    with pytest.raises(gq.GraphQuantError, match="never called"):
        gq.convert_jit(gq.prepare_jit(net, {"": gq.default_qconfig}))
    prepared = gq.prepare(net, {"": gq.default_qconfig}, example_inputs=(torch.randn(1, 3, 16, 16),))
    with pytest.raises(gq.GraphQuantError, match=r"observers observer_0 \(output of x in <model>\); .* saw no data"):
        gq.convert(prepared)


def test_not_a_module():
    with pytest.raises(gq.GraphQuantError, match="expected a torch.nn.Module"):
        gq.quantize_jit(lambda x: x, {"": gq.default_qconfig}, run_batches, [[]])  # type: ignore[arg-type]


def test_training_mode_batch_norm_is_refused():
    net = make_net().train()
    with pytest.raises(gq.GraphQuantError, match=r"bn1 \(BatchNorm2d\) is in training mode.*model.eval\(\)"):
        gq.prepare_jit(net, {"": gq.default_qconfig})


def test_qconfig_none_keeps_a_submodule_float(net):  # type: ignore[no-untyped-def]
    q = gq.quantize_jit(net, {"": gq.default_qconfig, "fc2": None}, run_batches, [calibration_batches()])
    assert _kernel_calls(q).count("graphquant.qlinear.default") == 1
    assert sum(n.target is torch.ops.aten.linear.default for n in q.graph.nodes) == 1
    float_lines = [n for n in gq.report(q).float_nodes if n.module_path == "fc2"]
    assert float_lines and "qconfig_dict['fc2'] is None" in float_lines[0].reason
    x = torch.randn(4, 3, 16, 16)
    assert sqnr(net(x), q(x)) >= 30.0


def test_most_specific_key_wins():
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
            self.head = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.block(x))

    torch.manual_seed(0)
    model = Outer().eval()
    data = [torch.randn(4, 8) for _ in range(3)]
    q = gq.quantize_jit(model, {"": None, "block": gq.default_qconfig, "block.1": None}, run_batches, [data])
    rep = {n.module_path: n.quantized for n in gq.report(q).nodes if "linear" in n.op}
    assert rep == {"block.0": True, "block.1": False, "head": False}
    keys = {n.module_path: n.qconfig_key for n in gq.report(q).quantized}
    assert keys == {"block.0": "block"}


def test_unknown_qconfig_key_names_close_paths(net):  # type: ignore[no-untyped-def]
    with pytest.raises(gq.GraphQuantError, match=r"'fc3' matches no module.*'fc1'"):
        gq.prepare_jit(net, {"": gq.default_qconfig, "fc3": None})


@pytest.mark.parametrize("bad,needle", [
    ([("", None)], "qconfig_dict must be a dict"),
    ({"": "x86"}, r"qconfig_dict\[''\] is a str"),
])
def test_bad_qconfig_dict(net, bad, needle):  # type: ignore[no-untyped-def]
    with pytest.raises(gq.GraphQuantError, match=needle):
        gq.prepare_jit(net, bad)


def test_portable_backend_end_to_end(net):  # type: ignore[no-untyped-def]
    batches = calibration_batches()
    qconfig = gq.get_default_qconfig(reduce_range=False)  # one grid on both backends, whatever this CPU
    q1 = gq.quantize(net, {"": qconfig}, run_batches, [batches], backend="onednn")
    q2 = gq.quantize(net, {"": qconfig}, run_batches, [batches], backend="portable")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        y1, y2 = q1(x), q2(x)
    step = float(y1.max() - y1.min()) / 255  # the last linear writes float32: a uint8 step of its range
    assert float((y1 - y2).abs().max()) <= step


def test_calibration_keeps_no_autograd_graph(net):  # type: ignore[no-untyped-def]
    """A run_fn that keeps its outputs must not keep every batch's activations for a backward
    pass that never comes (7 GB on BERT-base before the prepared model ran under no_grad)."""
    prepared = gq.prepare(net, {"": gq.default_qconfig})
    kept = [prepared(b) for b in calibration_batches()]
    assert all(not out.requires_grad and out.grad_fn is None for out in kept)
    assert torch.is_grad_enabled()  # the caller's grad mode is left as it was


def test_quantized_model_records_no_autograd_graph_and_leaves_the_model_trainable():
    """The converted model is for inference: float parts left (here a LayerNorm) do not require
    grad, so a call outside no_grad records nothing; the user's model keeps its grads."""
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4)).train(False)
    x = torch.randn(3, 8)
    for quantized in (gq.quantize(model, {"": gq.default_qconfig, "1": None}, run_batches, [[x]], example_inputs=(x,)),
                      gq.quantize_dynamic(model, {"": gq.default_dynamic_qconfig}, example_inputs=(x,))):
        out = quantized(x)
        assert not out.requires_grad and out.grad_fn is None
        assert not any(p.requires_grad for p in quantized.parameters())
    assert all(p.requires_grad for p in model.parameters())
