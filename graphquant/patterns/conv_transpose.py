"""conv_transpose1d / 2d / 3d -> ``graphquant::qconv_transposeNd``, on the portable kernel.

torch 2.13 has no int8 transposed convolution in ``torch.ops.onednn`` (``qconv_prepack``
and ``qconv_pointwise`` refuse ``transposed``; ``quantized::conv_transpose2d`` needs the
deprecated quantized dtypes), so both backends keep the plain int8 weight, ``(in,
out / groups, *kernel)``, and run the portable kernel. The weight's per-channel scales
lie along its axis 0, the input channels, exactly as the reference graph quantizes it.

``aten.conv_transposeNd(x, w, b, stride, padding, output_padding, groups, dilation)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn

from graphquant.graph import Match, op_args
from graphquant.patterns import Pattern, aten, register
from graphquant.patterns.context import KernelContext, QValue
from graphquant.quant_math import QParams

_OPS = {
    1: (aten.conv_transpose1d.default,),
    2: (aten.conv_transpose2d.input,),
    3: (aten.conv_transpose3d.input,),
}


def _lower(dim: int):  # type: ignore[no-untyped-def]
    kernel = getattr(torch.ops.graphquant, f"qconv_transpose{dim}d").default

    def lower_kernel(ctx: KernelContext, match: Match, inputs: Sequence[QValue], out: QParams) -> fx.Node:
        x = inputs[0]
        _, _, bias, stride, padding, output_padding, groups, dilation = op_args(match.anchor)
        w_int8, qparams = ctx.weights.get(ctx.gm, match)
        prefix = (match.module_path or match.anchor.name) + "_weight"
        w = ctx.constant(prefix + "_int8", w_int8)
        w_scale = ctx.constant(prefix + "_scale", qparams.scale.float())
        return ctx.call(kernel, (x.node, *x.qparams.scalar(), w, w_scale, bias, list(stride), list(padding),
                                 list(output_padding), groups, list(dilation), *out.scalar(), "none"))

    return lower_kernel


def _examples(dim: int):  # type: ignore[no-untyped-def]
    def examples() -> list[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
        conv = getattr(nn, f"ConvTranspose{dim}d")
        shape = (1, 4) + (6,) * dim
        out: list[tuple[nn.Module, tuple[torch.Tensor, ...]]] = [
            (conv(4, 6, 3, stride=2, padding=1, output_padding=1), (torch.randn(shape),)),
            (conv(4, 6, 3, groups=2, dilation=2, bias=False), (torch.randn(shape),)),
        ]
        return out if dim < 3 else out[:1]

    return examples


for _dim, _ops in _OPS.items():
    register(Pattern(f"conv_transpose{_dim}d", (_ops,), "weighted", f"qconv_transpose{_dim}d", _lower(_dim),
                     _examples(_dim), weight_arg=1, bias_arg=2))
