"""Direct kernel calls: a quantized GraphModule's generated ``forward`` calls each ``graphquant::``
op's Python kernel itself instead of going through PyTorch's dispatcher.

A ``torch.ops.graphquant.qconv2d(...)`` call crosses into C++ and back into the Python kernel,
converting every argument twice: measured 11.7 µs of a 71 µs eager conv call (1x32x8x8, the
oneDNN op itself 44.5 µs; ``benchmarks/eager_op_cost.py``). The graph keeps its ``graphquant::``
ops — what ``torch.export``, ``graphquant.save``, the report and ``to_torchscript`` read — and only
the Python code FX generates from it changes: :class:`graphquant.runtimes.DirectCalls` (mixed into
the graph's own ``CodeGen``, so ``deepcopy`` and ``recompile`` keep it) emits ``_gq_qconv2d(x, ...)``
with every argument positional, defaults filled in, calling what :func:`call_for` gives.

Each direct call falls back to the op while anything intercepts PyTorch calls — ``torch.export``,
``torch.compile``, a ``FakeTensorMode`` or another dispatch or function mode — so tracing the
module sees the ops as before.

**Plans.** An int8 conv or linear call site whose arguments other than the input are constants
(the packed weight, scales and bias read from the module, numbers in the code; a residual conv's
accumulator aside, which changes from call to call and is checked on each) gets a call of its
own that keeps, per input shape, the kernel's oneDNN call with every argument resolved
(:func:`graphquant.kernels.onednn.qconv_plan` / ``qlinear_plan``), made once after the kernel's
checks. A later input of that shape (uint8, on the CPU, the module's same weight, scale and bias
tensors, the scales not changed in place) goes straight to that call; anything else runs the whole
kernel, checks included. The checks and shape arithmetic measured 12-13 µs of a 57 µs eager conv
call (1x32x8x8; ``benchmarks/eager_op_cost.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from graphquant.kernels.registry import Kernel


def _intercepted() -> bool:
    """Whether a mode or a tracer is watching PyTorch calls (then the op itself must be called)."""
    return (torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled()
            or torch.compiler.is_compiling())


def _direct(kernel: Kernel) -> Callable[..., Any]:
    op, eager = kernel.op, kernel.eager

    def call(*args: Any) -> Any:
        if _intercepted():
            return op(*args)
        return eager(*args)

    call.__name__ = f"_gq_{kernel.name}"
    return call


# shapes planned per call site: a model fed ever new shapes runs the whole kernel past these
PLANNED_SHAPES = 16
# argument positions after the input: the weight, its scales and the bias
W, W_SCALE, BIAS = 2, 3, 4


def planned_call(kernel: Kernel) -> Callable[..., Any]:
    """A new call site's direct call of ``kernel`` (which has a planner) with its own plans (module
    docstring): a call site passes the same constants on every call."""
    assert kernel.planner is not None
    op, eager, planner = kernel.op, kernel.eager, kernel.planner
    # input shape -> (its call or None: the whole kernel, then the tensors and scale version it was made for)
    plans: dict[torch.Size, tuple[Any, ...]] = {}

    def call(x: torch.Tensor, *args: Any) -> Any:
        if _intercepted():
            return op(x, *args)
        shape, w_scale = x.shape, args[W_SCALE]
        plan = plans.get(shape)
        fresh = (plan is not None and args[W] is plan[1] and w_scale is plan[2] and args[BIAS] is plan[3]
                 and w_scale._version == plan[4])
        if fresh and plan[0] is not None and x.dtype is torch.uint8 and x.is_cpu:  # type: ignore[index]
            return plan[0](x, args)  # type: ignore[index]
        out = eager(x, *args)  # checks everything
        if not fresh and x.dtype is torch.uint8 and x.is_cpu and (plan is not None or len(plans) < PLANNED_SHAPES):
            plans[shape] = (planner(x, *args), args[W], w_scale, args[BIAS], w_scale._version)
        return out

    call.__name__ = f"_gq_{kernel.name}"
    return call


_CALLS: dict[str, Callable[..., Any]] = {}


def call_for(kernel: Kernel, plannable: bool) -> Callable[..., Any]:
    """The direct call of ``kernel`` for one call site: its own, with plans, where the kernel has a
    planner and the site's arguments other than the input (and ``kernel.planned_inputs``) are
    constants (``plannable``); else the one shared call of the kernel."""
    if plannable and kernel.planner is not None:
        return planned_call(kernel)
    if kernel.name not in _CALLS:
        _CALLS[kernel.name] = _direct(kernel)
    return _CALLS[kernel.name]
