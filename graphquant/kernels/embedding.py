"""Embedding kernels on row-wise quantized tables: ``embedding`` and ``embedding_bag``.

A table is one plain ``uint8`` tensor in fbgemm's fused row-wise layout, each row its
values followed by its float qparams (``x_hat = q * scale + offset``):

- 8 bits: ``[N, D + 8]``: ``D`` values, then ``scale`` and ``offset`` as float32 (host byte order);
- 4 bits: ``[N, D / 2 + 4]``: two values per byte (value ``2i`` in the low nibble, ``2i + 1``
  in the high one), then ``scale`` and ``offset`` as float16.

Beside the table each op takes the rows' ``w_scale`` and ``w_offset`` as float32 vectors
(the float16 values exactly, for 4 bits): TorchScript cannot reinterpret the bytes of a
uint8 tensor as floats (no ``view(dtype)``), and the portable path must run there too. That
costs 8 bytes a row beside the ``D`` (or ``D / 2``) of the values.

The layout is the saved state as it is (no packing on load) and what PyTorch's own
row-wise kernels read: on CPU tensors the lookup runs on
``torch.ops.quantized.embedding_bag_byte_rowwise_offsets`` / ``embedding_bag_4bit_rowwise_offsets``
(in every CPU build: fbgemm on x86, a reference loop elsewhere; plain uint8 in, float32 out,
no quantized dtypes). Those ops sum only (torch 2.13 ignores ``mode``), so ``mean`` is their
sum divided by the bag sizes and ``max`` (and bags that contain ``padding_idx``) take the
portable path, as do tensors on other devices: gather the rows, dequantize them, reduce in
float32 with ``torch.embedding_bag`` over the gathered rows (the reference's arithmetic,
in its order).

The native ops read memory at the indices they are given, so every call checks dtypes,
shapes, index range and offsets first and raises :class:`~graphquant.errors.GraphQuantError`.
Pure PyTorch and TorchScript-compatible: :data:`TORCHSCRIPT` serves both the
``graphquant::`` ops and ``graphquant.to_torchscript``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from graphquant.errors import GraphQuantError
from graphquant.kernels.registry import Kernel, register
from graphquant.quant_math import dequantize_float_qparams, quantize_float_qparams

MODES = ("sum", "mean", "max")  # aten.embedding_bag's ``mode`` integers, in order


def _mode_name(mode: int) -> str:
    """``MODES[mode]``, spelled so TorchScript compiles it (it reads no global tuples)."""
    if mode == 0:
        return "sum"
    return "mean" if mode == 1 else "max"


def pack_rows(q: Tensor, scale: Tensor, offset: Tensor, bits: int) -> Tensor:
    """``q`` (uint8 ``[N, D]``, values in ``[0, 2**bits)``) and per-row ``scale``, ``offset`` as one fused table."""
    if bits == 8:
        qparams = torch.stack([scale.float(), offset.float()], 1).view(dtype=torch.uint8)
        return torch.cat([q.to(torch.uint8), qparams], 1).contiguous()
    if bits != 4 or q.size(1) % 2 != 0:
        raise GraphQuantError("graphquant: row-wise tables are 8-bit, or 4-bit with an even embedding_dim")
    pairs = q.to(torch.uint8).reshape(q.size(0), -1, 2)
    nibbles = torch.bitwise_or(pairs[:, :, 0], torch.bitwise_left_shift(pairs[:, :, 1], 4))
    qparams = torch.stack([scale.half(), offset.half()], 1).view(dtype=torch.uint8)
    return torch.cat([nibbles, qparams], 1).contiguous()


def embedding_dim(w: Tensor, bits: int) -> int:
    """Values per row of a fused table."""
    return w.size(1) - 8 if bits == 8 else 2 * (w.size(1) - 4)


def unpack_values(rows: Tensor, bits: int) -> Tensor:
    """The values of fused rows, one uint8 each: ``[L, D]``."""
    dim = embedding_dim(rows, bits)
    if bits == 8:
        return rows[:, :dim]
    packed = rows[:, : dim // 2]
    low = torch.bitwise_and(packed, 15)
    high = torch.bitwise_right_shift(packed, 4)
    return torch.stack([low, high], 2).reshape(rows.size(0), dim)


def check_table(op: str, w: Tensor, w_scale: Tensor, w_offset: Tensor, bits: int) -> int:
    """The table's embedding_dim, or an error if ``w`` is not a fused ``bits``-bit table with
    one float32 scale and offset per row."""
    extra = 8 if bits == 8 else 4
    if bits != 8 and bits != 4:
        raise GraphQuantError("graphquant::" + op + ": bits must be 8 or 4, got " + str(bits))
    if w.dtype != torch.uint8 or w.dim() != 2 or w.size(1) <= extra:
        raise GraphQuantError(
            "graphquant::" + op + ": the table must be a fused row-wise uint8 [rows, values + " + str(extra)
            + "] tensor, got " + str(w.dtype) + " " + str(list(w.shape))
        )
    for name, qparam in (("w_scale", w_scale), ("w_offset", w_offset)):
        if qparam.dtype != torch.float32 or qparam.shape != (w.size(0),):
            raise GraphQuantError(
                "graphquant::" + op + ": " + name + " must be float32 with one entry per row (" + str(w.size(0)) + ")"
            )
    return embedding_dim(w, bits)


def check_indices(op: str, indices: Tensor, num_rows: int) -> None:
    """Integer indices, all in ``[0, num_rows)``: the native kernels would read past the table."""
    if indices.dtype != torch.int64 and indices.dtype != torch.int32:
        raise GraphQuantError("graphquant::" + op + ": indices must be int64 or int32, got " + str(indices.dtype))
    if indices.numel() > 0:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= num_rows:
            bad = lo if lo < 0 else hi
            raise GraphQuantError(
                "graphquant::" + op + ": index " + str(bad) + " is outside the table's " + str(num_rows)
                + " rows (valid: 0 to " + str(num_rows - 1) + "); check the input ids against the embedding's "
                "num_embeddings (a tokenizer with a larger vocabulary?)"
            )


def check_bags(op: str, indices: Tensor, offsets: Tensor, mode: int, per_sample_weights: Tensor | None,
               include_last_offset: bool) -> None:
    """1-d indices; offsets starting at 0, non-decreasing, within the indices; weights for ``sum`` only."""
    if indices.dim() != 1 or offsets.dim() != 1:
        raise GraphQuantError("graphquant::" + op + ": indices and offsets must be 1-d")
    if offsets.dtype != torch.int64 and offsets.dtype != torch.int32:
        raise GraphQuantError("graphquant::" + op + ": offsets must be int64 or int32, got " + str(offsets.dtype))
    if mode < 0 or mode > 2:
        raise GraphQuantError("graphquant::" + op + ": mode must be 0 (sum), 1 (mean) or 2 (max), got " + str(mode))
    n = offsets.numel()
    if include_last_offset and n == 0:
        raise GraphQuantError("graphquant::" + op + ": include_last_offset needs at least one offset")
    if n > 0:
        if int(offsets[0]) != 0:
            raise GraphQuantError("graphquant::" + op + ": offsets[0] must be 0, got " + str(int(offsets[0])))
        if bool((offsets[1:] < offsets[:-1]).any()) or int(offsets[-1]) > indices.numel():
            raise GraphQuantError(
                "graphquant::" + op + ": offsets must be non-decreasing and at most the number of indices ("
                + str(indices.numel()) + ")"
            )
    if per_sample_weights is not None:
        if mode != 0:
            raise GraphQuantError("graphquant::" + op + ": per_sample_weights are for mode 'sum' only")
        if per_sample_weights.dtype != torch.float32 or per_sample_weights.shape != indices.shape:
            raise GraphQuantError("graphquant::" + op + ": per_sample_weights must be float32, one per index")


def dequantize_rows(w: Tensor, w_scale: Tensor, w_offset: Tensor, indices: Tensor, bits: int) -> Tensor:
    """The float32 rows ``indices`` (1-d) of the table: ``q * scale + offset``."""
    q = unpack_values(w.index_select(0, indices), bits)
    return dequantize_float_qparams(q, w_scale.index_select(0, indices), w_offset.index_select(0, indices))


def _native_sum(w: Tensor, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None,
                include_last_offset: bool, bits: int) -> Tensor:
    offsets = offsets.to(indices.dtype)
    if bits == 8:
        return torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
            w, indices, offsets, False, 0, False, per_sample_weights, None, include_last_offset
        )
    return torch.ops.quantized.embedding_bag_4bit_rowwise_offsets(
        w, indices, offsets, False, 0, False, per_sample_weights, None, include_last_offset
    )


def qembedding(w: Tensor, w_scale: Tensor, w_offset: Tensor, indices: Tensor, bits: int) -> Tensor:
    """``embedding(w_hat, indices)``: float32 ``[*indices.shape, D]``."""
    dim = check_table("qembedding", w, w_scale, w_offset, bits)
    check_indices("qembedding", indices, w.size(0))
    flat = indices.reshape(-1)
    shape = list(indices.shape)
    shape.append(dim)
    if flat.numel() == 0:
        return torch.zeros(shape, dtype=torch.float32, device=w.device)
    if w.device.type == "cpu":  # each index a bag of one
        offsets = torch.arange(flat.numel(), dtype=flat.dtype)
        return _native_sum(w.contiguous(), flat.contiguous(), offsets, None, False, bits).reshape(shape)
    return dequantize_rows(w, w_scale, w_offset, flat, bits).reshape(shape)


def qembedding_bag(w: Tensor, w_scale: Tensor, w_offset: Tensor, indices: Tensor, offsets: Tensor, mode: int,
                   per_sample_weights: Tensor | None, include_last_offset: bool, padding_idx: int,
                   bits: int) -> Tensor:
    """``embedding_bag(w_hat, indices, offsets, mode, ...)[0]``: float32 ``[bags, D]``.

    ``padding_idx < 0`` means none; entries equal to it are left out of their bag.
    """
    check_table("qembedding_bag", w, w_scale, w_offset, bits)
    check_indices("qembedding_bag", indices, w.size(0))
    check_bags("qembedding_bag", indices, offsets, mode, per_sample_weights, include_last_offset)
    padded = padding_idx >= 0 and bool((indices == padding_idx).any())
    if w.device.type == "cpu" and mode != 2 and not padded and indices.numel() > 0:
        out = _native_sum(w.contiguous(), indices.contiguous(), offsets.contiguous(), per_sample_weights,
                          include_last_offset, bits)
        if mode == 1:
            total = offsets.new_full([1], indices.numel())
            ends = offsets[1:] if include_last_offset else torch.cat([offsets[1:], total])
            starts = offsets[:-1] if include_last_offset else offsets
            out = out / (ends - starts).clamp(min=1).to(torch.float32).reshape(-1, 1)
        return out
    # portable: the gathered rows are the table, bag entry i reads row i; padding reads an extra row
    rows = dequantize_rows(w, w_scale, w_offset, indices, bits)
    local = torch.arange(indices.numel(), dtype=torch.int64, device=indices.device)
    pad: int | None = None
    if padding_idx >= 0:
        pad = indices.numel()
        local = torch.where(indices == padding_idx, torch.full_like(local, pad), local)
        rows = torch.cat([rows, rows.new_zeros([1, rows.size(1)])])
    elif indices.numel() == 0:
        rows = rows.new_zeros([1, rows.size(1)])  # torch.embedding_bag wants a non-empty table
    return F.embedding_bag(local, rows, offsets.to(torch.int64), mode=_mode_name(mode),
                           per_sample_weights=per_sample_weights, include_last_offset=include_last_offset,
                           padding_idx=pad)


def _quantize_float_qparams_fake(x, scale, offset, qmax):  # type: ignore[no-untyped-def]
    return torch.empty_like(x, dtype=torch.uint8)


def _dequantize_float_qparams_fake(q, scale, offset):  # type: ignore[no-untyped-def]
    return torch.empty(q.shape, dtype=torch.float32)


def _qembedding_fake(w, w_scale, w_offset, indices, bits):  # type: ignore[no-untyped-def]
    return w.new_empty((*indices.shape, embedding_dim(w, bits)), dtype=torch.float32)


def _qembedding_bag_fake(w, w_scale, w_offset, indices, offsets, mode, per_sample_weights, include_last_offset,  # type: ignore[no-untyped-def]  # noqa: E501
                         padding_idx, bits):
    bags = offsets.shape[0] - 1 if include_last_offset else offsets.shape[0]
    return w.new_empty((bags, embedding_dim(w, bits)), dtype=torch.float32)


# Indices in, float32 out. The table is one fused row-wise uint8 tensor (values, then scale and
# offset), its scales and offsets also given as float32 vectors. Each function above is both the
# op's implementation and its TorchScript body.
register(Kernel("quantize_float_qparams", "(Tensor x, Tensor scale, Tensor offset, int qmax) -> Tensor",
                _quantize_float_qparams_fake, quantize_float_qparams, quantize_float_qparams))
register(Kernel("dequantize_float_qparams", "(Tensor q, Tensor scale, Tensor offset) -> Tensor",
                _dequantize_float_qparams_fake, dequantize_float_qparams, dequantize_float_qparams))
register(Kernel("qembedding", "(Tensor w, Tensor w_scale, Tensor w_offset, Tensor indices, int bits) -> Tensor",
                _qembedding_fake, qembedding, qembedding, weighted=True))
register(Kernel("qembedding_bag", "(Tensor w, Tensor w_scale, Tensor w_offset, Tensor indices, Tensor offsets, "
                "int mode, Tensor? per_sample_weights, bool include_last_offset, int padding_idx, int bits) -> Tensor",
                _qembedding_bag_fake, qembedding_bag, qembedding_bag, weighted=True))
