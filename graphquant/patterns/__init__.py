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
from typing import TYPE_CHECKING

import torch
from torch import fx

import graphquant.kernels  # noqa: F401  (defines torch.ops.graphquant)
from graphquant.graph import WEIGHT_KINDS, Kind, Pattern  # noqa: F401  (the record lives with Match)

if TYPE_CHECKING:
    from graphquant.graph import Match
    from graphquant.patterns.context import KernelContext, QValue
    from graphquant.quant_math import QParams

LowerKernel = Callable[["KernelContext", "Match", Sequence["QValue"], "QParams"], fx.Node]
aten = torch.ops.aten


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
            if target in p.ops[0] and (p.kind == "weight_only" or (p.kind == "dynamic") == dynamic)]


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
