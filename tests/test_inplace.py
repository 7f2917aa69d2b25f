"""In-place spellings (``x += y``, ``x.add_(y)``, ``x *= 2``, ``F.relu(x, inplace=True)``, ...)
give bit-identical numbers to their out-of-place twins, in both modes and on both backends.

Capture functionalises them (``a += b`` becomes ``aten.add.Tensor``), so both spellings
must reach the same patterns; the test checks the numbers, not the mechanism.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

import graphquant
from graphquant.qconfig import get_default_qconfig


class _Arithmetic(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.max_pool2d(self.conv1(x), 2)
        b = F.max_pool2d(self.conv2(x), 2)
        if self.inplace:
            a += b
            a.add_(b, alpha=0.5)
            a *= 2
            a += 1.5  # the in-place scalar add PyTorch's own graph mode gets wrong
            a.sub_(b)
            a.mul_(b)
            F.relu(a, inplace=True)
        else:
            a = a + b
            a = torch.add(a, b, alpha=0.5)
            a = a * 2
            a = a + 1.5
            a = a - b
            a = F.relu(a * b)
        return a


class _Activations(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = F.max_pool2d(self.conv(x), 2)
        i = self.inplace
        b = F.hardtanh(a.clone() if i else a, -1.0, 1.5, inplace=i)
        c = a.clone().clamp_(-0.5, 0.5) if i else a.clamp(-0.5, 0.5)
        d = F.leaky_relu(a.clone() if i else a, 0.1, inplace=i)
        e = F.hardswish(a.clone() if i else a, inplace=i)
        f = a.clone().sigmoid_() if i else a.sigmoid()
        g = a.clone().tanh_() if i else torch.tanh(a)
        h = F.relu6(a.clone() if i else a, inplace=i)
        return b, c, d, e, f, g, h, F.relu(a, inplace=i)


class _InputUpdate(nn.Module):
    """An in-place update of a model input: float in, float out (no quantized input)."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            x += 1
        else:
            x = x + 1
        return self.fc(x)


def _quantized_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, object]:
    """Outputs of the reference graph and of the kernel graph on each backend, calibrated on
    ``x`` and ``-x`` (fresh copies: the model may write into its input)."""
    prepared = graphquant.prepare(model.eval(), {"": get_default_qconfig("x86")}, (x.clone(),))
    graphquant.calibrate(prepared, [x.clone(), -x])
    outputs: dict[str, object] = {}
    modes = [("reference", True, None), ("onednn", False, "onednn"), ("portable", False, "portable")]
    for name, debug, backend in modes:
        converted = graphquant.convert(prepared, debug=debug, backend=backend)
        outputs[name] = converted(x.clone())
        outputs[name + ".code"] = str(converted.graph)  # the ops (forward calls kernels directly)
    return outputs


@pytest.mark.parametrize("module, kernels", [
    (_Arithmetic, ("graphquant.qadd.default", "graphquant.qadd_scalar", "graphquant.qmul_scalar",
                   "graphquant.qmul.default")),
    (_Activations, ("aten.clamp", "aten.hardswish", "aten.sigmoid", "aten.tanh", "aten.leaky_relu")),
    (_InputUpdate, ("graphquant.qlinear",)),
])
def test_inplace_matches_out_of_place(module: type[nn.Module], kernels: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    inplace = module(True)  # type: ignore[call-arg]
    twin = module(False)  # type: ignore[call-arg]
    twin.load_state_dict(inplace.state_dict())
    x = torch.randn(2, 3, 10, 10) if module is not _InputUpdate else torch.randn(2, 8)
    got, expected = _quantized_outputs(inplace, x), _quantized_outputs(twin, x)
    for mode in ("reference", "onednn", "portable"):
        for a, b in zip(tree_leaves(got[mode]), tree_leaves(expected[mode]), strict=True):
            assert torch.equal(a, b), mode
    for kernel in kernels:  # quantized, not two float graphs that agree
        assert kernel in str(got["portable.code"]), kernel


def test_inplace_update_of_a_model_input_still_updates_it() -> None:
    """``x += 1`` on a model input writes back into the caller's tensor, as the float model does."""
    model = _InputUpdate(True).eval()
    x = torch.randn(2, 8)
    prepared = graphquant.prepare(model, {"": get_default_qconfig("x86")}, (x.clone(),))
    graphquant.calibrate(prepared, [x.clone()])
    quantized = graphquant.convert(prepared, backend="portable")
    argument = x.clone()
    quantized(argument)
    assert torch.equal(argument, x + 1)
