"""Direct kernel calls: a quantized GraphModule's generated ``forward`` calls each ``graphquant::``
op's Python kernel itself instead of going through PyTorch's dispatcher.

A ``torch.ops.graphquant.qconv2d(...)`` call crosses into C++ and back into the Python kernel,
converting every argument twice: measured 11.7 µs of a 71 µs eager conv call (1x32x8x8, the
oneDNN op itself 44.5 µs; ``benchmarks/eager_op_cost.py``). The graph keeps its ``graphquant::``
ops — what ``torch.export``, ``graphquant.save``, the report and ``to_torchscript`` read — and only
the Python code FX generates from it changes: :class:`DirectCalls` (mixed into the graph's own
``CodeGen``, so ``deepcopy`` and ``recompile`` keep it) emits ``_gq_qconv2d(x, ...)`` with every
argument positional, defaults filled in.

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
from torch import fx

from graphquant.graph import is_constant, is_graphquant_op, named_args


def _intercepted() -> bool:
    """Whether a mode or a tracer is watching PyTorch calls (then the op itself must be called)."""
    return (torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled()
            or torch.compiler.is_compiling())  # fmt: skip


def _direct(op: torch._ops.OpOverload, kernel: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        if _intercepted():
            return op(*args)
        return kernel(*args)

    call.__name__ = f"_gq_{op._opname}"
    return call


# shapes planned per call site: a model fed ever new shapes runs the whole kernel past these
PLANNED_SHAPES = 16
# argument positions after the input: the weight, its scales and the bias
_W, _W_SCALE, _BIAS = 2, 3, 4


def planned_call(op: torch._ops.OpOverload) -> Callable[..., Any] | None:
    """A new call site's direct call of ``op`` with its own plans (module docstring), or None where
    ``op`` has none: a call site passes the same constants on every call."""
    from graphquant.kernels.ops import PLANNERS, PYTHON_KERNELS  # ops imports this module's users

    kernel, planner = PYTHON_KERNELS.get(op._opname), PLANNERS.get(op._opname)
    if kernel is None or planner is None:
        return None
    # input shape -> (its call or None: the whole kernel, then the tensors and scale version it was made for)
    plans: dict[torch.Size, tuple[Any, ...]] = {}

    def call(x: torch.Tensor, *args: Any) -> Any:
        if _intercepted():
            return op(x, *args)
        shape, w_scale = x.shape, args[_W_SCALE]
        plan = plans.get(shape)
        fresh = (plan is not None and args[_W] is plan[1] and w_scale is plan[2] and args[_BIAS] is plan[3]
                 and w_scale._version == plan[4])  # fmt: skip
        if fresh and plan[0] is not None and x.dtype is torch.uint8 and x.is_cpu:  # type: ignore[index]
            return plan[0](x, args)  # type: ignore[index]
        out = kernel(x, *args)  # checks everything
        if not fresh and x.dtype is torch.uint8 and x.is_cpu and (plan is not None or len(plans) < PLANNED_SHAPES):
            plans[shape] = (planner(x, *args), args[_W], w_scale, args[_BIAS], w_scale._version)
        return out

    call.__name__ = f"_gq_{op._opname}"
    return call


_CALLS: dict[torch._ops.OpOverload, Callable[..., Any]] = {}


def _plannable(args: tuple[Any, ...], inputs: tuple[int, ...]) -> bool:
    """Whether every argument but the input and ``inputs`` (positions after the input: a residual
    conv's accumulator, which its plan checks on each call) is a constant: a tensor read from the
    module (weight, scales, bias) or a number or list in the code (no value computed by the graph)."""
    for i, arg in enumerate(args[1:]):
        if i in inputs:
            continue
        if i in (_W, _W_SCALE) or (i == _BIAS and arg is not None):
            if not is_constant(arg):
                return False
        elif isinstance(arg, fx.Node) or (isinstance(arg, (list, tuple)) and any(isinstance(a, fx.Node) for a in arg)):
            return False
    return True


def _call_for(op: torch._ops.OpOverload, args: tuple[Any, ...] = ()) -> Callable[..., Any] | None:
    """The direct call of ``op`` for a call site with ``args`` (its own, with plans, where ``op`` has
    a planner and the arguments allow one), or None where ``op`` has no Python kernel."""
    from graphquant.kernels.ops import PLANNED_INPUTS, PYTHON_KERNELS  # ops imports this module's users

    kernel = PYTHON_KERNELS.get(op._opname)
    if kernel is None:
        return None
    planned = planned_call(op) if args and _plannable(args, PLANNED_INPUTS.get(op._opname, ())) else None
    if planned is not None:
        return planned
    if op not in _CALLS:
        _CALLS[op] = _direct(op, kernel)
    return _CALLS[op]


class DirectCalls(fx.graph.CodeGen):
    """Mixed into a graph's ``CodeGen``: ``graphquant::`` calls become direct kernel calls in the
    generated source (module docstring); everything else is generated by the base class."""

    def _gen_python_code(self, nodes: Any, root_module: str, namespace: Any, **kwargs: Any) -> Any:
        swapped: list[tuple[fx.Node, Any, tuple[Any, ...], dict[str, Any]]] = []
        try:
            for node in nodes:
                if node.op != "call_function" or not is_graphquant_op(node.target):
                    continue
                args = tuple(named_args(node).values())
                call = _call_for(node.target, args)
                if call is None:
                    continue
                swapped.append((node, node.target, node.args, dict(node.kwargs)))
                node.target, node.args, node.kwargs = call, args, {}
            return super()._gen_python_code(nodes, root_module, namespace, **kwargs)
        finally:
            for node, target, args, node_kwargs in swapped:
                node.target, node.args, node.kwargs = target, args, node_kwargs


_CLASSES: dict[type, type] = {}


def install(gm: fx.GraphModule) -> None:
    """Generate ``gm``'s ``forward`` with direct kernel calls (idempotent)."""
    codegen = gm.graph._codegen
    base = type(codegen)
    if not isinstance(codegen, DirectCalls):
        if base not in _CLASSES:
            _CLASSES[base] = type(f"DirectCalls{base.__name__}", (DirectCalls, base), {})
        codegen.__class__ = _CLASSES[base]
    gm.recompile()
