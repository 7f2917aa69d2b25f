"""What a pattern's ``lower_kernel`` is handed: the graph to build in and weight helpers.

Weights are quantized once per weight tensor (a shared weight is quantized once) with
the match's weight observer; oneDNN weights are packed once, here, at convert time.
The int8 weight is registered as a buffer (saved state); the packed copy is a plain
attribute, listed in the model's record (``graphquant.quantized.packed_weights``) so it can be
rebuilt after loading.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from graphquant.errors import GraphQuantError
from graphquant.graph import Match, constant_node, copy_meta, example_shape, get_attr_value
from graphquant.kernels import embedding, onednn
from graphquant.qconfig import ObserverSpec
from graphquant.quant_math import QParams, quantize
from graphquant.quantized import packed_weights


@dataclass(frozen=True)
class QValue:
    """A uint8 value in the kernel graph and the qparams it carries."""

    node: fx.Node
    qparams: QParams


@dataclass(frozen=True)
class KernelWeight:
    """Graph nodes of a lowered weight: packed (or plain int8) weight, its scales, float bias."""

    packed: fx.Node
    scale: fx.Node
    bias: fx.Node | None


@dataclass(frozen=True)
class RowwiseWeight:
    """Graph nodes of a lowered embedding table: the fused row-wise uint8 table, its per-row
    scales and offsets (float32), and its bits per value."""

    table: fx.Node
    scale: fx.Node
    offset: fx.Node
    bits: int


@dataclass
class WeightCache:
    """Quantized weights by ``get_attr`` target and weight observer spec, so each is quantized
    once per scheme (a table tied to an output linear is quantized both ways)."""

    quantized: dict[tuple[str, ObserverSpec], tuple[torch.Tensor, QParams]] = field(default_factory=dict)
    by_match: dict[int, tuple[torch.Tensor, QParams]] = field(default_factory=dict)

    def get(self, gm: fx.GraphModule, match: Match) -> tuple[torch.Tensor, QParams]:
        """The int8 weight of ``match`` and its qparams (first called while the weight arg
        is still the float ``get_attr``)."""
        if id(match) in self.by_match:
            return self.by_match[id(match)]
        assert match.pattern.weight_arg is not None
        node = match.anchor.args[match.pattern.weight_arg]
        assert isinstance(node, fx.Node)
        key = (str(node.target), match.qconfig.weight)
        if key not in self.quantized:
            w = get_attr_value(gm, node).detach()
            observer = match.qconfig.weight.create()
            observer(w)
            qparams = observer.qparams()
            if qparams.axis is None and not qparams.float_qparams:  # per tensor = per channel, one repeated scale
                n = w.shape[0]
                qparams = QParams(qparams.scale.expand(n).contiguous(), qparams.zero_point.expand(n).contiguous(),
                                  qparams.dtype, qparams.qmin, qparams.qmax, axis=0)
            self.quantized[key] = (quantize(w, qparams), qparams)
        self.by_match[id(match)] = self.quantized[key]
        return self.quantized[key]


    def get_fp16(self, gm: fx.GraphModule, match: Match) -> torch.Tensor:
        """The float16 weight of ``match`` (first called while the weight arg is the ``get_attr``);
        values beyond the float16 range saturate, with a warning naming the layer."""
        if id(match) not in self.by_match:
            assert match.pattern.weight_arg is not None
            w = get_attr_value(gm, match.anchor.args[match.pattern.weight_arg]).detach()  # type: ignore[arg-type]
            limit = float(torch.finfo(torch.float16).max)
            if bool((w.abs() > limit).any()):
                warnings.warn(f"graphquant: {match.module_path or match.anchor.name}: weights beyond the float16 "
                              f"range (+-{limit:g}) saturate", stacklevel=2)
            self.by_match[id(match)] = (w.clamp(-limit, limit).half(), None)  # type: ignore[assignment]
        return self.by_match[id(match)][0]


def x_qmax_kwarg(x: QValue) -> dict[str, int]:
    """``{"x_qmax": 127}`` for a GEMM or conv input on ``reduce_range``'s 7-bit grid (one exact call
    on x86 CPUs without VNNI, kernels/x86.py); nothing for the full 0..255 grid, the schema default,
    so the graphs of 8-bit models are unchanged."""
    return {"x_qmax": x.qparams.qmax} if x.qparams.qmax < 255 else {}


class KernelContext:
    """Builds kernel nodes before ``insert_point``, with the anchor's module path."""

    def __init__(self, gm: fx.GraphModule, backend: str, weights: WeightCache) -> None:
        self.gm = gm
        self.backend = backend
        self.weights = weights
        self.match: Match | None = None
        self._lowered: dict[tuple[Any, ...], tuple[fx.Node, ...]] = {}

    def call(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> fx.Node:
        """Insert ``target(*args, **kwargs)`` after the match's last node (an op returning several
        tensors: before its ``getitem`` nodes, so that their users can read the new op's)."""
        assert self.match is not None
        with self.gm.graph.inserting_after(self.match.nodes[-1]):
            node = self.gm.graph.call_function(target, args, kwargs or {})
        copy_meta(self.match.anchor, node)
        return node

    def constant(self, prefix: str, value: torch.Tensor, buffer: bool = True) -> fx.Node:
        """A ``get_attr`` node reading ``value``, registered on the module under a fresh name."""
        return constant_node(self.gm, prefix, value, buffer)

    def _weight_nodes(self, match: Match, pack: Any, pack_args: dict[str, Any]) -> KernelWeight:
        w_int8, qparams = self.weights.get(self.gm, match)
        # a weight shared by two calls is stored and packed once
        key = (id(w_int8), pack.__name__, repr([v for v in pack_args.values() if not isinstance(v, torch.Tensor)]))
        if key not in self._lowered:
            prefix = (match.module_path or match.anchor.name) + "_weight"
            int8_node = self.constant(prefix + "_int8", w_int8)
            if self.backend == "onednn":
                packed = self.constant(prefix + "_packed", pack(w_int8, **pack_args), buffer=False)
                packed_weights(self.gm)[str(packed.target)] = {"int8": int8_node.target, "pack": pack.__name__,
                                                               **pack_args}
            else:
                packed = int8_node
            self._lowered[key] = (packed, self.constant(prefix + "_scale", qparams.scale.float()))
        packed, scale = self._lowered[key]
        bias_arg = match.pattern.bias_arg
        bias = match.anchor.args[bias_arg] if bias_arg is not None and len(match.anchor.args) > bias_arg else None
        return KernelWeight(packed, scale, bias if isinstance(bias, fx.Node) else None)

    def conv_weight(
        self, match: Match, x_scale: float, x_zero_point: int,
        stride: list[int], padding: list[int], dilation: list[int], groups: int,
    ) -> KernelWeight:
        """The conv weight, quantized and (on oneDNN) packed for these input qparams."""
        _, qparams = self.weights.get(self.gm, match)
        args = dict(w_scale=qparams.scale.float(), x_scale=x_scale, x_zero_point=x_zero_point,
                    stride=stride, padding=padding, dilation=dilation, groups=groups,
                    x_shape=example_shape(match.anchor.args[0]))
        return self._weight_nodes(match, onednn.pack_conv, args)

    def fp16_weight(self, match: Match) -> KernelWeight:
        """The weight stored as float16; values beyond its range saturate, with a warning."""
        w16_value = self.weights.get_fp16(self.gm, match)
        prefix = (match.module_path or match.anchor.name) + "_weight_fp16"
        bias_arg = match.pattern.bias_arg
        bias = match.anchor.args[bias_arg] if bias_arg is not None and len(match.anchor.args) > bias_arg else None
        w16 = self.constant(prefix, w16_value)
        return KernelWeight(w16, w16, bias if isinstance(bias, fx.Node) else None)

    def rowwise_weight(self, match: Match) -> RowwiseWeight:
        """The embedding table in the fused row-wise layout of :mod:`graphquant.kernels.embedding`:
        plain uint8 (saved as it is, nothing to pack on load), shared by every call reading it."""
        q, qparams = self.weights.get(self.gm, match)
        bits = 8 if qparams.qmax == 255 else 4
        key = (id(q), "rowwise", bits)
        if key not in self._lowered:
            if bits == 4 and q.shape[1] % 2:
                raise GraphQuantError(
                    f"graphquant: {match.module_path or match.anchor.name}: a 4-bit embedding table stores two values "
                    f"a byte and needs an even embedding_dim, got {q.shape[1]}; use graphquant.embedding_qconfig "
                    f"(8-bit) for it: qconfig_dict={{{match.module_path!r}: graphquant.embedding_qconfig}}"
                )
            prefix = (match.module_path or match.anchor.name) + "_weight"
            fused = embedding.pack_rows(q, qparams.scale, qparams.zero_point, bits)
            table = self.constant(prefix + f"_rowwise{bits}", fused)
            scale = self.constant(prefix + "_scale", qparams.scale.float().contiguous())
            offset = self.constant(prefix + "_offset", qparams.zero_point.float().contiguous())
            self._lowered[key] = (table, scale, offset)
        table, scale, offset = self._lowered[key]
        return RowwiseWeight(table, scale, offset, bits)

    def linear_weight(self, match: Match) -> KernelWeight:
        """The linear weight, quantized and (on oneDNN) packed."""
        return self._weight_nodes(match, onednn.pack_linear, {})
