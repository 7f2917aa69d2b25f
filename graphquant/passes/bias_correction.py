"""Bias correction at convert: each corrected conv or linear's bias takes off the mean shift of its
output that rounding its weight causes on the calibration data.

With ``E[x]`` the mean of each input channel over the calibration data (recorded by the input's
observer), the int8 weight ``wq`` shifts the output's mean by ``(wq - w) . E[x]``, per output
channel (for a conv, the weight's kernel positions summed: the shift away from the zero padding at
the borders). The bias becomes ``b - (wq - w) . E[x]`` — a new constant; the float model is not
touched — in the reference and the kernel graph alike. Smoothed linears (SmoothQuant) are
corrected with their smoothed weight and input. Activation rounding is not corrected: its mean
depends on qparams that calibration has not chosen yet.
"""

from __future__ import annotations

import torch
from torch import fx

from graphquant.graph import Match, activation_inputs, add_attr, get_attr_value, is_constant, op_args
from graphquant.observers import ChannelMeans, SmoothingObserver
from graphquant.passes.insert_observers import bias_corrected
from graphquant.passes.smooth import fake_quantized_weight
from graphquant.report import BiasCorrection


def _shift(delta: torch.Tensor, mean: torch.Tensor, groups: int) -> torch.Tensor:
    """``delta . mean`` per output channel: a linear's ``[out, in]`` or a conv's ``[out, in/groups, *k]``."""
    if delta.dim() == 2:
        return delta @ mean
    per_group = delta.flatten(2).sum(2).reshape(groups, delta.shape[0] // groups, -1)
    return (per_group * mean.reshape(groups, 1, -1)).sum(2).flatten()


def _correct(gm: fx.GraphModule, match: Match) -> BiasCorrection:
    layer = match.module_path or match.anchor.name
    observer = gm.get_submodule(str(activation_inputs(match)[0].target))
    axis = -1 if match.pattern.kernel == "qlinear" else 1
    mean = observer.channel_means() if isinstance(observer, ChannelMeans) else None
    if mean is None or observer.mean_axis != axis:
        return BiasCorrection(layer, None, "its input's channel means were not recorded (the input also feeds "
                                           "a layer with channels on another axis)")
    if isinstance(observer, SmoothingObserver) and observer.smoothing.numel():
        mean = mean / observer.smoothing
    assert match.pattern.weight_arg is not None and match.pattern.bias_arg is not None
    args = op_args(match.anchor)  # aten.convNd(x, w, b, stride, padding, dilation, groups) / aten.linear(x, w, b)
    w_node = args[match.pattern.weight_arg]
    if not is_constant(w_node):
        return BiasCorrection(layer, None, "its weight is not a constant")
    w = get_attr_value(gm, w_node).detach().float()
    groups = int(args[6]) if axis == 1 else 1
    if w.shape[1] * groups != mean.numel():
        return BiasCorrection(layer, None, f"its weight reads {w.shape[1] * groups} channels, its input has "
                                           f"{mean.numel()}")
    shift = _shift(fake_quantized_weight(w, match.qconfig.weight) - w, mean, groups)
    b_node = args[match.pattern.bias_arg]
    bias = get_attr_value(gm, b_node).detach().float() if is_constant(b_node) else torch.zeros_like(shift)
    name = add_attr(gm, (match.module_path or match.anchor.name) + "_corrected_bias", bias - shift)
    with gm.graph.inserting_before(match.anchor):
        args[match.pattern.bias_arg] = gm.graph.get_attr(name)
    match.anchor.args, match.anchor.kwargs = tuple(args), {}  # op_args took the keyword arguments in
    return BiasCorrection(layer, float(shift.abs().max()))


def correct_bias(gm: fx.GraphModule, matches: list[Match]) -> list[BiasCorrection]:
    """Correct the bias of every calibrated conv and linear whose qconfig asks for it (in place);
    one report line each."""
    return [_correct(gm, m) for m in matches if bias_corrected(m) and m.output_observer is not None]
