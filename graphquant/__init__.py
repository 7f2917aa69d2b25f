"""graphquant: graph-mode post-training int8 quantization for PyTorch, on torch.export."""

from graphquant import kernels as _kernels  # noqa: F401
from graphquant.api import (
    PreparedModel,
    calibrate,
    convert,
    convert_jit,
    prepare,
    prepare_jit,
    quantize,
    quantize_jit,
    report,
)
from graphquant.errors import GraphQuantError
from graphquant.qconfig import ObserverSpec, QConfig, default_qconfig, get_default_qconfig
from graphquant.kernels import ops as _ops  # noqa: F401  (registers torch.ops.graphquant)

__all__ = [
    "GraphQuantError",
    "ObserverSpec",
    "PreparedModel",
    "QConfig",
    "calibrate",
    "convert",
    "convert_jit",
    "default_qconfig",
    "get_default_qconfig",
    "prepare",
    "prepare_jit",
    "quantize",
    "quantize_jit",
    "report",
]
