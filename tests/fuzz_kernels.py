"""Fuzz the int8 kernel wrappers with hypothesis; run as a child process by
tests/test_reliability.py, so that a crash (oneDNN's SIGSEGV on malformed input) kills the
child, not the test run.

    python tests/fuzz_kernels.py SECONDS LAST_CASE_FILE [SEED]

Drives ``graphquant.kernels.onednn`` / ``portable`` / ``dynamic`` / ``elementwise`` and the
``torch.ops.graphquant`` schemas of the kernel records (``kernels/registry.py``) with random shapes, dtypes (right and
wrong), qparams (zero, negative, NaN and infinite scales; zero points out of range) and
weights (packed, plain int8, float, packed for another op or shape). A ``GraphQuantError`` is
a refusal; any other exception is a finding. Conv and linear cases break one argument at a
time (or none): a broken case that runs is a finding (a guard is missing), a valid one that is
refused is a finding, and a valid one's result is held to the portable kernel's exact integer
math within one output step. Before each call the case is written to LAST_CASE_FILE, so the
parent can name the case that killed the child. Prints one JSON line:
``{"cases": n, "ok": n, "refused": n, "checked": n, "findings": [...]}``.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections import Counter
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

import graphquant  # noqa: F401  (registers torch.ops.graphquant)
from graphquant.errors import GraphQuantError
from graphquant.kernels import dynamic, elementwise, onednn, portable

warnings.simplefilter("ignore")
torch.set_num_threads(1)

HAS_ONEDNN = onednn.available()
# mostly valid, so that the kernels run as often as their guards refuse
_GOOD_SCALES = st.floats(1e-4, 1.0)
_ODD_SCALES = st.sampled_from([0.0, -0.1, math.nan, math.inf, 1e-30, 1e30])
SCALES = st.one_of(_GOOD_SCALES, _GOOD_SCALES, _GOOD_SCALES, _ODD_SCALES)
ZERO_POINTS = st.one_of(st.integers(0, 255), st.integers(0, 255), st.sampled_from([-1, 256, 1000, -(2**31)]))
X_DTYPES = st.sampled_from([torch.uint8] * 4 + [torch.int8, torch.float32, torch.float64, torch.int32])
POST_OPS = st.sampled_from([
    ("none", []), ("relu", []), ("hardtanh", [0.0, 6.0]), ("hardswish", []), ("silu", []), ("gelu", []),
    ("gelu_tanh", []), ("leaky_relu", [0.1]), ("hardtanh", [1.0, -1.0]), ("elu", []), ("relu", [1.0]),
])
OUT_QPARAMS = st.tuples(SCALES, ZERO_POINTS)


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=dtype, generator=gen)
    if dtype in (torch.int8, torch.int32):
        return torch.randint(-128, 128, shape, generator=gen).to(dtype)
    return torch.randn(shape, generator=gen).to(dtype)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced" and x.dim() >= 2:
        return torch.cat([x, x], dim=-1)[..., ::2]
    return x


@st.composite
def _w_scale(draw: Any, n: int, valid: bool | None = None) -> torch.Tensor:
    """One float32 scale per channel; ``valid=False`` a wrong one, ``None`` either."""
    bad = ["short", "float64", "2d", "zero", "nan", "negative"]
    kinds = {True: ["ok"], False: bad, None: ["ok"] * 6 + bad}[valid]
    kind = draw(st.sampled_from(kinds))
    scale = torch.rand(n) * 0.01 + 1e-4
    if kind == "short":
        return scale[: max(n - 1, 0)]
    if kind == "float64":
        return scale.double()
    if kind == "2d":
        return scale.reshape(1, -1)
    if kind in ("zero", "nan", "negative") and n > 0:
        scale[0] = {"zero": 0.0, "nan": math.nan, "negative": -0.5}[kind]
    return scale


@st.composite
def _bias(draw: Any, n: int, valid: bool | None = None) -> torch.Tensor | None:
    kinds = {True: ["none", "ok", "huge"], False: ["short", "float64"],
             None: ["none", "ok", "ok", "short", "float64", "huge"]}[valid]
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return None
    bias = torch.randn(n)
    if kind == "short":
        return bias[: max(n - 1, 0)]
    if kind == "float64":
        return bias.double()
    return bias * 1e12 if kind == "huge" else bias


def _conv_weight(fuzz: Fuzz, kind: str, out_c: int, in_c: int, kernel: list[int], groups: int, w_scale: torch.Tensor,
                 conv_args: tuple[list[int], list[int], list[int]], gen: torch.Generator, x_scale: float,
                 x_zero_point: int, valid: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv weight of ``kind`` (packed for oneDNN with the call's activation qparams, plain int8,
    float, packed for a linear, packed with another shape, or int8 of the wrong rank) and the
    plain int8 weight behind it."""
    shape = (out_c, max(in_c // max(groups, 1), 1), *kernel)
    w8 = _tensor(shape, torch.int8, gen)
    if kind == "int8":
        return w8, w8
    if kind == "float32":
        return w8.float(), w8
    if kind == "int8_wrong_rank":
        return w8.flatten(1), w8
    if not HAS_ONEDNN:
        return w8, w8
    if kind == "packed_linear":
        return onednn.pack_linear(w8.flatten(1)), w8
    if kind == "packed_other_shape":
        w8 = _tensor((out_c + 1, *shape[1:]), torch.int8, gen)
    case = {"w": _describe(w8), "w_scale": _describe(w_scale), "args": conv_args, "groups": groups}
    packed = fuzz.call("onednn.pack_conv", onednn.pack_conv, case, w8, w_scale, x_scale, x_zero_point, *conv_args,
                       groups, expect="ok" if valid else None)
    return (w8 if packed is None else packed), w8  # refused to pack: the kernel gets the plain weight


class Fuzz:
    """Outcome counts and findings; the case being run is in ``last_case``."""

    def __init__(self, last_case_file: str) -> None:
        self.last_case_file = last_case_file
        self.outcomes: Counter[str] = Counter()
        self.findings: list[dict[str, str]] = []

    def call(self, op: str, fn: Any, case: dict[str, Any], *args: Any, expect: str | None = None,
             want: Any = None) -> Any:
        """``fn(*args)``, or ``None`` when it raised; the outcome counted, a finding recorded.
        ``expect="refused"``: it must raise a ``GraphQuantError``; ``expect="ok"``: it must run,
        and give ``want()`` (the portable kernel) within one step where ``want`` is set."""
        text = f"{op} {json.dumps(case, default=str)}"
        with open(self.last_case_file, "w") as f:
            f.write(text)
        try:
            result = fn(*args)
        except GraphQuantError as error:
            self.outcomes["refused"] += 1
            if expect == "ok":
                self._finding(op, f"refused a valid case: {str(error)[:300]}", text)
            return None
        except Exception as error:  # noqa: BLE001 - the point: any other type is a finding
            self.outcomes["other"] += 1
            self._finding(op, f"{type(error).__name__}: {str(error)[:300]}", text)
            return None
        self.outcomes["ok"] += 1
        if expect == "refused":
            self._finding(op, f"accepted a case with a broken {case.get('broken')}", text)
        elif expect == "ok" and want is not None:
            self._check(op, result, want(), text)
        return result

    def _check(self, op: str, got: torch.Tensor, want: torch.Tensor, text: str) -> None:
        self.outcomes["checked"] += 1
        if got.shape != want.shape or got.dtype != want.dtype:
            self._finding(op, f"result {got.dtype} {tuple(got.shape)}, portable {want.dtype} {tuple(want.shape)}", text)
        elif got.numel() and int((got.int() - want.int()).abs().max()) > 1:
            self._finding(op, f"{int((got.int() - want.int()).abs().max())} steps from the portable kernel", text)

    def _finding(self, op: str, error: str, text: str) -> None:
        if len(self.findings) < 50:
            self.findings.append({"op": op, "error": error, "case": text})


def _describe(x: torch.Tensor) -> str:
    return f"{x.dtype} {tuple(x.shape)} mkldnn={x.is_mkldnn} contiguous={x.is_contiguous()}"


class _Picker:
    """Draws each argument from its valid strategy, except the one field this case breaks (if any):
    one fault at a time reaches the check meant for it, and half the cases are valid and run."""

    def __init__(self, data: Any, fields: list[str]) -> None:
        self.data = data
        self.broken = data.draw(st.sampled_from([None] * len(fields) + fields), "broken")

    def __call__(self, name: str, good: Any, bad: Any) -> Any:
        return self.data.draw(bad if name == self.broken else good, name)


_CONV_FIELDS = ["x_dtype", "channels", "n_args", "stride", "padding", "dilation", "groups", "w_kind", "w_scale",
                "bias", "x_scale", "x_zp", "out", "post_op", "spatial"]
_BAD_SCALES = st.sampled_from([0.0, -0.1, math.nan, math.inf, -math.inf])  # (1e-30 and 1e30 are valid)
_BAD_ZERO_POINTS = st.sampled_from([-1, 256, 1000, -(2**31)])
_GOOD_POST_OPS = st.sampled_from([("none", []), ("relu", []), ("hardtanh", [0.0, 6.0]), ("hardswish", []),
                                  ("silu", []), ("gelu", []), ("gelu_tanh", []), ("leaky_relu", [0.1])])
_BAD_POST_OPS = st.sampled_from([("hardtanh", [1.0, -1.0]), ("elu", []), ("relu", [1.0]), ("hardtanh", [0.0])])


def conv_test(fuzz: Fuzz) -> Any:
    @given(st.data())
    def run(data: Any) -> None:
        pick = _Picker(data, _CONV_FIELDS)
        dim = data.draw(st.sampled_from([1, 2, 2, 3]), "dim")
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), "seed"))
        batch = data.draw(st.integers(0, 2), "batch")
        groups = pick("groups", st.sampled_from([1, 1, 2]), st.sampled_from([0, -1]))
        in_c = data.draw(st.integers(1, 4), "in_c") * max(abs(groups), 1)
        out_c = data.draw(st.integers(1, 4), "out_c") * max(abs(groups), 1)
        kernel = [data.draw(st.integers(1, 3)) for _ in range(dim)]
        n_args = pick("n_args", st.just(dim), st.sampled_from([dim - 1, dim + 1]))
        stride = [pick("stride", st.sampled_from([1, 2]), st.sampled_from([0, -1])) for _ in range(n_args)]
        padding = [pick("padding", st.sampled_from([0, 1]), st.just(-1)) for _ in range(n_args)]
        dilation = [pick("dilation", st.sampled_from([1, 1, 2]), st.sampled_from([0, -2])) for _ in range(n_args)]
        # valid: at least one output position ((k - 1) * dilation + 1 <= size + 2 * padding)
        reach = [(k - 1) * (dilation[i] if i < n_args and dilation[i] > 0 else 1) + 1
                 - 2 * (padding[i] if i < n_args and padding[i] > 0 else 0) for i, k in enumerate(kernel)]
        spatial = [pick("spatial", st.integers(max(r, 1), max(r, 1) + 4), st.just(0)) for r in reach]
        x_in_c = pick("channels", st.just(in_c), st.just(in_c + 1))
        x_dtype = pick("x_dtype", st.just(torch.uint8), st.sampled_from([torch.int8, torch.float32, torch.float64,
                                                                         torch.int32]))
        x = _layout(_tensor((batch, x_in_c, *spatial), x_dtype, gen),
                    data.draw(st.sampled_from(["contiguous", "channels_last", "sliced"]), "layout"))
        w_scale = pick("w_scale", _w_scale(out_c, valid=True), _w_scale(out_c, valid=False))
        bias = pick("bias", _bias(out_c, valid=True), _bias(out_c, valid=False))
        kind = pick("w_kind", st.sampled_from(["packed", "packed", "int8"]),
                    st.sampled_from(["float32", "packed_linear", "packed_other_shape", "int8_wrong_rank"]))
        x_scale, x_zp = pick("x_scale", _GOOD_SCALES, _BAD_SCALES), pick("x_zp", st.integers(0, 255), _BAD_ZERO_POINTS)
        w, w8 = _conv_weight(fuzz, kind, out_c, in_c, kernel, groups, w_scale, (stride, padding, dilation), gen,
                             x_scale, x_zp, pick.broken is None)
        out_scale, out_zp = pick("out", st.tuples(_GOOD_SCALES, st.integers(0, 255)),
                                 st.one_of(st.tuples(_BAD_SCALES, st.integers(0, 255)),
                                           st.tuples(_GOOD_SCALES, _BAD_ZERO_POINTS)))
        post_op, post_op_args = pick("post_op", _GOOD_POST_OPS, _BAD_POST_OPS)
        case = {"x": _describe(x), "w": _describe(w), "w_scale": _describe(w_scale), "bias": None if bias is None
                else _describe(bias), "stride": stride, "padding": padding, "dilation": dilation, "groups": groups,
                "x_qparams": (x_scale, x_zp), "out_qparams": (out_scale, out_zp),
                "post_op": (post_op, post_op_args), "broken": pick.broken}
        args = (x, x_scale, x_zp, w, w_scale, bias, stride, padding, dilation, groups)
        op = data.draw(st.sampled_from(["schema", "onednn", "portable", "add", "transpose"]), "entry")
        rest = (out_scale, out_zp, post_op, post_op_args)

        def want() -> torch.Tensor:  # exact integer math on the same integers
            return portable.qconv(x, x_scale, x_zp, w8, w_scale, bias, stride, padding, dilation, groups, *rest)

        # one broken argument must be refused; a valid case must run and match the portable kernel
        # (the oneDNN entry wants a packed weight, the portable entry a plain one)
        wrong_weight = (op == "onednn" and not w.is_mkldnn) or (op == "portable" and w.is_mkldnn)
        expect = "refused" if pick.broken is not None or wrong_weight else "ok"
        if op == "schema":
            schema = getattr(torch.ops.graphquant, f"qconv{dim}d").default
            fuzz.call(f"graphquant::qconv{dim}d", schema, case, *args, *rest, expect=expect, want=want)
        elif op == "onednn" and HAS_ONEDNN:
            fuzz.call("onednn.qconv", onednn.qconv, case, *args, *rest, expect=expect, want=want)
        elif op == "portable":
            fuzz.call("portable.qconv", portable.qconv, case, *args, *rest, expect=expect, want=want)
        elif op == "add":
            accum_shape = data.draw(st.sampled_from(["fit", "fit", "small", "float"]), "accum")
            accum = _tensor((batch, out_c, *[max(s - k + 1, 1) for s, k in zip(spatial, kernel, strict=True)]),
                            torch.float32 if accum_shape == "float" else torch.uint8, gen)
            if accum_shape == "small":
                accum = accum[:, :1]
            case["accum"] = _describe(accum)
            add_args = (*args, accum, data.draw(SCALES), data.draw(ZERO_POINTS), out_scale, out_zp, post_op)
            backend = onednn if w.is_mkldnn else portable
            schema = getattr(torch.ops.graphquant, f"qconv{dim}d_add", None)
            if schema is not None and data.draw(st.booleans(), "via_schema"):
                fuzz.call(f"graphquant::qconv{dim}d_add", schema.default, case, *add_args)
            else:
                fuzz.call(f"{backend.__name__.rpartition('.')[2]}.qconv_add", backend.qconv_add, case, *add_args)
        else:
            output_padding = [data.draw(st.sampled_from([0, 0, 1, 5])) for _ in range(n_args)]
            wt = w if kind != "packed" else _tensor((in_c, max(out_c // max(groups, 1), 1), *kernel), torch.int8, gen)
            t_scale = data.draw(_w_scale(in_c), "t_scale")
            case.update(w=_describe(wt), w_scale=_describe(t_scale), output_padding=output_padding)
            schema = getattr(torch.ops.graphquant, f"qconv_transpose{dim}d").default
            fuzz.call(f"graphquant::qconv_transpose{dim}d", schema, case, x, x_scale, x_zp, wt, t_scale, bias, stride,
                      padding, output_padding, groups, dilation, out_scale, out_zp, post_op, post_op_args)

    return run


_VALID_POST_OPS = [("none", []), ("relu", []), ("hardtanh", [0.0, 6.0]), ("hardswish", []), ("silu", []), ("gelu", []),
                   ("gelu_tanh", []), ("leaky_relu", [0.1])]


def _valid_scale(w_scale: torch.Tensor, n: int) -> bool:
    return (w_scale.dtype == torch.float32 and w_scale.shape == (n,)
            and bool(((w_scale > 0) & (w_scale < math.inf)).all()))


def linear_test(fuzz: Fuzz) -> Any:
    @given(st.data())
    def run(data: Any) -> None:
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), "seed"))
        lead = [data.draw(st.integers(0, 3)) for _ in range(data.draw(st.integers(0, 2), "rank"))]
        in_f, out_f = data.draw(st.integers(1, 8), "in"), data.draw(st.integers(1, 8), "out")
        x_in = data.draw(st.sampled_from([in_f, in_f, in_f, in_f + 1]), "x_in")
        w_kind = data.draw(st.sampled_from(["packed"] * 3 + ["int8", "int8", "float32", "float16", "3d",
                                                           "packed_conv"]), "w_kind")
        w8 = _tensor((out_f, in_f), torch.int8, gen)
        kinds = {"int8": w8, "float32": w8.float(), "float16": w8.half(), "3d": w8.unsqueeze(0)}
        w: torch.Tensor = kinds.get(w_kind, w8)
        if HAS_ONEDNN and w_kind == "packed":
            w = onednn.pack_linear(w8)
        elif HAS_ONEDNN and w_kind == "packed_conv":
            w = onednn.pack_conv(w8.reshape(out_f, in_f, 1, 1), torch.ones(out_f), 0.1, 0, [1, 1], [0, 0], [1, 1], 1)
        w_scale, bias = data.draw(_w_scale(out_f), "w_scale"), data.draw(_bias(out_f), "bias")
        entry = data.draw(st.sampled_from(["schema", "onednn", "portable", "dynamic", "dynamic_schema", "fp16"]))
        if entry.startswith("dynamic") or entry == "fp16":
            dtype = data.draw(st.sampled_from([torch.float32] * 3 + [torch.float64, torch.float16, torch.uint8]))
            x = _layout(_tensor((*lead, x_in), dtype, gen), data.draw(st.sampled_from(["contiguous", "sliced"])))
            if data.draw(st.booleans(), "special_values") and x.is_floating_point() and x.numel():
                x.view(-1)[0] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e38]))
            case = {"x": _describe(x), "w": _describe(w), "w_scale": _describe(w_scale),
                    "bias": None if bias is None else _describe(bias)}
            per_token = data.draw(st.booleans(), "per_token")
            if entry == "dynamic":
                fuzz.call("dynamic.qlinear_dynamic", dynamic.qlinear_dynamic, case, x, w, w_scale, bias, per_token)
            elif entry == "dynamic_schema":
                fuzz.call("graphquant::qlinear_dynamic", torch.ops.graphquant.qlinear_dynamic.default, case, x, w,
                          w_scale, bias, per_token)
            else:
                fuzz.call("graphquant::linear_fp16", torch.ops.graphquant.linear_fp16.default, case, x, w, bias)
            return
        x = _layout(_tensor((*lead, x_in), data.draw(X_DTYPES, "x_dtype"), gen),
                    data.draw(st.sampled_from(["contiguous", "sliced"]), "layout"))
        x_scale, x_zp = data.draw(SCALES), data.draw(ZERO_POINTS)
        out_scale, out_zp = data.draw(OUT_QPARAMS)
        post_op, post_op_args = data.draw(POST_OPS)
        case = {"x": _describe(x), "w": _describe(w), "w_scale": _describe(w_scale), "bias": None if bias is None
                else _describe(bias), "x_qparams": (x_scale, x_zp), "out_qparams": (out_scale, out_zp),
                "post_op": (post_op, post_op_args)}
        args = (x, x_scale, x_zp, w, w_scale, bias, out_scale, out_zp, post_op, post_op_args)
        # every argument valid: it must run and match the portable kernel; any fault: refused
        weight_ok = {"schema": w_kind in ("packed", "int8"), "onednn": w_kind == "packed" and HAS_ONEDNN,
                     "portable": w_kind == "int8" or (w_kind == "packed" and not HAS_ONEDNN)}[entry]
        valid = (weight_ok and x.dtype == torch.uint8 and x_in == in_f and _valid_scale(w_scale, out_f)
                 and (bias is None or (bias.dtype == torch.float32 and bias.shape == (out_f,)))
                 and all(0.0 < s < math.inf for s in (x_scale, out_scale)) and 0 <= x_zp <= 255
                 and 0 <= out_zp <= 255 and (post_op, post_op_args) in _VALID_POST_OPS)
        case["broken"] = None if valid else "one or more arguments"
        expect = "ok" if valid else "refused"

        def want() -> torch.Tensor:
            return portable.qlinear(x, x_scale, x_zp, w8, w_scale, bias, out_scale, out_zp, post_op, post_op_args)

        if entry == "schema":
            fuzz.call("graphquant::qlinear", torch.ops.graphquant.qlinear.default, case, *args, expect=expect,
                      want=want)
        elif entry == "onednn":
            fuzz.call("onednn.qlinear", onednn.qlinear, case, *args, expect=expect, want=want)
        else:
            fuzz.call("portable.qlinear", portable.qlinear, case, *args, expect=expect, want=want)

    return run


def quantize_test(fuzz: Fuzz) -> Any:
    """quantize / dequantize schemas and the uint8 elementwise kernels."""

    @given(st.data())
    def run(data: Any) -> None:
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), "seed"))
        shape = tuple(data.draw(st.integers(0, 4)) for _ in range(data.draw(st.integers(0, 3), "rank")))
        dtype = data.draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.float16, torch.uint8,
                                           torch.int8]), "dtype")
        x = _tensor(shape, dtype, gen)
        scale, zp = data.draw(SCALES), data.draw(ZERO_POINTS)
        qdtype = data.draw(st.sampled_from([torch.uint8, torch.int8, torch.int32, torch.float32]), "qdtype")
        qmin, qmax = data.draw(st.sampled_from([(0, 255), (-128, 127), (255, 0), (0, 1000)]), "qrange")
        case = {"x": _describe(x), "scale": scale, "zero_point": zp, "dtype": str(qdtype), "range": (qmin, qmax)}
        op = data.draw(st.sampled_from(["q", "dq", "qc", "dqc", "qdyn", "add", "mul", "cat"]), "op")
        ops = torch.ops.graphquant
        if op == "q":
            fuzz.call("graphquant::quantize_per_tensor", ops.quantize_per_tensor.default, case, x, scale, zp, qmin,
                      qmax, qdtype)
        elif op == "dq":
            fuzz.call("graphquant::dequantize_per_tensor", ops.dequantize_per_tensor.default, case, x, scale, zp)
        elif op in ("qc", "dqc"):
            axis = data.draw(st.integers(-1, 3), "axis")
            n = shape[axis] if -len(shape) <= axis < len(shape) else 1
            n = data.draw(st.sampled_from([n, n, n + 1]), "n")
            scales = data.draw(_w_scale(n), "scales")
            zps = torch.full((n,), zp if abs(zp) < 2**20 else 0, dtype=torch.int64)
            case.update(axis=axis, scales=_describe(scales))
            if op == "qc":
                fuzz.call("graphquant::quantize_per_channel", ops.quantize_per_channel.default, case, x, scales, zps,
                          axis, qmin, qmax, qdtype)
            else:
                fuzz.call("graphquant::dequantize_per_channel", ops.dequantize_per_channel.default, case, x, scales,
                          zps, axis)
        elif op == "qdyn":
            fuzz.call("graphquant::quantize_dynamic", ops.quantize_dynamic.default, case, x, data.draw(st.booleans()))
        else:
            other_shape = data.draw(st.sampled_from([shape, shape, shape[1:], (*shape, 2)]), "other_shape")
            y = _tensor(other_shape, data.draw(st.sampled_from([torch.uint8, torch.uint8, torch.float32])), gen)
            out_scale, out_zp = data.draw(OUT_QPARAMS)
            post_op = data.draw(st.sampled_from(["none", "relu", "gelu"]))
            case.update(y=_describe(y), out_qparams=(out_scale, out_zp), post_op=post_op)
            if op == "add":
                fuzz.call("graphquant::qadd", ops.qadd.default, case, x, scale, zp, y, scale, zp, 1.0, out_scale,
                          out_zp, post_op)
            elif op == "mul":
                fuzz.call("graphquant::qmul", ops.qmul.default, case, x, scale, zp, y, scale, zp, out_scale, out_zp,
                          post_op)
            else:
                dim = data.draw(st.integers(-2, 2), "cat_dim")
                fuzz.call("graphquant::qcat", elementwise.qcat, case, [x, y], [scale, 0.1], [zp, 0], dim, out_scale,
                          out_zp)

    return run


def main(seconds: float, last_case_file: str, base_seed: int) -> None:
    fuzz = Fuzz(last_case_file)
    stop = time.monotonic() + seconds
    tests = [conv_test, linear_test, quantize_test]
    round_ = 0
    while time.monotonic() < stop:
        test = tests[round_ % len(tests)](fuzz)  # a fresh function: settings and seed decorate it once
        configured = settings(max_examples=60, deadline=None, database=None, phases=[Phase.generate],
                              suppress_health_check=list(HealthCheck))(test)
        seed(base_seed + round_)(configured)()  # a round is reproducible from SEED and its number
        round_ += 1
    print(json.dumps({"cases": fuzz.outcomes["ok"] + fuzz.outcomes["refused"] + fuzz.outcomes["other"],
                      "ok": fuzz.outcomes["ok"], "refused": fuzz.outcomes["refused"],
                      "checked": fuzz.outcomes["checked"], "findings": fuzz.findings}))


if __name__ == "__main__":
    main(float(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
