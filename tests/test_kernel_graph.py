"""Rewrites of the kernel graph that change how it runs, not what it computes: residual
accums donated to oneDNN's in-place sum, linears reading one input sharing one GEMM.

Each is checked against the same graph without the rewrite (``fuse=False``), bit for bit,
in the GraphModule, its TorchScript and a saved and loaded ``.pt2``.
"""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import graphquant as gq
from graphquant.api import _convert
from graphquant.kernels import onednn
from graphquant.quant_math import sqnr
from graphquant.quantized import record_of

ops = torch.ops.graphquant
pytestmark = pytest.mark.skipif(not onednn.available(), reason="the rewrites are for oneDNN kernel graphs")


def _both(model: nn.Module, batches: list[tuple[torch.Tensor, ...]], qconfig_dict: dict, dynamic: bool = False):  # type: ignore[no-untyped-def]  # noqa: E501
    """The kernel graph as convert makes it, and the same without its rewrites."""
    if dynamic:
        prepared = gq.prepare_dynamic(model, qconfig_dict, batches[0])
    else:
        prepared = gq.prepare(model, qconfig_dict, batches[0])
        gq.calibrate(prepared, batches)
    return (_convert(prepared, False, False, "onednn"),
            _convert(prepared, False, False, "onednn", fuse=False))


def _calls(gm: fx.GraphModule, target: object) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is target]


def _same_everywhere(fused: fx.GraphModule, plain: fx.GraphModule, inputs: tuple[torch.Tensor, ...], tmp_path) -> None:  # type: ignore[no-untyped-def]  # noqa: E501
    with torch.no_grad():
        want = plain(*inputs)
        torch.testing.assert_close(fused(*inputs), want, rtol=0, atol=0)
        scripted = gq.to_torchscript(fused)
        for _ in range(3):  # TorchScript's profiling runs first, then its optimized graph
            torch.testing.assert_close(scripted(*inputs), want, rtol=0, atol=0)
        gq.save(fused, tmp_path / "fused.pt2")
        torch.testing.assert_close(gq.load(tmp_path / "fused.pt2")(*inputs), want, rtol=0, atol=0)


class _Blocks(nn.Module):
    """A stem and two ResNet bottleneck-like blocks: the first joins a shortcut conv, the second
    its identity, which its first conv also reads; ``reread`` reads that identity again after the
    join (a later head), so it cannot take the sum."""

    def __init__(self, reread: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1, self.a2, self.short = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 16, 1), nn.Conv2d(8, 16, 1)
        self.b1, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)
        self.reread = reread

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.a2(torch.relu(self.a1(x))) + self.short(x))
        y = torch.relu(self.b2(torch.relu(self.b1(x))) + x)
        return (y, self.head(x)) if self.reread else y


def _value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    owner = gm
    for part in str(node.target).split("."):
        owner = getattr(owner, part)
    return owner  # type: ignore[return-value]


def _donated(gm: fx.GraphModule) -> list[bool]:
    return [len(n.args) > 16 and bool(n.args[16]) for n in _calls(gm, ops.qconv2d_add.default)]


@pytest.mark.parametrize("reread", [False, True])
def test_residual_accums_are_donated_only_when_nothing_reads_them_later(reread: bool, tmp_path) -> None:  # type: ignore[no-untyped-def]  # noqa: E501
    torch.manual_seed(0)
    batches = [(torch.randn(2, 3, 12, 12),) for _ in range(3)]
    fused, plain = _both(_Blocks(reread).eval(), batches, {"": gq.default_qconfig})
    assert _donated(fused) == [True, not reread]
    assert _donated(plain) == [False, False]
    _same_everywhere(fused, plain, batches[0], tmp_path)


def test_the_kernel_writes_a_donated_accum_in_place() -> None:
    """The flag is what saves the copy: without it the graph's accum is left as it was, with it
    oneDNN's sum lands in the accum itself."""
    torch.manual_seed(0)
    batches = [(torch.randn(2, 3, 12, 12),) for _ in range(2)]
    fused, _ = _both(_Blocks().eval(), batches, {"": gq.default_qconfig})
    node = _calls(fused, ops.qconv2d_add.default)[-1]
    args = [_value(fused, a) if isinstance(a, fx.Node) and a.op == "get_attr" else a for a in node.args]
    x = torch.randint(0, 256, (2, 16, 12, 12), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    accum = torch.randint(0, 256, (2, 16, 12, 12), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    args[0], args[10] = x, accum
    kept = accum.clone()
    copied = ops.qconv2d_add.default(*args[:16])
    assert torch.equal(accum, kept)
    donated = ops.qconv2d_add.default(*args[:16], True)
    assert torch.equal(donated, copied) and torch.equal(accum, copied) and not torch.equal(accum, kept)


@pytest.mark.parametrize("how", ["input", "reread"])
def test_pattern_examples_that_reread_the_accum_keep_their_copy(how: str) -> None:
    """``conv(x) + x`` (the accum is the conv's own input) and an identity read after the join."""
    from graphquant.patterns.conv import _Residual

    torch.manual_seed(0)
    batches = [(torch.randn(1, 4, 10, 10),) for _ in range(2)]
    fused, plain = _both(_Residual(2, how, True).eval(), batches, {"": gq.default_qconfig})
    assert _donated(fused) == [False]
    with torch.no_grad():
        torch.testing.assert_close(fused(*batches[0]), plain(*batches[0]), rtol=0, atol=0)


class _Attention(nn.Module):
    """Query, key and value of one hidden state, heads split by ``view`` (a slice of a shared
    GEMM's output is not contiguous), then float attention and an output projection."""

    def __init__(self, width: int = 32, heads: int = 4, bias: tuple[bool, bool, bool] = (True, True, True)) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width, bias=b) for b in bias)
        self.out = nn.Linear(width, width)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, w // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / (w // self.heads) ** 0.5, -1) @ v
        return self.out(a.transpose(1, 2).reshape(b, s, w)) + x


def _linears(model: nn.Module) -> dict[str, object]:
    return gq.qconfig_dict_by_type(model, {nn.Linear: gq.default_qconfig})


@pytest.mark.parametrize("bias", [(True, True, True), (True, False, True)], ids=["biases", "one-without"])
def test_static_linears_of_one_input_share_one_gemm(bias: tuple[bool, bool, bool], tmp_path) -> None:  # type: ignore[no-untyped-def]  # noqa: E501
    torch.manual_seed(0)
    model = _Attention(bias=bias).eval()
    batches = [(torch.randn(2, 7, 32),) for _ in range(3)]
    fused, plain = _both(model, batches, _linears(model))
    assert len(_calls(plain, ops.qlinear.default)) == 4
    shared = _calls(fused, ops.qlinear.default)
    assert len(shared) == 2 and _value(fused, shared[0].args[4]).shape == (96,)
    assert len(_calls(fused, torch.ops.aten.slice.Tensor)) == 3
    # the three packed weights merged away are not kept (nor their int8 copies)
    assert len(record_of(fused).packed) == 2
    assert not any("self_q_weight" in name or "self_k_weight" in name for name, _ in fused.named_buffers())
    _same_everywhere(fused, plain, batches[0], tmp_path)
    with torch.no_grad():
        assert sqnr(model(*batches[0]), fused(*batches[0])) > 25.0


@pytest.mark.parametrize("per_token", [False, True], ids=["per-tensor", "per-token"])
def test_dynamic_linears_of_one_input_quantize_it_once(per_token: bool, tmp_path) -> None:  # type: ignore[no-untyped-def]  # noqa: E501
    torch.manual_seed(0)
    model = _Attention().eval()
    qconfig = gq.per_token_dynamic_qconfig if per_token else gq.default_dynamic_qconfig
    inputs = (torch.randn(2, 7, 32),)
    fused, plain = _both(model, [inputs], {"": qconfig}, dynamic=True)
    assert len(_calls(plain, ops.qlinear_dynamic.default)) == 4
    assert len(_calls(fused, ops.qlinear_dynamic.default)) == 2
    _same_everywhere(fused, plain, inputs, tmp_path)


def test_linears_that_cannot_share_stay_apart() -> None:
    """Different inputs, or a uint8 output (its own output grid), keep their own GEMM."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.c(torch.relu(self.a(x))) + self.b(y)

    torch.manual_seed(0)
    batches = [(torch.randn(4, 8), torch.randn(4, 8)) for _ in range(2)]
    fused, plain = _both(Two().eval(), batches, {"": gq.default_qconfig})
    assert len(_calls(fused, ops.qlinear.default)) == len(_calls(plain, ops.qlinear.default)) == 3


def test_linears_the_model_returns_keep_their_own_output() -> None:
    """A returned output stays a contiguous tensor of its own (a slice of a shared GEMM is not:
    the caller's ``.view`` could fail); the linears only the model reads still share."""

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Linear(8, 8) for _ in range(4))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.a(x), self.b(x) + self.c(x) * self.d(x)

    torch.manual_seed(0)
    inputs = (torch.randn(4, 8),)
    fused, plain = _both(Heads().eval(), [inputs], {"": gq.default_dynamic_qconfig}, dynamic=True)
    assert len(_calls(fused, ops.qlinear_dynamic.default)) == 2
    assert fused(*inputs)[0].is_contiguous()
    with torch.no_grad():
        for got, want in zip(fused(*inputs), plain(*inputs), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
