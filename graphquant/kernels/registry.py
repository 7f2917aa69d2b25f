"""The kernel record: everything graphquant knows about one ``graphquant::`` op, in one entry
beside the op's code, and every per-op table derived from the records.

A :class:`Kernel` is the kernel-side twin of :class:`graphquant.graph.Pattern`. Registering one
defines the op in ``torch.ops.graphquant`` (its schema), gives torch its fake (shape) function and
its eager implementation, and makes it known to every runtime:

- the eager ``GraphModule`` calls ``eager`` directly, and where the record has a ``planner``, each
  call site keeps its oneDNN call per input shape (:mod:`graphquant.kernels.direct`);
- TorchScript (``graphquant.to_torchscript``) calls ``torchscript``, a body in TorchScript's subset
  of Python made of aten and ``onednn::`` calls only (no graphquant at load time);
- the compiler (``graphquant.compile``) traces the same ``torchscript`` body into the aten and
  ``onednn::`` calls Inductor sees.

A ``gemm`` kernel runs oneDNN's uint8 x int8 GEMM or conv where its weight is packed; its path
depends on the CPU (:mod:`graphquant.kernels.x86`), so its ``torchscript`` body takes two more
arguments after the schema's: ``packed`` (whether the weight is a packed oneDNN weight, fixed
when the graph is written out) and ``saturates`` (the CPU's answer, asked where the graph runs).

Adding an int8 op is a record here (and its pattern row in ``graphquant/patterns``); the
op-name tables of the report, the observers, the TorchScript writer, the compiler and kernel
timing are all read from :data:`KERNELS`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch.library import Library, register_fake

LIB = Library("graphquant", "DEF")
_KEY = "CompositeExplicitAutograd"
# the arguments a gemm kernel's torchscript body takes after the schema's (module docstring)
GEMM_RUNTIME_ARGS = ("packed", "saturates")


@dataclass(frozen=True)
class Kernel:
    """One ``graphquant::`` op (module docstring).

    ``schema`` is the op's argument list and returns, ``"(Tensor x, ...) -> Tensor"``. ``fake``
    gives the output's shape and dtype for tracing; ``eager`` checks its arguments (oneDNN crashes
    the process on malformed input) and computes; ``torchscript`` is the same computation in
    TorchScript's subset, also traced by the compiler. ``planner`` (oneDNN kernels) makes a call
    site's call for one input shape (:mod:`graphquant.kernels.direct`); ``planned_inputs`` are
    argument positions after the input that change from call to call and which the plan checks
    on each (a residual conv's accumulator). Flags: ``gemm`` (module docstring), ``weighted`` (it
    reads a quantized weight ``w``), ``bias_corrected`` (the rounding of its weight can be taken
    off its bias: ``passes/bias_correction``), ``timed`` (``graphquant.time_kernels`` times it
    against its float op).
    """

    name: str
    schema: str
    fake: Callable[..., Any]
    eager: Callable[..., Any]
    torchscript: Callable[..., Any]
    planner: Callable[..., Any] | None = None
    planned_inputs: tuple[int, ...] = ()
    gemm: bool = False
    weighted: bool = False
    bias_corrected: bool = False
    timed: bool = False

    def __post_init__(self) -> None:
        if self.name in KERNELS:
            raise ValueError(f"graphquant: kernel {self.name} registered twice")
        if self.planner is None and self.planned_inputs:
            raise ValueError(f"graphquant: kernel {self.name}: planned_inputs without a planner")
        if (self.gemm or self.bias_corrected) and not self.weighted:
            raise ValueError(f"graphquant: kernel {self.name}: gemm and bias_corrected kernels read a weight")
        if self.gemm and self.runtime_args != GEMM_RUNTIME_ARGS:
            raise ValueError(f"graphquant: kernel {self.name}: a gemm kernel's torchscript body ends in "
                             f"{GEMM_RUNTIME_ARGS}, got {self.runtime_args}")

    @cached_property
    def argument_names(self) -> tuple[str, ...]:
        """The schema's argument names, in order."""
        return tuple(arg.name for arg in torch._C.parse_schema(f"{self.name}{self.schema}").arguments)

    @property
    def runtime_args(self) -> tuple[str, ...]:
        """What the ``torchscript`` body takes after the schema's arguments (all of its parameters where
        they do not start with the schema's: a test holds every record to starting with them)."""
        names = tuple(inspect.signature(self.torchscript).parameters)
        schema = self.argument_names
        return names[len(schema):] if names[: len(schema)] == schema else names

    @property
    def op(self) -> torch._ops.OpOverload:
        """``torch.ops.graphquant.<name>.default``."""
        return getattr(torch.ops.graphquant, self.name).default


# op name -> its record, in registration order
KERNELS: dict[str, Kernel] = {}


def register(kernel: Kernel) -> Kernel:
    """Define ``kernel``'s op, its fake and its eager implementation, and record it."""
    LIB.define(f"{kernel.name}{kernel.schema}")
    LIB.impl(kernel.name, kernel.eager, _KEY)
    register_fake(f"graphquant::{kernel.name}", lib=LIB)(kernel.fake)
    KERNELS[kernel.name] = kernel
    return kernel


def kernel_of(target: object) -> Kernel | None:
    """The record of a graph node's target, if it is a ``graphquant::`` op."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "graphquant":
        return KERNELS.get(target._opname)
    return None


def names(**flags: bool) -> tuple[str, ...]:
    """The kernels whose flags have these values: ``names(gemm=True)``."""
    return tuple(name for name, kernel in KERNELS.items()
                 if all(getattr(kernel, flag) == value for flag, value in flags.items()))
