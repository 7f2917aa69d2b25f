"""Every registered pattern through the harness, on both backends."""

from __future__ import annotations

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
