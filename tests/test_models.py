"""Real architectures built from transformers configs (random weights, BN statistics set by
training-mode passes): every conv and linear on int8 kernels, SQNR against float."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphquant as gq
from graphquant.quant_math import sqnr

transformers = pytest.importorskip("transformers")


class Pooled(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).pooler_output


def test_resnet50_all_int8():
    torch.manual_seed(0)
    model = transformers.ResNetModel(transformers.ResNetConfig()).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 128, 128))
    model = Pooled(model).eval()
    calibration = [torch.randn(2, 3, 128, 128) for _ in range(3)]
    q = gq.quantize(model, {"": gq.default_qconfig}, lambda p, bs: [p(b) for b in bs], [calibration],
                    example_inputs=(calibration[0][:1],))  # fmt: skip
    report = gq.report(q)
    assert [n for n in report.float_nodes if "conv" in n.op or "linear" in n.op] == []
    assert len([n for n in report.quantized if "conv" in n.op]) == 53
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert sqnr(model(x), q(x)) >= 25.0
