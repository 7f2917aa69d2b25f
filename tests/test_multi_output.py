"""Ops returning several tensors (split, unbind, max/min/sort/topk with indices) on uint8.

Values run on uint8 with their input's qparams; indices pass through unchanged; each item's
users are handled like any quantized value's (quantized op: uint8; float op or model output:
dequantize first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten

import graphquant as gq
from graphquant.tools import numerics
from graphquant.testing import check_graph_mode_op, output_scales

BACKENDS = ("onednn", "portable")
DQ = torch.ops.graphquant.dequantize_per_tensor.default
Q = torch.ops.graphquant.quantize_per_tensor.default


def _targets(gm: torch.fx.GraphModule) -> list[Any]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _quantize(module: nn.Module, batches: list[tuple[torch.Tensor, ...]], debug: bool, backend: str) -> Any:
    def run(model: nn.Module, data: list[tuple[torch.Tensor, ...]]) -> None:
        with torch.no_grad():
            for sample in data:
                model(*sample)

    return gq.quantize(module.eval(), {"": gq.default_qconfig}, run, [batches], example_inputs=batches[0],
                       debug=debug, backend=backend)


class _IdentityConvThen(nn.Module):
    """A 1x1 conv with identity weights (exact in int8), then ``then``: the op reads uint8
    values that keep the input's order."""

    def __init__(self, then: Callable[[torch.Tensor, torch.Tensor], Any], channels: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
            self.conv.bias.zero_()
        self.then = then

    def forward(self, x: torch.Tensor) -> Any:
        return self.then(self.conv(x), x)


def _distinct(seed: int, channels: int = 8) -> torch.Tensor:
    """A Latin square over dims 1 and 3 at each (batch, row): every slice along dim 1 or dim 3
    is a permutation of 0..channels-1, values one apart (about 36 quantization steps), so
    quantization makes no ties there."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(2, channels, 5, channels)
    for n in range(2):
        for h in range(5):
            pc, pw = torch.randperm(channels, generator=g), torch.randperm(channels, generator=g)
            x[n, :, h, :] = ((pc[:, None] + pw[None, :]) % channels).float()
    return x


INDEX_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
    "max": lambda y, x: y.max(1),
    "min_keepdim": lambda y, x: torch.min(y, 1, keepdim=True),
    "sort": lambda y, x: y.sort(1, descending=True),
    "sort_stable": lambda y, x: torch.sort(y, dim=3, stable=True),
    "topk": lambda y, x: y.topk(3, 1),
    "topk_smallest": lambda y, x: y.topk(2, 3, largest=False),
    "kthvalue": lambda y, x: y.kthvalue(3, 1),
    "median": lambda y, x: y.median(3),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(INDEX_OPS))
def test_indices_equal_float_indices_and_values_share_input_qparams(name: str, backend: str) -> None:
    """Without ties the uint8 op's indices are the float op's, in both graphs; the values leave
    through one dequantize with the conv output's scale and agree with the reference exactly."""
    module = _IdentityConvThen(INDEX_OPS[name])
    batches = [(_distinct(seed),) for seed in range(3)]
    ref, q = (_quantize(module, batches, debug, backend) for debug in (True, False))
    x = _distinct(7)
    with torch.no_grad():
        (f_values, f_indices), (r_values, r_indices), (q_values, q_indices) = module(x), ref(x), q(x)
    assert q_indices.dtype == torch.int64
    assert torch.equal(q_indices, f_indices) and torch.equal(r_indices, f_indices)
    assert torch.equal(q_values, r_values)
    values_scale = output_scales(q)[0]
    conv_scale = next(n.scale for n in q.graphquant_report.quantized if n.pattern == "conv2d")
    assert values_scale == pytest.approx(conv_scale)  # shares the input's qparams: no requantization
    assert float((q_values - f_values).abs().max()) <= 1.5 * values_scale  # rounded at the input and the conv
    assert _targets(q).count(DQ) == 1 and _targets(q).count(Q) == 1  # the op reads the conv's uint8


@pytest.mark.parametrize("backend", BACKENDS)
def test_indices_feed_gather_and_are_returned(backend: str) -> None:
    """``max`` indices drive a ``gather`` on the (float) model input and are returned as they are."""

    def then(y: torch.Tensor, x: torch.Tensor) -> Any:
        values, indices = y.max(1, keepdim=True)
        return values, indices, x.gather(1, indices), F.relu(values)

    module = _IdentityConvThen(then)
    batches = [(_distinct(seed),) for seed in range(3)]
    q = _quantize(module, batches, False, backend)
    x = _distinct(11)
    with torch.no_grad():
        expected, got = module(x), q(x)
    assert torch.equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])  # gather of float values at equal indices: exact
    gathers = [n for n in q.graph.nodes if n.target is torch.ops.aten.gather.default]
    assert gathers and gathers[0].args[2].target.__name__ == "getitem"  # reads the uint8 op's indices


def test_uint8_and_float_break_ties_alike() -> None:
    """Why kernel and reference indices agree even where quantization makes ties: CPU max, sort,
    topk... give the same indices on uint8 and on its (monotone) dequantized float32."""
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 16, 8, 8), (3, 100), (2, 5000)]:
        q = torch.randint(0, 12, shape, dtype=torch.uint8, generator=g)
        f = (q.float() - 3) * 0.07
        for op in [lambda t: t.max(1), lambda t: t.min(-1), lambda t: t.sort(1), lambda t: t.sort(-1, descending=True),
                   lambda t: t.topk(3, 1), lambda t: t.topk(2, -1, largest=False), lambda t: t.kthvalue(2, 1),
                   lambda t: t.median(1), lambda t: t.cummax(1)]:
            assert torch.equal(op(q)[1], op(f)[1])


class _Chunks(nn.Module):
    """conv -> chunk(4): chunk 0 into a conv, chunk 1 into an add with chunk 2, chunk 3 unused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.conv_a = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, c, _ = self.conv(x).chunk(4, 1)
        return self.conv_a(a), b + c


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_feed_quantized_ops_on_uint8(backend: str) -> None:
    result = check_graph_mode_op(_Chunks(), [(torch.randn(2, 3, 10, 10),) for _ in range(3)], "aten.split",
                                 backend=backend)
    assert result.max_step_diff <= 1.0 + 1e-4 and result.sqnr >= 30
    targets = _targets(result.quantized)
    assert targets.count(DQ) == 2  # the two model outputs only: chunks reach conv and add as uint8
    split = next(n for n in result.quantized.graph.nodes if n.target is torch.ops.aten.split.Tensor)
    assert [u.args[1] for u in split.users] == [0, 1, 2]  # the unused chunk has no getitem
    report = result.quantized.graphquant_report
    assert any(n.pattern == "split" for n in report.quantized)
    assert not report.float_nodes


class _Nested(nn.Module):
    """A split item into max, max's values into sort, a conv around them: multi-output ops
    reading multi-output ops, next to a conv -> add fusion whose residual is a split item."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, b = self.conv(x).split(4, 1)
        fused = F.relu(self.conv2(a) + b)
        values, indices = b.max(1)
        ordered, order = values.sort(-1)
        return fused, ordered, order, indices


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_output_ops_chain_and_sit_beside_a_conv_fusion(backend: str) -> None:
    result = check_graph_mode_op(_Nested(), [(torch.randn(1, 3, 9, 9),) for _ in range(2)], "qconv2d_add",
                                 backend=backend)
    assert result.max_step_diff <= 1.0 + 1e-4 and result.sqnr >= 30
    q = result.quantized
    assert _targets(q).count(DQ) == 2  # fused and ordered; indices are int64, never dequantized
    for op in (torch.ops.aten.max.dim, torch.ops.aten.sort.default):
        node = next(n for n in q.graph.nodes if n.target is op)
        assert node.args[0].target is not DQ  # reads uint8
    assert not q.graphquant_report.float_nodes


@pytest.mark.parametrize("backend", BACKENDS)
def test_items_returned_directly_are_dequantized_at_the_border(backend: str) -> None:
    module = nn.Sequential(nn.Conv2d(3, 6, 3))
    split = lambda y: y.split([1, 2, 3], 1)  # noqa: E731
    result = check_graph_mode_op(_Then(module, split), (torch.randn(1, 3, 8, 8),), "aten.split_with_sizes",
                                 backend=backend)
    scales = output_scales(result.quantized)
    assert len(scales) == 3 and all(s is not None for s in scales) and len(set(scales)) == 1
    assert result.max_step_diff <= 1.0 + 1e-4 and result.sqnr >= 30


class _Then(nn.Module):
    def __init__(self, first: nn.Module, then: Callable[[torch.Tensor], Any]) -> None:
        super().__init__()
        self.first = first
        self.then = then

    def forward(self, x: torch.Tensor) -> Any:
        return self.then(self.first(x))


def _float_nodes(module: nn.Module, backend: str = "portable") -> dict[str, str]:
    q = _quantize(module, [(torch.randn(1, 3, 8, 8),)], False, backend)
    return {n.op: n.reason for n in q.graphquant_report.float_nodes}


def test_report_names_what_stays_float() -> None:
    conv = nn.Conv2d(3, 4, 3)
    # a float-only op after an item: dequantize before it, and the report says why
    floats = _float_nodes(_Then(conv, lambda y: torch.exp(y.unbind(1)[2])))
    assert list(floats) == ["aten.exp.default"] and "no quantized pattern" in floats["aten.exp.default"]
    # only the indices used: nothing to quantize
    floats = _float_nodes(_Then(conv, lambda y: y.max(1)[1]))
    assert "only its indices are used" in floats["aten.max.dim"]
    # a float input: the op does not start a quantized region
    floats = _float_nodes(_Then(nn.Identity(), lambda x: x.chunk(3, 1)[0] * x.sort(1)[0]))
    assert floats["aten.split.Tensor"] == "input is not quantized" == floats["aten.sort.default"]


def test_only_indices_used_still_gives_float_indices() -> None:
    module = _IdentityConvThen(lambda y, x: y.argsort(1) + y.max(1)[1].unsqueeze(1))
    q = _quantize(module, [(_distinct(0),)], False, "portable")
    x = _distinct(5)
    with torch.no_grad():
        assert torch.equal(q(x), module(x))


def test_split_of_a_float_conv_stays_float() -> None:
    module = _Then(nn.Conv2d(3, 4, 3), lambda y: y.split(2, 1)[0])
    prepared = gq.prepare(module.eval(), {"": gq.default_qconfig, "first": None}, (torch.randn(1, 3, 8, 8),))
    gq.calibrate(prepared, [torch.randn(1, 3, 8, 8)])
    floats = {n.op for n in gq.convert(prepared, backend="portable").graphquant_report.float_nodes}
    assert "aten.split.Tensor" in floats  # its input (the float conv) is not quantized


@pytest.mark.parametrize("backend", BACKENDS)
def test_torchscript_and_pt2_keep_values_and_indices(backend: str, tmp_path: Any) -> None:
    module = _IdentityConvThen(lambda y, x: (*y.topk(3, 1), *y.chunk(2, 1)))
    q = _quantize(module, [(_distinct(0),)], False, backend)
    x = _distinct(3)
    with torch.no_grad():
        expected = tree_flatten(q(x))[0]
        scripted = tree_flatten(gq.to_torchscript(q)(x))[0]
        gq.save(q, tmp_path / "m.pt2")
        loaded = tree_flatten(gq.load(tmp_path / "m.pt2")(x))[0]
    assert len(expected) == len(scripted) == len(loaded) == 4
    for e, s, lo in zip(expected, scripted, loaded, strict=True):
        assert torch.equal(e, s) and torch.equal(e, lo)


def test_numerics_lines_up_each_multi_output_op_by_its_first_value_item() -> None:
    torch.manual_seed(0)
    data = [torch.randn(1, 3, 9, 9) for _ in range(2)]
    report = numerics.compare(_Nested().eval(), None, data, backend="portable")
    rows = {n.pattern: n for n in report.nodes}
    assert {"split", "max_dim", "sort"} <= set(rows)
    assert all(rows[p].max_step_diff <= 1.0 and rows[p].layer_sqnr is None for p in ("split", "max_dim", "sort"))


def test_a_returned_torch_return_types_saves_as_a_plain_tuple(tmp_path: Any) -> None:
    """``return y.sort(1)`` gives ``torch.return_types.sort``, which ``torch.export.save`` cannot
    name: the .pt2 returns ``(values, indices)``, the model itself is unchanged."""
    q = _quantize(_IdentityConvThen(lambda y, x: y.sort(1)), [(_distinct(0),)], False, "portable")
    x = _distinct(2)
    gq.save(q, tmp_path / "sort.pt2")
    with torch.no_grad():
        out, loaded = q(x), gq.load(tmp_path / "sort.pt2")(x)
    assert type(out) is torch.return_types.sort and type(loaded) is tuple
    assert torch.equal(out.values, loaded[0]) and torch.equal(out.indices, loaded[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_split_arrives_as_slices_on_uint8(backend: str) -> None:
    module = _Then(nn.Conv2d(3, 5, 3), lambda y: y.tensor_split([1, 3], 1))
    result = check_graph_mode_op(module, (torch.randn(1, 3, 8, 8),), "aten.slice", backend=backend)
    assert result.max_step_diff <= 1.0 + 1e-4 and result.sqnr >= 30
    assert _targets(result.quantized).count(DQ) == 3 and not result.quantized.graphquant_report.float_nodes
