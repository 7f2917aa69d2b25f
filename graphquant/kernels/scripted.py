"""What the TorchScript bodies of graphquant's kernels share, and what a TorchScript model holds
besides them: the argument checks of the weighted kernels (TorchScript raises ``ValueError``, not
``GraphQuantError``), the input check at the head of the graph, and the modules that keep packed
oneDNN weights (saved as int8, packed again on ``torch.jit.load``).
:func:`graphquant.deploy.torchscript.to_torchscript` writes the graph that uses them.
"""

from __future__ import annotations

import typing

import torch
from torch import Tensor, fx, nn

from graphquant.kernels.onednn import onednn_dilation


def check_weighted(x: Tensor, x_zero_point: int, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                   out_zero_point: int, out_channels: int) -> None:
    """The checks both backends make before any arithmetic (oneDNN crashes on malformed input)."""
    if x.dtype != torch.uint8:
        raise ValueError("graphquant: int8 kernel activation must be uint8")
    if not w.is_mkldnn and w.dtype != torch.int8:
        raise ValueError("graphquant: int8 kernel weight must be packed or int8")
    if x_zero_point < 0 or x_zero_point > 255 or out_zero_point < 0 or out_zero_point > 255:
        raise ValueError("graphquant: uint8 zero points must lie in [0, 255]")
    if w_scale.dim() != 1 or w_scale.numel() != out_channels:
        raise ValueError("graphquant: w_scale must have one entry per output channel")
    if bias is not None:
        if bias.numel() != out_channels:
            raise ValueError("graphquant: bias must have one entry per output channel")


def check_input(x: Tensor, position: int, name: str, dtype: torch.dtype, device: str, sizes: list[int],
                    dynamic_batch: bool, batch_of: Tensor, captured: str, cast: str) -> None:
    """inputs.InputCheck, one input: ``batch_of`` is the first input with a dynamic batch."""
    where = "graphquant: <model> input " + str(position) + " (" + name + ")"
    captured = "the model was captured with " + captured
    if x.dtype != dtype:
        raise ValueError(where + " has the wrong dtype; " + captured + ". Cast it with " + name + cast)
    if str(x.device) != device:
        raise ValueError(where + " is on " + str(x.device) + "; " + captured + ". Move it with " + name + ".to('"
                         + device + "')")
    shape = x.shape
    if len(shape) != len(sizes):
        raise ValueError(where + " is " + str(len(shape)) + "-d with shape " + str(shape) + "; " + captured
                         + ". Pass inputs of that rank, or re-quantize with example inputs of that shape")
    if len(shape) > 0 and shape[0] == 0:
        raise ValueError(where + " has batch size 0 (shape " + str(shape) + "); " + captured
                         + ". Skip empty batches: there is nothing to compute")
    for dim in range(len(shape)):
        if dim == 0 and dynamic_batch:
            if shape[0] != batch_of.size(0):
                raise ValueError(where + " has batch size " + str(shape[0]) + ", but an earlier input has "
                                 + str(batch_of.size(0)) + "; give every input the same batch size")
        elif shape[dim] != sizes[dim]:
            raise ValueError(where + " has shape " + str(shape) + ": dimension " + str(dim) + " must be "
                             + str(sizes[dim]) + ", got " + str(shape[dim]) + "; " + captured
                             + ". Pass inputs of that shape, or re-quantize with example inputs of that shape")


fx.node.has_side_effect(check_input)  # no users: kept through dead-code elimination


def is_packed(w: Tensor) -> bool:
    """Whether a weight is packed for oneDNN: a gemm kernel's ``packed`` argument in a TorchScript
    graph, read from the weight itself on each call, so oneDNN never sees an unpacked one."""
    return w.is_mkldnn


def _ts_pack_conv(w: Tensor, w_scale: Tensor, x_scale: float, x_zero_point: int, stride: list[int],
                  padding: list[int], dilation: list[int], groups: int, x_shape: list[int]) -> Tensor:
    """kernels.onednn.pack_conv (``x_shape`` empty: no layout hint)."""
    hint: list[int] | None = None
    if len(x_shape) > 0:
        hint = x_shape
    return torch.ops.onednn.qconv_prepack(w.contiguous(), w_scale.float(), x_scale, x_zero_point, stride, padding,
                                          onednn_dilation(w, dilation), groups, hint)


ConvState = tuple[Tensor, Tensor, float, int, list[int], list[int], list[int], int, list[int], bool]


class PackedConvWeight(nn.Module):
    """A oneDNN conv weight in a TorchScript module: saved as int8, packed again on load.

    (No class-level attribute annotations: TorchScript cannot read them as strings.)
    """

    def __init__(self, w_int8: Tensor, w_scale: Tensor, x_scale: float, x_zero_point: int, stride: list[int],
                 padding: list[int], dilation: list[int], groups: int, x_shape: list[int],
                 packed: Tensor) -> None:
        super().__init__()
        self.w_int8, self.w_scale, self.x_scale, self.x_zero_point = w_int8, w_scale, x_scale, x_zero_point
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.x_shape = x_shape  # pack_conv's layout hint, [] for none
        self.packed = packed

    def forward(self) -> Tensor:
        return self.packed

    @torch.jit.export
    def __getstate__(self) -> ConvState:
        return (self.w_int8, self.w_scale, self.x_scale, self.x_zero_point, self.stride, self.padding, self.dilation,
                self.groups, self.x_shape, self.training)

    @torch.jit.export
    def __setstate__(self, state: ConvState) -> None:
        self.w_int8, self.w_scale, self.x_scale, self.x_zero_point = state[0], state[1], state[2], state[3]
        self.stride, self.padding, self.dilation, self.groups = state[4], state[5], state[6], state[7]
        self.x_shape, self.training = state[8], state[9]
        self.packed = _ts_pack_conv(self.w_int8, self.w_scale, self.x_scale, self.x_zero_point, self.stride,
                                    self.padding, self.dilation, self.groups, self.x_shape)


# the one attribute whose value cannot tell TorchScript its type (an empty list: no hint)
PackedConvWeight.__annotations__ = {"x_shape": typing.List[int]}  # noqa: UP006


class PackedLinearWeight(nn.Module):
    """A oneDNN linear weight in a TorchScript module: saved as int8, packed again on load."""

    def __init__(self, w_int8: Tensor, packed: Tensor) -> None:
        super().__init__()
        self.w_int8 = w_int8
        self.packed = packed

    def forward(self) -> Tensor:
        return self.packed

    @torch.jit.export
    def __getstate__(self) -> tuple[Tensor, bool]:
        return self.w_int8, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[Tensor, bool]) -> None:
        self.w_int8 = state[0]
        self.training = state[1]
        self.packed = torch.ops.onednn.qlinear_prepack(self.w_int8.contiguous(), None)
