"""graphquant: graph-mode post-training int8 quantization for PyTorch, on torch.export."""

import sys as _sys

from graphquant import kernels as _kernels  # noqa: F401  (registers torch.ops.graphquant)
from graphquant import (
    quant_math,  # noqa: F401  (graphquant.quant_math: qparams and SQNR helpers)
)
from graphquant.api import (
    PreparedModel,
    calibrate,
    convert,
    convert_dynamic_jit,
    convert_jit,
    prepare,
    prepare_dynamic,
    prepare_dynamic_jit,
    prepare_jit,
    quantize,
    quantize_dynamic,
    quantize_dynamic_jit,
    quantize_jit,
    report,
)
from graphquant.deploy import archive, compiled, program, torchscript  # noqa: F401  (module paths of releases before deploy/)
from graphquant.deploy.archive import load, save
from graphquant.deploy.compiled import CompiledModel, compile  # noqa: A004  (graphquant.compile, beside torch.compile)
from graphquant.deploy.torchscript import to_torchscript
from graphquant.errors import GraphQuantError
from graphquant.qconfig import (
    ObserverSpec,
    QConfig,
    SmoothQuant,
    default_dynamic_qconfig,
    default_qconfig,
    embedding_4bit_qconfig,
    embedding_qconfig,
    float16_dynamic_qconfig,
    float_qparams_weight_only_qconfig,
    float_qparams_weight_only_qconfig_4bit,
    get_default_dynamic_qconfig,
    get_default_qconfig,
    per_channel_dynamic_qconfig,
    per_tensor_dynamic_qconfig,
    per_token_dynamic_qconfig,
    qconfig_dict_by_type,
)
from graphquant.tools import accuracy, distributed, kernel_timing, numerics  # noqa: F401  (graphquant.numerics.compare)
from graphquant.tools.accuracy import AccuracyControlReport, quantize_with_accuracy_control
from graphquant.tools.kernel_timing import KernelTiming, time_kernels

# the module paths of releases before the deploy/ and tools/ packages still import:
# `from graphquant.numerics import compare`, `import graphquant.program`
for _module in (archive, compiled, program, torchscript, accuracy, distributed, kernel_timing, numerics):
    _sys.modules.setdefault(f"graphquant.{_module.__name__.rpartition('.')[2]}", _module)

__all__ = [
    "AccuracyControlReport",
    "quantize_with_accuracy_control",
    "GraphQuantError",
    "KernelTiming",
    "ObserverSpec",
    "PreparedModel",
    "QConfig",
    "SmoothQuant",
    "calibrate",
    "compile",
    "CompiledModel",
    "convert",
    "convert_dynamic_jit",
    "convert_jit",
    "default_dynamic_qconfig",
    "default_qconfig",
    "embedding_4bit_qconfig",
    "embedding_qconfig",
    "float16_dynamic_qconfig",
    "float_qparams_weight_only_qconfig",
    "float_qparams_weight_only_qconfig_4bit",
    "get_default_dynamic_qconfig",
    "get_default_qconfig",
    "per_channel_dynamic_qconfig",
    "per_tensor_dynamic_qconfig",
    "per_token_dynamic_qconfig",
    "prepare",
    "qconfig_dict_by_type",
    "time_kernels",
    "prepare_dynamic",
    "prepare_dynamic_jit",
    "prepare_jit",
    "quantize",
    "quantize_dynamic",
    "quantize_dynamic_jit",
    "quantize_jit",
    "load",
    "report",
    "save",
    "to_torchscript",
]
