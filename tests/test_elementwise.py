"""uint8 elementwise and join kernels against their reference ``dequantize -> op -> quantize``
(bit for bit: they use its float32 operations), and the lowerings that reach them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphquant
from graphquant.kernels import elementwise
from graphquant.qconfig import get_default_qconfig
from graphquant.quant_math import quantize_tensor
from graphquant.testing import output_scales

ops = torch.ops.graphquant


def _random_q(shape: tuple[int, ...], g: torch.Generator) -> tuple[torch.Tensor, float, int]:
    scale = float(torch.empty(()).uniform_(0.002, 0.1, generator=g))
    zero_point = int(torch.randint(0, 256, (), generator=g))
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g), scale, zero_point


def _dq(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return ops.dequantize_per_tensor(q, scale, zero_point)


def _q(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return quantize_tensor(x, scale, zero_point, 0, 255, torch.uint8)


def _assert_same(kernel: torch.Tensor, reference: torch.Tensor) -> None:
    assert kernel.dtype == torch.uint8 and kernel.shape == reference.shape
    assert torch.equal(kernel, reference), int((kernel.int() - reference.int()).abs().max())


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("post_op", ["none", "relu"])
def test_qadd_qmul_match_the_reference(seed: int, post_op: str) -> None:
    g = torch.Generator().manual_seed(seed)
    x, xs, xz = _random_q((4, 3, 5), g)
    y, ys, yz = _random_q((3, 1), g)  # broadcasts
    _, out_scale, out_zp = _random_q((), g)
    relu = F.relu if post_op == "relu" else (lambda t: t)
    a, b = _dq(x, xs, xz), _dq(y, ys, yz)
    mul_scale = out_scale * 20  # a product spans a wider range than a sum
    cases = [
        (ops.qadd(x, xs, xz, y, ys, yz, 1.0, out_scale, out_zp, post_op), a + b, out_scale),
        (ops.qadd(x, xs, xz, y, ys, yz, -0.5, out_scale, out_zp, post_op), torch.sub(a, b, alpha=0.5), out_scale),
        (ops.qadd_scalar(x, xs, xz, 1.5, out_scale, out_zp, post_op), a + 1.5, out_scale),
        (ops.qmul(x, xs, xz, y, ys, yz, mul_scale, out_zp, post_op), a * b, mul_scale),
        (ops.qmul_scalar(x, xs, xz, -2.0, out_scale, out_zp, post_op), a * -2.0, out_scale),
    ]
    for kernel, expected, scale in cases:
        _assert_same(kernel, _q(relu(expected), scale, out_zp))


@pytest.mark.parametrize("seed", range(10))
def test_qcat_qstack_match_the_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    inputs = [_random_q((2, 3, 4), g) for _ in range(3)]
    inputs.append(inputs[0])  # an input already on the output's qparams passes unchanged
    _, out_scale, out_zp = inputs[0]
    xs, scales, zero_points = (list(t) for t in zip(*inputs, strict=True))
    floats = [_dq(*i) for i in inputs]
    _assert_same(ops.qcat(xs, scales, zero_points, -1, out_scale, out_zp),
                            _q(torch.cat(floats, -1), out_scale, out_zp))
    _assert_same(ops.qstack(xs, scales, zero_points, 1, out_scale, out_zp),
                            _q(torch.stack(floats, 1), out_scale, out_zp))
    assert torch.equal(ops.qcat([xs[0]], [out_scale], [out_zp], 0, out_scale, out_zp), xs[0])


def test_kernels_check_their_inputs() -> None:
    q = torch.zeros(2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="input 1 must be uint8"):
        elementwise.qadd(q, 1.0, 0, q.float(), 1.0, 0, 1.0, 1.0, 0, "none")
    with pytest.raises(ValueError, match="post_op"):
        elementwise.qmul_scalar(q, 1.0, 0, 2.0, 1.0, 0, "gelu")
    with pytest.raises(ValueError, match="2 inputs but 1 scales"):
        elementwise.qcat([q, q], [1.0], [0, 0], 0, 1.0, 0)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fc(x + y)


def _quantize(model: nn.Module, *inputs: torch.Tensor, debug: bool = False) -> torch.fx.GraphModule:
    def run_fn(m: nn.Module, data: tuple[torch.Tensor, ...]) -> None:
        m(*data)

    config = {"": get_default_qconfig("x86")}
    return graphquant.quantize(model.eval(), config, run_fn, [inputs], debug=debug, backend="portable")


def test_add_of_two_model_inputs_stays_float() -> None:
    """As in PyTorch: an add whose inputs are both float is not quantized just to quantize it."""
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    model = _TwoInputs()
    quantized = _quantize(model, x, y)
    add = next(n for n in quantized.graphquant_report.nodes if n.op == "aten.add.Tensor")
    assert not add.quantized and add.reason == "input is not quantized"
    assert "qadd" not in str(quantized.graph)
    # the add runs in float and its exact sum is what the linear's input quantizer sees; the
    # linear writes float32 (nothing quantized reads it): the graphs differ only by the kernel's bias,
    # rounded onto the int32 accumulator grid (x_scale * w_scale, here ~1e-4)
    torch.testing.assert_close(_quantize(model, x, y, debug=True)(x, y), quantized(x, y), rtol=0, atol=1e-4)


class _SameInputTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.max_pool2d(self.conv(x), 2)
        return y + y, torch.cat([y, y * 0.5, y], dim=1)


def test_one_input_used_twice() -> None:
    """``y + y`` and ``cat([y, z, y])`` see ``y`` once among their activation inputs."""
    torch.manual_seed(51)  # a seed where the conv's kernel and reference outputs differ by one step
    x, model = torch.randn(2, 3, 10, 10), _SameInputTwice()
    quantized, reference = _quantize(model, x), _quantize(model, x, debug=True)
    assert "graphquant.qadd.default" in str(quantized.graph) and "graphquant.qcat" in str(quantized.graph)
    # Each kernel is within one step of its reference on the same input (tests/test_patterns.py), but
    # here the add and the cat read the conv's output, whose kernel may already be one step (of the
    # conv's scale) off: y + y doubles that. Bound: two conv steps upstream plus one output step.
    y_scale = float(next(n for n in quantized.graphquant_report.quantized if n.pattern == "conv2d").scale)
    with torch.no_grad():
        for want, got, out_scale in zip(reference(x), quantized(x), output_scales(quantized)):
            assert float((want - got).abs().max()) <= 2 * y_scale + out_scale * 1.001


@pytest.mark.parametrize("bounds", [(-0.3, 0.2), (0.0, None), (None, -0.1), (-10.0, 10.0), (0.07, 0.07)])
def test_clamp_on_uint8_is_exact(bounds: tuple[float | None, float | None]) -> None:
    """``clamp(q(x), q(lo), q(hi)) == q(clamp(x, lo, hi))``: quantization is monotone."""
    g = torch.Generator().manual_seed(0)
    q, scale, zero_point = _random_q((1000,), g)
    lo, hi = bounds
    q_lo = None if lo is None else int(_q(torch.tensor(lo), scale, zero_point))
    q_hi = None if hi is None else int(_q(torch.tensor(hi), scale, zero_point))
    expected = _q(torch.clamp(_dq(q, scale, zero_point), lo, hi), scale, zero_point)
    assert torch.equal(torch.clamp(q, q_lo, q_hi), expected)
