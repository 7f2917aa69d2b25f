"""What one int8 conv call costs outside oneDNN's kernel, layer by layer (issue #16).

A 1x1 conv over a 1x32x8x8 uint8 activation (oneDNN's kernel itself takes about 1 µs, see
``ONEDNN_VERBOSE=1``), called in a loop at each layer of the eager path:

- ``torch.ops.onednn.qconv_pointwise`` directly: PyTorch's oneDNN op (what Inductor's generated
  code and the TorchScript twins call; its own overhead is the floor for every PyTorch runtime);
- ``kernels.x86.qconv_call`` and ``kernels.onednn.qconv_run``: graphquant's shared kernel body;
- ``kernels.onednn.qconv``: the eager kernel with its argument checks;
- ``torch.ops.graphquant.qconv2d``: through PyTorch's dispatcher (how a GraphModule called kernels
  before direct calls);
- the direct call a quantized GraphModule's forward made before plans (``kernels/direct.py``), and
  the one it makes now: a call site of constants, with its plan for the input's shape.

The same for a linear (1x64 -> 64), its planned call beside ``onednn::qlinear_pointwise``, and for
the residual conv ``relu(conv(x) + accum)`` beside ``onednn::qconv2d_pointwise.binary`` (both copy
the accumulator, which the op overwrites).

Usage: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/eager_op_cost.py`` (quiet machine).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import graphquant  # noqa: F401  (registers torch.ops.graphquant)
from graphquant.kernels import direct, onednn, registry, x86


def per_call_us(call: Callable[[], object], calls: int = 3000, rounds: int = 5) -> float:
    for _ in range(200):
        call()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> None:
    torch.set_num_threads(2)
    x = torch.randint(0, 255, (1, 32, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    w = torch.randint(-127, 127, (32, 32, 1, 1), dtype=torch.int8)
    w_scale, w_zp, bias = torch.full((32,), 0.01), torch.zeros(32, dtype=torch.int64), torch.zeros(32)
    packed = onednn.pack_conv(w, w_scale, 0.1, 0, [1, 1], [0, 0], [1, 1], 1, (1, 32, 8, 8))
    conv = [[1, 1], [0, 0], [1, 1], 1]
    op = torch.ops.graphquant.qconv2d.default
    direct_call = direct.call_for(registry.KERNELS["qconv2d"], plannable=False)
    planned = direct.planned_call(registry.KERNELS["qconv2d"])
    layers = {
        "onednn::qconv_pointwise (PyTorch's op)": lambda: torch.ops.onednn.qconv_pointwise(
            x, 0.1, 0, packed, w_scale, w_zp, bias, *conv, 0.2, 0, torch.uint8, "relu", [], ""),
        "kernels.x86.qconv_call": lambda: x86.qconv_call(x, 0.1, 0, packed, w_scale, w_zp, bias, *conv, 0.2, 0, None,
                                                         "relu", [], 255, False),
        "kernels.onednn.qconv_run": lambda: onednn.qconv_run(x, 0.1, 0, packed, w_scale, w_zp, bias, *conv, 0.2, 0,
                                                             "relu", [], 255, False, [1, 32, 8, 8]),
        "kernels.onednn.qconv (checks)": lambda: onednn.qconv(x, 0.1, 0, packed, w_scale, bias, *conv, 0.2, 0, "relu"),
        "torch.ops.graphquant.qconv2d (dispatcher)": lambda: op(x, 0.1, 0, packed, w_scale, bias, *conv, 0.2, 0,
                                                                 "relu"),
        "direct call, no plan": lambda: direct_call(x, 0.1, 0, packed, w_scale, bias, *conv, 0.2, 0, "relu", [], 255),
        "direct call with its plan (GraphModule forward)": lambda: planned(x, 0.1, 0, packed, w_scale, bias, *conv,
                                                                           0.2, 0, "relu", [], 255),
    }
    report(layers)
    x = torch.randint(0, 255, (1, 64), dtype=torch.uint8)
    w_scale, w_zp, bias = torch.full((64,), 0.01), torch.zeros(64, dtype=torch.int64), torch.zeros(64)
    packed = onednn.pack_linear(torch.randint(-127, 127, (64, 64), dtype=torch.int8))
    planned = direct.planned_call(registry.KERNELS["qlinear"])
    report({
        "onednn::qlinear_pointwise (PyTorch's op)": lambda: torch.ops.onednn.qlinear_pointwise(
            x, 0.1, 0, packed, w_scale, w_zp, bias, 0.2, 0, torch.uint8, "none", [], ""),
        "kernels.onednn.qlinear (checks)": lambda: onednn.qlinear(x, 0.1, 0, packed, w_scale, bias, 0.2, 0, "none"),
        "direct call with its plan (GraphModule forward)": lambda: planned(x, 0.1, 0, packed, w_scale, bias, 0.2, 0,
                                                                           "none", [], False, 255),
    })
    x = torch.randint(0, 255, (1, 32, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    accum = torch.randint(0, 255, (1, 32, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    w_scale, w_zp, bias = torch.full((32,), 0.01), torch.zeros(32, dtype=torch.int64), torch.zeros(32)
    packed = onednn.pack_conv(w, w_scale, 0.1, 0, [1, 1], [0, 0], [1, 1], 1, (1, 32, 8, 8))
    planned = direct.planned_call(registry.KERNELS["qconv2d_add"])
    report({
        "onednn::qconv2d_pointwise.binary (PyTorch's op)": lambda: torch.ops.onednn.qconv2d_pointwise.binary(
            x, 0.1, 0, packed, w_scale, w_zp, accum.clone(), bias, *conv, 0.2, 0, torch.uint8, 0.1, 0, "sum", 1.0,
            "relu", [], ""),
        "kernels.onednn.qconv_add (checks)": lambda: onednn.qconv_add(x, 0.1, 0, packed, w_scale, bias, *conv, accum,
                                                                      0.1, 0, 0.2, 0, "relu"),
        "direct call with its plan (GraphModule forward)": lambda: planned(x, 0.1, 0, packed, w_scale, bias, *conv,
                                                                           accum, 0.1, 0, 0.2, 0, "relu", False, 255),
    })


def report(layers: dict[str, Callable[[], object]]) -> None:
    floor = None
    for name, call in layers.items():
        us = per_call_us(call)
        floor = us if floor is None else floor
        print(f"{name:50s} {us:6.1f} us   (+{us - floor:5.1f} us over PyTorch's op)")


if __name__ == "__main__":
    main()
