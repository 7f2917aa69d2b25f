"""Golden lowered graphs: a few small models quantized with the defaults, their kernel graphs
written out op by op (every value's producer, every list, string and flag; each number as ``#``,
since scales and zero points move with the CPU's float rounding) and compared with the files in
tests/golden on every change. A change to lowering shows up here as a diff to review; after a
change meant to alter them: ``GRAPHQUANT_UPDATE_GOLDEN=1 pytest tests/test_golden.py``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import calibration_batches, make_net
from torch import fx, nn

import graphquant as gq

GOLDEN = Path(__file__).resolve().parent / "golden"
# the default recipe on 8 bits: reduce_range="auto" would put clamps at 127 into the graphs of CPUs without VNNI
DEFAULT_8BIT = gq.get_default_qconfig("x86", reduce_range=False)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.conv2(y) + y)
        return self.fc(torch.flatten(self.pool(y), 1))


class Attention(nn.Module):
    """A pre-LN transformer block: LayerNorm, q/k/v, softmax(q k^T) v, output projection, GELU FFN."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.ModuleList(nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (layer(h) for layer in self.qkv)
        attention = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
        x = x + self.out(attention @ v)
        return x + self.ffn(x)


def _static(make: Callable[[], nn.Module], shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    model = make().eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(shape, generator=g) for _ in range(3)]
    return gq.quantize(model, {"": DEFAULT_8BIT}, lambda m, bs: [m(b) for b in bs], [batches],
                       example_inputs=(batches[0],), backend="onednn")


MODELS: dict[str, Callable[[], nn.Module]] = {
    "conv_bn_relu_net": lambda: gq.quantize(make_net(), {"": DEFAULT_8BIT},
                                            lambda m, bs: [m(b) for b in bs], [calibration_batches()],
                                            example_inputs=(calibration_batches()[0],), backend="onednn"),
    "residual": lambda: _static(Residual, (2, 3, 8, 8)),
    "attention_block_static": lambda: _static(Attention, (2, 5, 16)),
    "attention_block_dynamic": lambda: gq.quantize_dynamic(Attention().eval(), {"": gq.per_token_dynamic_qconfig},
                                                           example_inputs=(torch.randn(2, 5, 16),), backend="onednn"),
}


def _value(value: Any) -> str:
    if isinstance(value, fx.Node):
        return value.name
    if isinstance(value, bool) or value is None or isinstance(value, (str, torch.dtype)):
        return repr(value)
    if isinstance(value, (int, float)):
        return "#"  # scales, zero points, quantized bounds: the CPU's float rounding may move them
    if isinstance(value, (list, tuple)):
        items = [repr(v) if isinstance(v, int) and not isinstance(v, bool) else _value(v) for v in value]
        return "[" + ", ".join(items) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return type(value).__name__


def render(gm: fx.GraphModule) -> str:
    """The kernel graph, a node a line (get_attr nodes shown by the attribute they read)."""
    lines = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            lines.append(f"input {node.name}")
        elif node.op == "get_attr":
            lines.append(f"{node.name} = attribute {node.target}")
        elif node.op == "call_module":
            lines.append(f"{node.name} = module {node.target}({', '.join(_value(a) for a in node.args)})")
        elif node.op == "call_function":
            target = node.target
            name = f"{target.namespace}.{target._opname}" if isinstance(target, torch._ops.OpOverload) else getattr(
                target, "__name__", str(target))
            args = [_value(a) for a in node.args] + [f"{k}={_value(v)}" for k, v in node.kwargs.items()]
            lines.append(f"{node.name} = {name}({', '.join(args)})")
        elif node.op == "output":
            lines.append(f"return {_value(node.args[0])}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lowered_graph_matches_its_golden(name: str) -> None:
    with torch.no_grad():
        got = render(MODELS[name]())
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("GRAPHQUANT_UPDATE_GOLDEN"):
        path.write_text(got)
    assert path.exists(), f"no golden graph {path}: write it with GRAPHQUANT_UPDATE_GOLDEN=1"
    want = path.read_text()
    assert got == want, f"the lowered graph of {name} changed; review the diff, then GRAPHQUANT_UPDATE_GOLDEN=1"


def test_the_rendering_sees_a_changed_kernel_argument() -> None:
    """The comparison can fail: a post-op or a layer's kernel changed in the graph changes the text."""
    q = MODELS["conv_bn_relu_net"]()
    before = render(q)
    node = next(n for n in q.graph.nodes if n.op == "call_function" and "qconv2d" in str(n.target))
    args = list(node.args)
    position = [a.name for a in node.target._schema.arguments].index("post_op")  # type: ignore[union-attr]
    args[position] = "none" if args[position] != "none" else "relu"
    node.args = tuple(args)
    assert render(q) != before
