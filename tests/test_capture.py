"""Capture: one graph with module paths and a dynamic batch."""

from __future__ import annotations

import torch
from conftest import make_net

from graphquant.capture import capture
from graphquant.graph import MODULE_PATH


def test_module_paths_on_every_compute_node():
    net = make_net()
    gm = capture(net, (torch.randn(1, 3, 16, 16),))
    paths = {str(n.target): n.meta[MODULE_PATH] for n in gm.graph.nodes if n.op == "call_function"}
    convs = [n.meta[MODULE_PATH] for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    linears = [n.meta[MODULE_PATH] for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert convs == ["conv1", "conv2"]
    assert linears == ["fc1", "fc2"]
    assert paths


def test_batch_dimension_is_dynamic():
    net = make_net()
    gm = capture(net, (torch.randn(1, 3, 16, 16),))
    for batch in (1, 3, 8):
        x = torch.randn(batch, 3, 16, 16)
        torch.testing.assert_close(gm(x), net(x))


def test_inplace_ops_arrive_functional():
    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.nn.functional.relu(x * 2, inplace=True)
            y += 2
            return y

    gm = capture(M(), (torch.randn(2, 3),))
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "aten.relu.default" in targets and "aten.add.Tensor" in targets
    assert not any(t.endswith("_.default") or t.endswith("_.Tensor") for t in targets), targets


def test_identity_clones_are_dropped_and_layout_clones_kept():
    """Eval dropout and ``x.clone()`` copy for nothing in a functional graph; ``.contiguous()``
    changes the layout and a returned clone must not alias the input: those two stay."""

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            self.drop = torch.nn.Dropout(0.1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            y = self.drop(self.fc(x)).clone() + 1
            z = x.transpose(0, 1).contiguous().view(-1)
            return y, z, x.clone()

    model = M().eval()
    x = torch.randn(3, 4)
    gm = capture(model, (x,))
    clones = [n for n in gm.graph.nodes if n.target is torch.ops.aten.clone.default]
    assert len(clones) == 2, gm.code
    assert sum("memory_format" in n.kwargs for n in clones) == 1
    for got, want in zip(gm(x), model(x), strict=True):
        torch.testing.assert_close(got, want)
    returned = gm(x)[2]
    assert returned.data_ptr() != x.data_ptr()
