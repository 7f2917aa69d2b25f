"""The table of quantizable patterns.

A pattern is a row of data: the chain of ATen ops it matches, how its inputs and
output are observed, and how it lowers to the int8 kernel graph. Each file in this
package registers its rows; ``annotate``, ``insert_observers``, both lowerings, the
numerics report and ``tests/test_patterns.py`` read them from :data:`PATTERNS`.

Kinds:

- ``"weighted"``: conv / linear. Activation input observed, weight quantized per channel
  ahead of time, output observed: ``x -> obs -> conv -> [relu] -> obs``.
- ``"shares_qparams"``: value-preserving ops (flatten, view, max_pool, relu). Quantized only
  when their input is; the output reuses the input's scale and zero point and runs on uint8.
  Ops returning several tensors (split, max with indices, sort) are of this kind too, with
  ``value_outputs`` naming the items that carry values (see
  :mod:`graphquant.patterns.multi_output`).
- ``"general"``: add, mul, cat, matmul, layer_norm... Quantized when at least one
  activation input is (an ``add`` of two model inputs stays float, as in PyTorch); every
  activation input is observed and the output gets its own observer.
- ``"dynamic"``: dynamic quantization (linear): the weight is quantized ahead of time, the
  activation per batch inside the kernel; output float. Only ``prepare_dynamic`` uses these.
- ``"fixed_qparams"``: sigmoid, tanh, hardsigmoid. Like ``"general"`` but the output
  qparams come from the op's known range (``output_range``), not from data.
- ``"weight_only"``: embedding, embedding_bag. The weight (a table) is quantized ahead of
  time with per-row float qparams; the inputs are indices, so nothing is observed; output
  float (the next quantized op's input observer quantizes it). Matched in static and
  dynamic mode, only under a weight-only qconfig (``embedding_qconfig``), which in turn
  matches nothing else.

``lower_kernel=None`` means the kernel graph keeps the reference form
``dq -> op -> q`` for that pattern: correct, uint8 on both sides, but computed in float.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import fx, nn

import graphquant.kernels.ops  # noqa: F401  (defines torch.ops.graphquant)

if TYPE_CHECKING:
    from graphquant.graph import Match
    from graphquant.patterns.context import KernelContext, QValue
    from graphquant.quant_math import QParams

Kind = Literal["weighted", "shares_qparams", "general", "fixed_qparams", "dynamic", "weight_only"]
WEIGHT_KINDS = ("weighted", "dynamic", "weight_only")  # kinds that name a weight_arg and quantize it
LowerKernel = Callable[["KernelContext", "Match", Sequence["QValue"], "QParams"], fx.Node]
aten = torch.ops.aten


@dataclass(frozen=True)
class Pattern:
    """One quantizable pattern.

    ``ops[i]`` lists the ATen overloads accepted at position ``i`` of the chain; each
    node but the last must have the next as its only user. ``kernel`` is the op name
    the kernel graph shows (what ``check_graph_mode_op`` looks for). ``lower_kernel``
    builds the int8 node from the uint8 inputs (in the order of ``activation_args``, a
    list argument such as ``cat``'s contributing each element); ``None`` keeps the
    reference form. ``output_range`` is the fixed output range of a ``fixed_qparams``
    pattern. ``examples`` give modules and inputs that exercise the pattern, for the
    tests and the coverage table.

    ``chain_inputs`` names activation inputs read by later nodes of the chain, as
    ``(chain position, arg index)`` pairs: ``conv -> add`` has ``((1, 0), (1, 1))``, the
    residual ``other`` of ``add(conv, other)`` or ``add(other, conv)``. The chain may enter
    such a node through any of its named args; the others are observed like the anchor's
    inputs and reach ``lower_kernel`` after them (each node once: in ``conv(x) + x`` the one
    input ``x`` stands for both). They must have the shape of the value they join, since a
    fused join accumulates into the output (no broadcasting).

    ``value_outputs`` marks an op returning several tensors, which the graph reads through
    ``operator.getitem`` nodes: the item indices that carry the input's values (``(0,)`` for
    ``max.dim``'s values beside its indices), or ``"all"`` (``split``). Such a pattern is one
    op of kind ``shares_qparams``; its ``lower_kernel`` returns the op on uint8 and lowering
    reads every item from it. ``None``: the op returns one tensor.
    """

    name: str
    ops: tuple[tuple[torch._ops.OpOverload, ...], ...]
    kind: Kind
    kernel: str
    lower_kernel: LowerKernel | None
    examples: Callable[[], Sequence[tuple[nn.Module, tuple[torch.Tensor, ...]]]]
    activation_args: tuple[int, ...] = (0,)
    weight_arg: int | None = None
    bias_arg: int | None = None
    output_range: tuple[float, float] | None = None
    chain_inputs: tuple[tuple[int, int], ...] = ()
    value_outputs: tuple[int, ...] | Literal["all"] | None = None
    doc: str = ""
    # lower_kernel takes out=None and then returns float32: used when only float ops read the output
    float_output: bool = False

    def __post_init__(self) -> None:
        if not self.ops or any(not alternatives for alternatives in self.ops):
            raise ValueError(f"graphquant: pattern {self.name} matches nothing")
        if (self.kind in WEIGHT_KINDS) != (self.weight_arg is not None):
            raise ValueError(
                f"graphquant: pattern {self.name}: {'/'.join(WEIGHT_KINDS)} patterns, only they, name a weight_arg"
            )
        if (self.kind == "fixed_qparams") != (self.output_range is not None):
            raise ValueError(f"graphquant: pattern {self.name}: fixed_qparams patterns and only they set output_range")
        if self.kind in WEIGHT_KINDS and self.lower_kernel is None:
            raise ValueError(f"graphquant: pattern {self.name} needs a kernel lowering")
        if any(not 0 < position < len(self.ops) for position, _ in self.chain_inputs):
            raise ValueError(f"graphquant: pattern {self.name}: chain_inputs name positions after the anchor")
        if self.value_outputs is not None and (len(self.ops) != 1 or self.kind != "shares_qparams"):
            # one shared scale for every item: other kinds would need an observer per item
            raise ValueError(f"graphquant: pattern {self.name}: value_outputs is for one shares_qparams op")


PATTERNS: list[Pattern] = []


def register(pattern: Pattern) -> Pattern:
    """Add a pattern to the table; longer chains are tried first."""
    if any(p.name == pattern.name for p in PATTERNS):
        raise ValueError(f"graphquant: pattern {pattern.name} registered twice")
    PATTERNS.append(pattern)
    PATTERNS.sort(key=lambda p: -len(p.ops))
    return pattern


def patterns_for(target: object, dynamic: bool = False) -> list[Pattern]:
    """Static (or, with ``dynamic=True``, dynamic) patterns whose chain starts with ``target``, longest first;
    weight-only patterns in both modes."""
    return [p for p in PATTERNS
            if target in p.ops[0] and (p.kind == "weight_only" or (p.kind == "dynamic") == dynamic)]  # fmt: skip


from graphquant.patterns import (  # noqa: E402,F401  (fills PATTERNS)
    activations,
    binary,
    conv,
    conv_transpose,
    dynamic_linear,
    embedding,
    join,
    linear,
    multi_output,
    norms,
    padding,
    pooling,
    reshape,
)
