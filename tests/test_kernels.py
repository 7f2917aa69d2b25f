"""int8 kernels: oneDNN against the portable backend and the float math; guarded inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphquant  # noqa: F401  (registers torch.ops.graphquant)
from graphquant.kernels import onednn, portable
from graphquant.quant_math import choose_qparams, dequantize, quantize

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this PyTorch has no oneDNN int8 ops")


def _quantized_operands(out_channels: int, w_shape: tuple[int, ...], x: torch.Tensor):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(w_shape, generator=g)
    w_qp = choose_qparams(w.flatten(1).amin(1), w.flatten(1).amax(1), torch.int8, True, axis=0)
    x_qp = choose_qparams(x.min(), x.max(), torch.uint8, False)
    bias = torch.randn(out_channels, generator=g)
    return quantize(w, w_qp), w_qp, quantize(x, x_qp), x_qp, bias


@pytest.mark.parametrize("post_op", ["none", "relu"])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_kernels_agree_with_the_math(post_op, groups):  # type: ignore[no-untyped-def]
    x = torch.randn(2, 4, 9, 9)
    w_q, w_qp, x_q, x_qp, bias = _quantized_operands(6, (6, 4 // groups, 3, 3), x)
    x_scale, x_zp = x_qp.scalar()
    args = ([2, 1], [1, 1], [1, 1], groups)
    y = F.conv2d(dequantize(x_q, x_qp), dequantize(w_q, w_qp), bias, *args)
    y = y.relu() if post_op == "relu" else y
    out_qp = choose_qparams(y.min(), y.max(), torch.uint8, False)
    out_scale, out_zp = out_qp.scalar()
    expected = quantize(y, out_qp).int()
    packed = onednn.pack_conv(w_q, w_qp.scale, x_scale, x_zp, *args)
    got_onednn = onednn.qconv(x_q, x_scale, x_zp, packed, w_qp.scale, bias, *args, out_scale, out_zp, post_op)
    got_portable = portable.qconv(x_q, x_scale, x_zp, w_q, w_qp.scale, bias, *args, out_scale, out_zp, post_op)
    assert int((got_onednn.int() - expected).abs().max()) <= 1
    assert int((got_portable.int() - expected).abs().max()) <= 1


def test_linear_kernels_agree_with_the_math():
    x = torch.randn(3, 5, 32)
    w_q, w_qp, x_q, x_qp, bias = _quantized_operands(16, (16, 32), x)
    x_scale, x_zp = x_qp.scalar()
    y = F.linear(dequantize(x_q, x_qp), dequantize(w_q, w_qp), bias)
    out_qp = choose_qparams(y.min(), y.max(), torch.uint8, False)
    out_scale, out_zp = out_qp.scalar()
    expected = quantize(y, out_qp).int()
    got = onednn.qlinear(x_q, x_scale, x_zp, onednn.pack_linear(w_q), w_qp.scale, bias, out_scale, out_zp, "none")
    got_p = portable.qlinear(x_q, x_scale, x_zp, w_q, w_qp.scale, bias, out_scale, out_zp, "none")
    assert got.shape == (3, 5, 16)
    assert int((got.int() - expected).abs().max()) <= 1
    assert int((got_p.int() - expected).abs().max()) <= 1


def test_unpacked_linear_weight_is_refused_not_a_crash():
    """oneDNN would SIGSEGV on an unpacked weight; the guard raises first."""
    w = torch.randint(-128, 127, (8, 16), dtype=torch.int8)
    x = torch.randint(0, 255, (2, 16), dtype=torch.uint8)
    with pytest.raises(ValueError, match="not packed for oneDNN"):
        onednn.qlinear(x, 0.1, 0, w, torch.ones(8), None, 0.1, 0, "none")


@pytest.mark.parametrize("change,needle", [
    ("float_input", "activation must be uint8"),
    ("bad_scale", "w_scale must be float32 with 8 entries"),
    ("bad_bias", "bias must be float32 with 8 entries"),
    ("bad_features", "does not end in 16 features"),
    ("bad_zero_point", r"zero points must lie in \[0, 255\]"),
    ("bad_post_op", "post_op 'elu'"),
    ("bad_post_op_args", "post_op 'hardtanh' takes 2 scalars"),
])
def test_linear_guards(change, needle):  # type: ignore[no-untyped-def]
    packed = onednn.pack_linear(torch.randint(-128, 127, (8, 16), dtype=torch.int8))
    args = dict(x=torch.randint(0, 255, (2, 16), dtype=torch.uint8), x_scale=0.1, x_zero_point=0, w=packed,
                w_scale=torch.ones(8), bias=None, out_scale=0.1, out_zero_point=0, post_op="none")
    if change == "float_input":
        args["x"] = torch.randn(2, 16)
    elif change == "bad_scale":
        args["w_scale"] = torch.ones(7)
    elif change == "bad_bias":
        args["bias"] = torch.ones(8, dtype=torch.float64)
    elif change == "bad_features":
        args["x"] = torch.randint(0, 255, (2, 15), dtype=torch.uint8)
    elif change == "bad_zero_point":
        args["x_zero_point"] = 300
    elif change == "bad_post_op":
        args["post_op"] = "elu"
    else:
        args["post_op"] = "hardtanh"
    with pytest.raises(ValueError, match=needle):
        onednn.qlinear(**args)


def test_conv_guard_checks_channels():
    w = torch.randint(-128, 127, (8, 4, 3, 3), dtype=torch.int8)
    packed = onednn.pack_conv(w, torch.ones(8), 0.1, 0, [1, 1], [0, 0], [1, 1], 1)
    x = torch.randint(0, 255, (1, 5, 8, 8), dtype=torch.uint8)
    with pytest.raises(ValueError, match="does not fit weight"):
        onednn.qconv(x, 0.1, 0, packed, torch.ones(8), None, [1, 1], [0, 0], [1, 1], 1, 0.1, 0, "none")


def test_empty_batch():
    packed = onednn.pack_linear(torch.randint(-128, 127, (8, 16), dtype=torch.int8))
    x = torch.empty(0, 16, dtype=torch.uint8)
    assert onednn.qlinear(x, 0.1, 0, packed, torch.ones(8), None, 0.1, 0, "none").shape == (0, 8)


# Post-ops: a name and its scalars, applied to the real value before the one rounding.
POST_OPS = {
    "none": ([], lambda y: y),
    "relu": ([], F.relu),
    "hardtanh": ([-0.5, 1.0], lambda y: y.clamp(-0.5, 1.0)),
    "relu6_like": ([0.0, float("inf")], lambda y: y.clamp_min(0.0)),
    "hardswish": ([], F.hardswish),
    "silu": ([], F.silu),
    "gelu": ([], F.gelu),
    "gelu_tanh": ([], lambda y: F.gelu(y, approximate="tanh")),
    "leaky_relu": ([0.1], lambda y: F.leaky_relu(y, 0.1)),
}


def _post_op(name: str) -> tuple[str, list[float]]:
    return ("hardtanh" if name == "relu6_like" else name), POST_OPS[name][0]


def _expected(y: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    out_qp = choose_qparams(y.min(), y.max(), torch.uint8, False)
    out_scale, out_zp = out_qp.scalar()
    return quantize(y, out_qp).int(), out_scale, out_zp


@pytest.mark.parametrize("name", list(POST_OPS))
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_post_ops_on_both_backends(dim, name):  # type: ignore[no-untyped-def]
    """oneDNN fuses some post-ops only into 2-d convs; the others are clamped on the grid or
    applied to a float32 output: every one stays within a step of the math on every dim."""
    x = torch.randn((2, 4) + (7,) * dim)
    w_q, w_qp, x_q, x_qp, bias = _quantized_operands(6, (6, 2) + (3,) * dim, x)
    x_scale, x_zp = x_qp.scalar()
    args = ([1] * dim, [1] * dim, [1] * dim, 2)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dim - 1]
    y = POST_OPS[name][1](conv(dequantize(x_q, x_qp), dequantize(w_q, w_qp), bias, *args))
    expected, out_scale, out_zp = _expected(y)
    post_op, scalars = _post_op(name)
    packed = onednn.pack_conv(w_q, w_qp.scale, x_scale, x_zp, *args)
    got = onednn.qconv(x_q, x_scale, x_zp, packed, w_qp.scale, bias, *args, out_scale, out_zp, post_op, scalars)
    got_p = portable.qconv(x_q, x_scale, x_zp, w_q, w_qp.scale, bias, *args, out_scale, out_zp, post_op, scalars)
    assert got.shape == got_p.shape == expected.shape
    assert int((got.int() - expected).abs().max()) <= 1
    assert int((got_p.int() - expected).abs().max()) <= 1


@pytest.mark.parametrize("name", list(POST_OPS))
def test_linear_post_ops_on_both_backends(name):  # type: ignore[no-untyped-def]
    x = torch.randn(3, 5, 32)
    w_q, w_qp, x_q, x_qp, bias = _quantized_operands(16, (16, 32), x)
    x_scale, x_zp = x_qp.scalar()
    y = POST_OPS[name][1](F.linear(dequantize(x_q, x_qp), dequantize(w_q, w_qp), bias))
    expected, out_scale, out_zp = _expected(y)
    post_op, scalars = _post_op(name)
    packed = onednn.pack_linear(w_q)
    got = onednn.qlinear(x_q, x_scale, x_zp, packed, w_qp.scale, bias, out_scale, out_zp, post_op, scalars)
    got_p = portable.qlinear(x_q, x_scale, x_zp, w_q, w_qp.scale, bias, out_scale, out_zp, post_op, scalars)
    assert int((got.int() - expected).abs().max()) <= 1
    assert int((got_p.int() - expected).abs().max()) <= 1


def test_post_op_guards():
    with pytest.raises(ValueError, match="takes 1 scalars"):
        portable.check_post_op("qconv", "leaky_relu", [])
    with pytest.raises(ValueError, match="not min <= max"):
        portable.check_post_op("qconv", "hardtanh", [1.0, 0.0])


def _residual_operands(dim: int, relu: bool):  # type: ignore[no-untyped-def]
    x = torch.randn((2, 4) + (7,) * dim)
    w_q, w_qp, x_q, x_qp, bias = _quantized_operands(4, (4, 4) + (3,) * dim, x)
    other = torch.randn((2, 4) + (7,) * dim) * 2
    a_qp = choose_qparams(other.min(), other.max(), torch.uint8, False)
    accum = quantize(other, a_qp)
    conv = (F.conv1d, F.conv2d)[dim - 1]
    args = ([1] * dim, [1] * dim, [1] * dim, 1)
    y = conv(dequantize(x_q, x_qp), dequantize(w_q, w_qp), bias, *args) + dequantize(accum, a_qp)
    expected, out_scale, out_zp = _expected(y.relu() if relu else y)
    return x_q, x_qp.scalar(), w_q, w_qp, bias, args, accum, a_qp.scalar(), expected, (out_scale, out_zp)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_add_on_both_backends_leaves_accum_alone(dim, relu, layout):  # type: ignore[no-untyped-def]
    """oneDNN's sum post-op writes into its accum (``Tensor(a!) qaccum``): the kernel hands it a
    private copy, whether or not the accum is already channels-last (then no copy would be made)."""
    x_q, (x_scale, x_zp), w_q, w_qp, bias, args, accum, (a_scale, a_zp), expected, out = _residual_operands(dim, relu)
    if layout == "channels_last" and dim == 2:
        accum = accum.contiguous(memory_format=torch.channels_last)
    before = accum.clone()
    post_op = "relu" if relu else "none"
    packed = onednn.pack_conv(w_q, w_qp.scale, x_scale, x_zp, *args)
    got = onednn.qconv_add(x_q, x_scale, x_zp, packed, w_qp.scale, bias, *args, accum, a_scale, a_zp, *out, post_op)
    got_p = portable.qconv_add(x_q, x_scale, x_zp, w_q, w_qp.scale, bias, *args, accum, a_scale, a_zp, *out, post_op)
    assert torch.equal(accum, before)
    assert got.shape == got_p.shape == expected.shape
    assert int((got.int() - expected).abs().max()) <= 1
    assert int((got_p.int() - expected).abs().max()) <= 1


def test_conv_add_accum_may_be_the_input():
    """``conv(x) + x``: one uint8 tensor is both the conv's input and the accum."""
    x = torch.randn(1, 4, 8, 8)
    w_q, w_qp, x_q, x_qp, bias = _quantized_operands(4, (4, 4, 3, 3), x)
    x_scale, x_zp = x_qp.scalar()
    x_q = x_q.contiguous(memory_format=torch.channels_last)
    args = ([1, 1], [1, 1], [1, 1], 1)
    y = F.conv2d(dequantize(x_q, x_qp), dequantize(w_q, w_qp), bias, *args) + dequantize(x_q, x_qp)
    expected, out_scale, out_zp = _expected(y)
    before = x_q.clone()
    packed = onednn.pack_conv(w_q, w_qp.scale, x_scale, x_zp, *args)
    got = onednn.qconv_add(x_q, x_scale, x_zp, packed, w_qp.scale, bias, *args, x_q, x_scale, x_zp, out_scale, out_zp,
                           "none")
    assert torch.equal(x_q, before)
    assert int((got.int() - expected).abs().max()) <= 1


@pytest.mark.parametrize("change,needle", [
    ("small_accum", "accum must be a uint8 CPU tensor of the output's shape"),
    ("float_accum", "accum must be a uint8 CPU tensor"),
    ("post_op", "fuses only relu after the residual sum"),
    ("conv3d", "1-d and 2-d convs"),
])
def test_conv_add_guards(change, needle):  # type: ignore[no-untyped-def]
    """A smaller accum would have oneDNN write past its end: refused before the call."""
    dim = 3 if change == "conv3d" else 2
    x_q, (x_scale, x_zp), w_q, w_qp, bias, args, accum, (a_scale, a_zp), _, out = _residual_operands(2, False)
    if dim == 3:
        x_q, w_q, accum = x_q.unsqueeze(-1), w_q.unsqueeze(-1), accum.unsqueeze(-1)
        args = ([1, 1, 1], [1, 1, 0], [1, 1, 1], 1)
    packed = onednn.pack_conv(w_q, w_qp.scale, x_scale, x_zp, *args)
    post_op = "hardswish" if change == "post_op" else "none"
    if change == "small_accum":
        accum = accum[:, :, :-1]
    elif change == "float_accum":
        accum = accum.float()
    with pytest.raises(ValueError, match=needle):
        onednn.qconv_add(x_q, x_scale, x_zp, packed, w_qp.scale, bias, *args, accum, a_scale, a_zp, *out, post_op)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose_kernel_agrees_with_the_math(dim, groups):  # type: ignore[no-untyped-def]
    """Weight scales along axis 0 (the input channels), as the reference quantizes the weight."""
    x = torch.randn((2, 4) + (5,) * dim)
    w_q, w_qp, x_q, x_qp, _ = _quantized_operands(4, (4, 6 // groups) + (3,) * dim, x)
    bias = torch.randn(6)
    x_scale, x_zp = x_qp.scalar()
    stride, padding, output_padding, dilation = [2] * dim, [1] * dim, [1] * dim, [1] * dim
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dim - 1]
    y = conv(dequantize(x_q, x_qp), dequantize(w_q, w_qp), bias, stride, padding, output_padding, groups, dilation)
    expected, out_scale, out_zp = _expected(y)
    op = getattr(torch.ops.graphquant, f"qconv_transpose{dim}d")  # both backends run the portable kernel
    got = op(x_q, x_scale, x_zp, w_q, w_qp.scale, bias, stride, padding, output_padding, groups, dilation,
             out_scale, out_zp, "none")
    assert got.shape == expected.shape
    assert int((got.int() - expected).abs().max()) <= 1


def test_conv_add_that_writes_into_its_accum_fails_the_harness(monkeypatch):
    """The conv2d_add examples read the accum again after the join (and join a conv's own
    input): a kernel that let oneDNN write the sum into the graph's tensor is caught."""
    from graphquant.patterns import PATTERNS
    from graphquant.testing import check_graph_mode_op

    def in_place(x, x_scale, x_zp, w, w_scale, bias, stride, padding, dilation, groups, accum, *rest):  # type: ignore[no-untyped-def]  # noqa: E501
        a_scale, a_zp, out_scale, out_zp, post_op = rest[:5]  # a donated accum adds a flag
        return torch.ops.onednn.qconv2d_pointwise.binary(
            x, x_scale, x_zp, w, w_scale, torch.zeros(w.shape[0], dtype=torch.int64), accum, bias, stride, padding,
            dilation, groups, out_scale, out_zp, None, a_scale, a_zp, "sum", 1.0, post_op, [], "",
        )

    monkeypatch.setattr(onednn, "qconv_add", in_place)
    module, inputs = next(p for p in PATTERNS if p.name == "conv2d_add").examples()[2]
    with pytest.raises(AssertionError, match="quantization steps"):
        check_graph_mode_op(module, inputs, "qconv2d_add", backend="onednn")


def test_add_with_alpha_keeps_the_reference_form():
    """``torch.add(conv(x), x, alpha=2)`` has no fused kernel: it stays conv -> add -> quantize."""
    from torch import nn

    from graphquant.testing import check_graph_mode_op

    class ScaledResidual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.add(self.conv(x), x, alpha=2)

    result = check_graph_mode_op(ScaledResidual(), (torch.randn(1, 4, 8, 8),), "quantize_per_tensor")
    assert "qconv2d_add" not in str(result.quantized.graph)
    assert result.max_step_diff <= 1.0 and result.sqnr >= 30.0


def test_shortcut_join_reads_the_shortcut_conv_directly():
    """ResNet's ``conv_b(a) + conv_c(x)``: conv_c is matched after conv_b's join but its output is
    observed first, so the join reads conv_c's uint8 output with no dequantize -> quantize between."""
    from graphquant.patterns import PATTERNS
    from graphquant.testing import check_graph_mode_op

    module, inputs = next(p for p in PATTERNS if p.name == "conv2d_add_relu").examples()[1]
    result = check_graph_mode_op(module, inputs, "qconv2d_add")
    assert str(result.quantized.graph).count("graphquant.quantize_per_tensor.default]") == 1  # the model input only


def test_forward_calls_kernels_directly_and_traces_as_ops():
    """A quantized GraphModule's generated forward calls each kernel without PyTorch's dispatcher
    (kernels/direct.py): the same outputs bit for bit as the op calls, and anything that traces the
    module (torch.export, a dispatch mode) still sees graphquant ops."""
    import copy

    from torch import fx
    from torch.overrides import TorchFunctionMode

    from conftest import calibration_batches, make_net, run_batches

    q = graphquant.quantize_jit(make_net(), {"": graphquant.get_default_qconfig("x86")}, run_batches,
                                [calibration_batches()])
    assert "torch.ops.graphquant" not in q.code and "_gq_qconv2d(" in q.code
    plain = fx.GraphModule(q, copy.deepcopy(q.graph))
    plain.graph._codegen.__class__ = fx.graph._PyTreeCodeGen  # the dispatcher's calls, as before direct calls
    plain.recompile()
    assert "torch.ops.graphquant.qconv2d.default(" in plain.code
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(q(x), plain(x))

    seen: list[str] = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record(), torch.no_grad():
        q(x)
    assert any("graphquant.qconv2d" in name for name in seen), seen[:5]
    program = torch.export.export(q, (x,))
    assert any(getattr(n.target, "namespace", "") == "graphquant" for n in program.graph.nodes)


def test_call_sites_plan_their_onednn_call_per_input_shape(monkeypatch):  # type: ignore[no-untyped-def]
    """A conv or linear call site runs the whole checked kernel once per input shape, then its
    planned oneDNN call (kernels/direct.py): bit for bit the same outputs; a new shape, a replaced
    weight tensor or a scale changed in place take the checked kernel again. (On a CPU whose int8
    kernels saturate, 8-bit activations take the float32 path, which has no plan: 7-bit ones there.)"""
    import copy

    from torch import fx

    from conftest import calibration_batches, make_net, run_batches
    from graphquant.kernels import x86

    qconfig = graphquant.get_default_qconfig("x86", reduce_range=x86.saturates())
    q = graphquant.quantize_jit(make_net(), {"": qconfig}, run_batches, [calibration_batches()])
    plain = fx.GraphModule(q, copy.deepcopy(q.graph))
    plain.graph._codegen.__class__ = fx.graph._PyTreeCodeGen
    plain.recompile()
    checked: list[str] = []
    for name in ("qconv", "qlinear"):
        kernel = getattr(onednn, name)
        monkeypatch.setattr(onednn, name, lambda *a, _k=kernel, _n=name, **kw: checked.append(_n) or _k(*a, **kw))

    def checked_calls(x: torch.Tensor) -> list[str]:
        """The kernels q ran checked on ``x``; q's output against the dispatcher's."""
        checked.clear()
        with torch.no_grad():
            out = q(x)
            seen = list(checked)
            assert torch.equal(out, plain(x))
        return seen

    x = torch.randn(3, 3, 16, 16)
    assert sorted(checked_calls(x)) == ["qconv", "qconv", "qlinear", "qlinear"]  # each call site once
    assert checked_calls(x) == [] and checked_calls(torch.randn(3, 3, 16, 16)) == []  # then planned
    assert len(checked_calls(torch.randn(5, 3, 16, 16))) == 4  # a new shape: checked, then planned
    assert checked_calls(torch.randn(5, 3, 16, 16)) == []
    scale_name = next(n for n, _ in q.named_buffers() if "conv1" in n and "scale" in n)
    setattr(q, scale_name, getattr(q, scale_name).clone())  # a replaced tensor: checked again
    assert checked_calls(x) == ["qconv"] and checked_calls(x) == []
    getattr(q, scale_name).fill_(float("nan"))  # changed in place: checked, and refused
    with pytest.raises(graphquant.GraphQuantError, match="weight scales must be positive and finite"), torch.no_grad():
        q(x)


def test_residual_convs_plan_too_and_check_their_accumulator_on_each_call(monkeypatch):  # type: ignore[no-untyped-def]
    """``relu(conv(x) + x)``: the accumulator (here the block's input) changes on every call, so the
    plan checks it each time and copies it unless donated; outputs bit for bit the dispatcher's."""
    import copy

    from torch import fx

    from graphquant.kernels import direct, registry, x86

    class Residual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x) + x)

    torch.manual_seed(0)
    batches = [torch.randn(2, 8, 6, 6) for _ in range(3)]
    qconfig = graphquant.get_default_qconfig("x86", reduce_range=x86.saturates())
    q = graphquant.quantize_jit(Residual().eval(), {"": qconfig}, lambda m, bs: [m(b) for b in bs], [batches])
    assert "_gq_qconv2d_add(" in q.code
    plain = fx.GraphModule(q, copy.deepcopy(q.graph))
    plain.graph._codegen.__class__ = fx.graph._PyTreeCodeGen
    plain.recompile()
    checked: list[int] = []
    kernel = onednn.qconv_add
    monkeypatch.setattr(onednn, "qconv_add", lambda *a, **kw: checked.append(1) or kernel(*a, **kw))
    with torch.no_grad():
        for i in range(4):
            x = torch.randn(2, 8, 6, 6)
            before = len(checked)
            out = q(x)
            assert len(checked) == before + (i == 0)  # checked once, then planned
            assert torch.equal(out, plain(x))

    call = direct.planned_call(registry.KERNELS["qconv2d_add"])
    w_scale, bias = torch.full((8,), 0.01), torch.zeros(8)
    w = onednn.pack_conv(torch.randint(-127, 127, (8, 8, 1, 1), dtype=torch.int8), w_scale, 0.1, 0, [1, 1], [0, 0],
                         [1, 1], 1, (1, 8, 4, 4))
    x = torch.randint(0, 127, (1, 8, 4, 4), dtype=torch.uint8)
    accum = torch.randint(0, 127, (1, 8, 4, 4), dtype=torch.uint8)
    args = [0.1, 3, w, w_scale, bias, [1, 1], [0, 0], [1, 1], 1, accum, 0.05, 2, 0.2, 5, "relu", False, 127]
    original = accum.clone()
    want = onednn.qconv_add(x, *args)
    assert torch.equal(call(x, *args), want) and torch.equal(call(x, *args), want)  # planned, then its plan
    assert torch.equal(accum, original)  # not donated: the accumulator is left as it was
    args[9] = accum[:, :4]
    with pytest.raises(graphquant.GraphQuantError, match="accum must be a uint8 CPU tensor of the output's shape"):
        call(x, *args)


def test_a_planned_call_still_refuses_what_its_kernel_refuses():
    """The plan is for uint8 inputs of one shape: a float input of that shape takes the checked
    kernel (and its error), not the planned oneDNN call (which would crash the process)."""
    from graphquant.kernels import direct, registry

    call = direct.planned_call(registry.KERNELS["qlinear"])
    w_scale, bias = torch.full((8,), 0.01), torch.zeros(8)
    w = onednn.pack_linear(torch.randint(-127, 127, (8, 16), dtype=torch.int8))
    x = torch.randint(0, 255, (2, 16), dtype=torch.uint8)
    args = (0.1, 3, w, w_scale, bias, 0.2, 5, "relu", [], False, 255)
    want = onednn.qlinear(x, *args[:8])
    assert torch.equal(call(x, *args), want) and torch.equal(call(x, *args), want)  # planned, then its plan
    with pytest.raises(graphquant.GraphQuantError, match="activation must be uint8"):
        call(x.float(), *args)
