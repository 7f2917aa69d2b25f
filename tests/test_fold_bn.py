"""Batch-norm folding: the folded conv computes what conv + bn computed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphquant.capture import capture
from graphquant.passes.fold_bn import fold_bn


class ConvBn(nn.Module):
    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.conv = getattr(nn, f"Conv{dim}d")(3, 6, 3, bias=bias)
        self.bn = getattr(nn, f"BatchNorm{dim}d")(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_matches_float(dim, bias):  # type: ignore[no-untyped-def]
    torch.manual_seed(dim)
    model = ConvBn(dim, bias).eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.1, 3)
        model.bn.weight.uniform_(-2, 2)
        model.bn.bias.uniform_(-1, 1)
    x = torch.randn((2, 3) + (7,) * dim)
    gm = fold_bn(capture(model, (x,)))
    targets = [str(n.target) for n in gm.graph.nodes]
    assert not any("batch_norm" in t for t in targets), targets
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_leaves_model_parameters_alone():
    model = ConvBn(2, True).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_bn(capture(model, (torch.randn(1, 3, 8, 8),)))
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k


def test_bn_after_non_conv_is_kept():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)).eval()
    gm = fold_bn(capture(model, (torch.randn(1, 3, 4, 4),)))
    assert any("batch_norm" in str(n.target) for n in gm.graph.nodes)
