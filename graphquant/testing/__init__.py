"""``check_graph_mode_op``: PyTorch's ``checkGraphModeOp`` harness, on graphquant.

Quantizes a module in reference (``debug=True``) and kernel mode, asserts the expected
kernel is in the kernel graph and that both outputs agree within one quantization step
of the output scale, and returns the SQNR of the kernel output against float.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from graphquant.api import quantize, quantize_dynamic
from graphquant.graph import QPARAMS
from graphquant.partial import regions
from graphquant.qconfig import QConfig, get_default_dynamic_qconfig, get_default_qconfig
from graphquant.quant_math import output_sqnr

_DEQUANTIZE = (torch.ops.graphquant.dequantize_per_tensor.default,)


@dataclass
class CheckResult:
    """What ``check_graph_mode_op`` measured. ``float(result)`` is the SQNR in dB."""

    sqnr: float  # kernel output against float, dB
    reference_sqnr: float  # reference output against float, dB
    max_step_diff: float  # largest |kernel - reference| in steps of the output scale
    reference: fx.GraphModule | nn.Module  # a partially quantized model: the user's model with regions
    quantized: fx.GraphModule | nn.Module

    def __float__(self) -> float:
        return self.sqnr


def output_scales(gm: fx.GraphModule) -> list[float | None]:
    """For each flattened graph output, the scale of the dequantize producing it (None if float)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    nodes, _ = tree_flatten(output.args[0])
    scales: list[float | None] = []
    for node in nodes:
        qp = node.meta.get(QPARAMS) if isinstance(node, fx.Node) and node.target in _DEQUANTIZE else None
        scales.append(float(qp.scale) if qp is not None else None)
    return scales


def _largest_scale(gm: fx.GraphModule) -> float:
    scales = [float(n.meta[QPARAMS].scale) for n in gm.graph.nodes if n.target in _DEQUANTIZE and QPARAMS in n.meta]
    return max(scales, default=0.0)


def _graphs(model: nn.Module) -> list[fx.GraphModule]:
    """The quantized graphs of a converted model: itself, or its regions' if it was quantized
    region by region."""
    if isinstance(model, fx.GraphModule):
        return [model]
    return [cast(fx.GraphModule, r.inner) for r in regions(model)]


def _as_batches(inputs: Any) -> list[tuple[Any, ...]]:
    """``(x,)`` is one sample; ``[(x,), (y,)]`` (a list of tuples) is several."""
    if isinstance(inputs, list) and inputs and all(isinstance(b, (tuple, list)) for b in inputs):
        return [tuple(b) for b in inputs]
    if isinstance(inputs, torch.Tensor):
        return [(inputs,)]
    return [tuple(inputs)]


# A float output that no kernel rounds (a dynamic linear's, a linear writing float32 at the border,
# an embedding's rows) differs from the reference only by float32 arithmetic (rescales, the order
# of sums, a bias added in float): measured at most 3e-5 of its largest magnitude over every
# registered pattern, on VNNI and under ONEDNN_MAX_CPU_ISA=AVX2. One "step" of such an output is
# this fraction of it, not a uint8 step of its range, which is about 80x looser and hid int8
# kernels that saturate.
FLOAT_OUTPUT_TOLERANCE = 1e-4


def float_output_step(reference: torch.Tensor) -> float:
    """What one step of an unrounded float output is: ``FLOAT_OUTPUT_TOLERANCE`` of its largest magnitude."""
    return FLOAT_OUTPUT_TOLERANCE * float(reference.abs().max()) if reference.numel() else 0.0


def step_diff(reference: Any, quantized: Any, scales: Sequence[float | None], fallback_scale: float) -> float:
    """Largest ``|quantized - reference|`` over all outputs, in steps of each output's scale."""
    ref_flat, _ = tree_flatten(reference)
    q_flat, _ = tree_flatten(quantized)
    worst = 0.0
    for i, (r, q) in enumerate(zip(ref_flat, q_flat, strict=False)):
        if not isinstance(r, torch.Tensor) or not r.is_floating_point():
            if isinstance(r, torch.Tensor) and not torch.equal(r, q):
                return float("inf")
            continue
        scale = (scales[i] if i < len(scales) else None) or fallback_scale
        diff = float((r - q).abs().max()) if r.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return worst


def check_graph_mode_op(
    module: nn.Module,
    inputs: Any,
    quantized_op: str,
    tracing: bool = False,
    debug: bool = False,
    check: bool = True,
    eval_mode: bool = True,
    dynamic: bool = False,
    qconfig: QConfig | None = None,
    backend: str | None = None,
) -> CheckResult:
    """Quantize ``module`` both ways and check it, as PyTorch's ``checkGraphModeOp`` does.

    ``inputs`` is one sample ``(x,)`` or a list of samples ``[(x1,), (x2,)]``: all are used
    for calibration, the first for the comparison. ``quantized_op`` is the kernel's name as
    the printed graph shows it (``"qconv2d"``, ``"graphquant::qlinear"``). ``tracing=True``
    captures with the first sample up front; ``tracing=False`` captures lazily on the first
    calibration call, as ``quantize_jit`` on a scripted module would. ``dynamic=True`` uses
    dynamic quantization. ``qconfig`` defaults to graphquant's default static qconfig with every matched
    op quantized (``ops="all"``: the op under test runs in int8 wherever a pattern matches it) or to
    :data:`graphquant.default_dynamic_qconfig` (per token), both on 8-bit activations
    (``reduce_range=False``): the same quantized model on every CPU, whose kernels then take each CPU's
    own path for it (on one without VNNI, the exact float32 path the check holds to the reference).
    Where an output is float (dynamic, or a linear's float output at the border) nothing rounds it:
    one step is :data:`FLOAT_OUTPUT_TOLERANCE` of its largest magnitude.
    ``debug=True`` prints both graphs. With ``check=False`` nothing is asserted, only measured.
    A module that does not export whole is quantized region by region (graphquant.partial): the
    op must be in one of its regions, and one step is the largest output scale among them.
    """
    module = copy.deepcopy(module)
    if eval_mode:
        module.eval()
    batches = _as_batches(inputs)
    every_op = replace(get_default_qconfig("x86", reduce_range=False), ops="all")
    qconfig_dict = {"": qconfig or (get_default_dynamic_qconfig(reduce_range=False) if dynamic else every_op)}

    def run_fn(model: nn.Module, data: list[tuple[Any, ...]]) -> None:
        with torch.no_grad():
            for sample in data:
                model(*sample)

    example = batches[0] if tracing or dynamic else None
    if dynamic:
        models = {
            d: quantize_dynamic(module, qconfig_dict, example_inputs=example, debug=d, backend=backend)
            for d in (True, False)
        }
    else:
        models = {
            d: quantize(module, qconfig_dict, run_fn, [batches], example_inputs=example, debug=d, backend=backend)
            for d in (True, False)
        }
    # a GraphModule, or for a model that does not export whole its regions' (graphquant.partial)
    graphs = {d: _graphs(m) for d, m in models.items()}
    if debug:
        print("\n".join(g.code for g in graphs[True]))
        print("\n".join(g.code for g in graphs[False]))
    sample = batches[0]
    with torch.no_grad():
        expected = module(*sample)
        outputs = {d: models[d](*sample) for d in (True, False)}
    # A float output (dynamic quantization, a linear writing float at the border, an embedding with
    # nothing quantized after it) has no output scale and no rounding: float32 arithmetic is all
    # that may differ (FLOAT_OUTPUT_TOLERANCE).
    float_steps = [float_output_step(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else None
                   for t in tree_flatten(outputs[True])[0]]
    whole = isinstance(models[False], fx.GraphModule)
    largest = max(_largest_scale(g) for g in graphs[False]) if graphs[False] else 0.0
    if dynamic:
        scales = float_steps
    elif whole:
        scales = output_scales(graphs[False][0])
        scales = [s if s is not None else (float_steps[i] if i < len(float_steps) else None)
                  for i, s in enumerate(scales)]
    else:  # regions dequantize their outputs, eager float code may follow: one step of the largest scale
        scales = []
    diff = step_diff(outputs[True], outputs[False], scales, largest)
    result = CheckResult(
        output_sqnr(expected, outputs[False]), output_sqnr(expected, outputs[True]), diff, models[True], models[False]
    )
    if check:
        wanted = quantized_op.replace("::", ".")
        ops = "\n".join(str(g.graph) for g in graphs[False])  # the ops (the forward calls kernels directly)
        assert wanted in ops, f"graphquant: expected {quantized_op} in the kernel graph:\n{ops}"
        assert diff <= 1.0 + 1e-4, (
            f"graphquant: kernel and reference outputs differ by {diff:.3f} quantization steps (more than one)"
        )
    return result
