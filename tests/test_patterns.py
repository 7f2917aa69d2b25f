"""Every registered pattern through the harness, on both backends."""

from __future__ import annotations

import operator

import pytest
import torch

from graphquant.kernels.registry import KERNELS, kernel_of
from graphquant.patterns import PATTERNS
from graphquant.qconfig import embedding_qconfig, float16_dynamic_qconfig
from graphquant.testing import check_graph_mode_op

CASES = [
    pytest.param(pattern, i, id=f"{pattern.name}-{i}")
    for pattern in PATTERNS
    for i in range(len(pattern.examples()))
]
BACKENDS = ["onednn", "portable"]
# the kernels each run below held to the reference graph, and how many runs there were
HELD: set[str] = set()
RUNS: list[str] = []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern,index", CASES)
def test_pattern_kernel_matches_reference(pattern, index, backend):  # type: ignore[no-untyped-def]
    torch.manual_seed(index)
    module, inputs = pattern.examples()[index]
    dynamic = pattern.kind == "dynamic"
    qconfig = embedding_qconfig if pattern.kind == "weight_only" else None  # embeddings: the weight-only qconfig
    result = check_graph_mode_op(module, inputs, pattern.kernel, backend=backend, dynamic=dynamic, qconfig=qconfig)
    assert result.max_step_diff <= 1.0 + 1e-4
    assert result.sqnr >= 30.0, f"{pattern.name}: SQNR {result.sqnr:.1f} dB"
    HELD.update(_kernels(result.quantized) | _kernels(result.reference))
    RUNS.append(pattern.name)
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


def _kernels(graph: torch.fx.GraphModule) -> set[str]:
    return {kernel.name for kernel in map(kernel_of, (n.target for n in graph.graph.nodes)) if kernel is not None}


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
               and n.target._opname not in plain for n in graph.graph.nodes)


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


def test_every_kernel_record_is_held_to_its_reference_by_a_pattern() -> None:
    """Each kernel record is held to the math: it appears in the kernel graph of a pattern example
    that the runs above held within one step of the reference graph, or in the reference graph
    itself, held to float by its SQNR. (float16 dynamic linears: their own run here; this runs only
    after the whole table above.)"""
    if len(RUNS) < len(CASES) * len(BACKENDS):
        pytest.skip("holds after every pattern run of this module")
    module, inputs = next(p for p in PATTERNS if p.name == "dynamic_linear").examples()[0]
    fp16 = check_graph_mode_op(module, inputs, "linear_fp16", dynamic=True, qconfig=float16_dynamic_qconfig)
    assert fp16.max_step_diff <= 1.0 + 1e-4
    HELD.update(_kernels(fp16.quantized))
    assert set(KERNELS) <= HELD, f"kernels no pattern holds to its reference: {sorted(set(KERNELS) - HELD)}"
