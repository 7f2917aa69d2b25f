"""Every registered pattern through the harness, on both backends."""

from __future__ import annotations

import operator

import pytest
import torch

from graphquant.patterns import PATTERNS
from graphquant.qconfig import embedding_qconfig
from graphquant.testing import check_graph_mode_op

CASES = [
    pytest.param(pattern, i, id=f"{pattern.name}-{i}")
    for pattern in PATTERNS
    for i in range(len(pattern.examples()))
]


@pytest.mark.parametrize("backend", ["onednn", "portable"])
@pytest.mark.parametrize("pattern,index", CASES)
def test_pattern_kernel_matches_reference(pattern, index, backend):  # type: ignore[no-untyped-def]
    torch.manual_seed(index)
    module, inputs = pattern.examples()[index]
    dynamic = pattern.kind == "dynamic"
    qconfig = embedding_qconfig if pattern.kind == "weight_only" else None  # embeddings: the weight-only qconfig
    result = check_graph_mode_op(module, inputs, pattern.kernel, backend=backend, dynamic=dynamic, qconfig=qconfig)
    assert result.max_step_diff <= 1.0 + 1e-4
    assert result.sqnr >= 30.0, f"{pattern.name}: SQNR {result.sqnr:.1f} dB"
    if pattern.lower_kernel is None:
        # no kernel of its own: "kernel vs reference" would hold whatever lowering did to the op, so
        # hold the op itself: in the kernel graph it reads dequantized uint8 and is quantized onto
        # exactly the reference graph's grid; with no other kernel in the example, bit-identical
        ops = set(pattern.ops[0])  # the anchor (a chain such as batch_norm -> getitem ends in a view)
        kernel_form, reference_form = _reference_form(result.quantized, ops), _reference_form(result.reference, ops)
        assert kernel_form and kernel_form == reference_form, (pattern.name, kernel_form, reference_form)
        assert all(reads_dq and grid is not None for reads_dq, grid in kernel_form), (pattern.name, kernel_form)
        if not _other_kernels(result.quantized):
            assert result.max_step_diff == 0.0, (pattern.name, result.max_step_diff, result.quantized.code)


_QUANTIZE = torch.ops.graphquant.quantize_per_tensor.default
_DEQUANTIZE = {torch.ops.graphquant.dequantize_per_tensor.default, torch.ops.graphquant.dequantize_per_channel.default}


def _reference_form(graph: torch.fx.GraphModule, ops: set[object]) -> list[tuple[bool, tuple[object, ...] | None]]:
    """For each node running one of ``ops``: whether every activation input is a dequantize, and
    the grid (scale, zero point, range, dtype) of the quantize that reads its value."""
    form = []
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target not in ops:
            continue
        inputs = [a for a in node.all_input_nodes if a.op == "call_function"]  # weights are get_attr
        values = [u for u in node.users if u.target is operator.getitem] or [node]  # batch_norm's tuple
        grids = [tuple(u.args[1:]) for v in values for u in v.users if u.target is _QUANTIZE]
        form.append((bool(inputs) and all(a.target in _DEQUANTIZE for a in inputs), grids[0] if grids else None))
    return form


def _other_kernels(graph: torch.fx.GraphModule) -> bool:
    plain = {"quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel", "dequantize_per_channel"}
    return any(isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "graphquant"
               and n.target._opname not in plain for n in graph.graph.nodes)  # fmt: skip


def test_every_pattern_has_examples():
    for pattern in PATTERNS:
        assert pattern.examples(), pattern.name


def test_harness_reports_missing_kernel():
    module, inputs = next(p for p in PATTERNS if p.name == "linear").examples()[0]
    with pytest.raises(AssertionError, match="expected qconv2d in the kernel graph"):
        check_graph_mode_op(module, inputs, "qconv2d")


def test_harness_detects_a_wrong_kernel(monkeypatch):
    """A kernel that is off by two steps must fail the one-step check."""
    import graphquant.kernels.onednn as onednn

    real = onednn.qconv

    def off_by_two(*args):  # type: ignore[no-untyped-def]
        return (real(*args).to(torch.int16) + 2).clamp(0, 255).to(torch.uint8)

    monkeypatch.setattr(onednn, "qconv", off_by_two)
    module, inputs = next(p for p in PATTERNS if p.name == "conv2d").examples()[0]
    with pytest.raises(AssertionError, match="quantization steps"):
        check_graph_mode_op(module, inputs, "qconv2d", backend="onednn")


def test_the_reference_form_check_sees_a_changed_grid_and_a_float_input() -> None:
    """The check the kernel-less patterns get can fail: a kernel graph whose quantize after the op
    has another scale, or whose op reads a float value, no longer has the reference form."""
    pattern = next(p for p in PATTERNS if p.name == "layer_norm")
    module, inputs = pattern.examples()[0]
    result = check_graph_mode_op(module, inputs, pattern.kernel, backend="portable")
    ops = set(pattern.ops[0])
    assert _reference_form(result.quantized, ops) == _reference_form(result.reference, ops)
    anchor = next(n for n in result.quantized.graph.nodes if n.target in ops)
    quantize = next(u for u in anchor.users if u.target is _QUANTIZE)
    quantize.args = (quantize.args[0], quantize.args[1] * 2, *quantize.args[2:])
    assert _reference_form(result.quantized, ops) != _reference_form(result.reference, ops)
    dequantize = anchor.args[0]
    anchor.replace_input_with(dequantize, dequantize.args[0])  # the op on the uint8 tensor itself
    assert _reference_form(result.quantized, ops)[0][0] is False
