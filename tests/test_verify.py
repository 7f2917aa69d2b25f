"""The checks between passes (graphquant/passes/verify.py) hold on real graphs and fail, naming the
node, on the faults they exist to catch."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import calibration_batches, make_net, run_batches

import graphquant as gq
from graphquant.graph import MATCH
from graphquant.passes.verify import check_lowered, check_matches
from graphquant.quantized import record_of


def _quantized() -> torch.fx.GraphModule:
    return gq.quantize(make_net(), {"": gq.default_qconfig}, run_batches, [calibration_batches()],
                       example_inputs=(calibration_batches()[0],), backend="onednn")


def test_a_stale_match_is_caught() -> None:
    prepared = gq.prepare(make_net(), {"": gq.default_qconfig}, (calibration_batches()[0],))
    gm = prepared.graph_module
    assert gm is not None
    check_matches(gm, "insert_observers")  # holds on the real graph
    stale = copy.deepcopy(gm)  # GraphModule's copy keeps the node meta: its matches name the source's nodes
    assert any(MATCH in n.meta for n in stale.graph.nodes)
    with pytest.raises(gq.GraphQuantError, match=r"internal check after test failed at .*which is not a node of this"):
        check_matches(stale, "test")


def test_a_gemm_kernel_reading_an_unpacked_weight_is_caught_before_onednn_sees_it() -> None:
    q = _quantized()
    check_lowered(q)  # holds on the real graph
    node = next(n for n in q.graph.nodes if n.op == "call_function" and "qlinear" in str(n.target))
    position = [a.name for a in node.target._schema.arguments].index("w")  # type: ignore[union-attr]
    packed = node.args[position]
    with q.graph.inserting_before(node):  # the int8 buffer the packed weight was made from
        int8 = q.graph.get_attr(record_of(q).packed[str(packed.target)]["int8"])  # type: ignore[union-attr]
    args = list(node.args)
    args[position] = int8
    node.args = tuple(args)
    with pytest.raises(gq.GraphQuantError, match=r"graphquant::qlinear on oneDNN reads a weight that is not packed"):
        check_lowered(q)


def test_a_kernel_call_missing_an_argument_is_caught() -> None:
    q = _quantized()
    node = next(n for n in q.graph.nodes if n.op == "call_function" and "qconv2d" in str(n.target))
    node.args = node.args[:8]
    missing = "dilation, groups, out_scale, out_zero_point, post_op"  # after the first 8; the rest have defaults
    with pytest.raises(gq.GraphQuantError, match=rf"graphquant::qconv2d is not given {missing}\. This is a graphquant"):
        check_lowered(q)
