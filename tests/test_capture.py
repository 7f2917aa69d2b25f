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


def test_zero_padding_folds_into_the_convolution_that_reads_it():
    """TF-style "same" padding: a pad by nothing is dropped, a symmetric zero pad read only by a
    conv becomes its padding; asymmetric, non-zero, reflect and shared pads stay."""
    import torch.nn.functional as F

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, groups=4)
            self.c, self.d = torch.nn.Conv2d(4, 4, 3, stride=2), torch.nn.Conv2d(4, 4, 1)
            self.e = torch.nn.Conv1d(4, 4, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            y = self.a(F.pad(x, (0, 0, 0, 0)))  # nothing: dropped
            y = self.b(F.pad(y, (1, 1, 2, 2)))  # symmetric zeros: b's padding becomes (2, 1)
            z = self.c(F.pad(y, (0, 1, 0, 1)))  # asymmetric ("same" at stride 2): kept
            r = self.d(F.pad(y, (1, 1, 1, 1), mode="reflect"))  # copies values: kept
            s = F.pad(y, (1, 1, 1, 1), value=0.5)  # not zero: kept
            shared = F.pad(y, (1, 1, 1, 1))  # read by a conv and by an add: kept
            t = self.d(shared) + shared
            u = self.e(F.pad(y.mean(2), (2, 2)))  # conv1d: padding 2
            return z, r, s, t, u

    model = M().eval()
    x = torch.randn(2, 3, 9, 9)
    gm = capture(model, (x,))
    pads = [list(n.args[1]) for n in gm.graph.nodes if n.target is torch.ops.aten.pad.default]
    assert sorted(pads) == sorted([[0, 1, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]), gm.code
    convs = {n.args[1].target: list(n.args[4]) for n in gm.graph.nodes
             if "conv" in str(n.target) and len(n.args) > 4}
    assert convs["b.weight"] == [2, 1] and convs["e.weight"] == [2] and convs["a.weight"] == [1, 1], convs
    for got, want in zip(gm(x), model(x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
