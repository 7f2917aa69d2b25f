"""Per layer, on a CPU whose int8 kernels saturate: which exact path is faster for 8-bit layers.

    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 OMP_NUM_THREADS=2 \\
        .venv/bin/python benchmarks/x86_layers.py --workloads resnet50,mobilenet_v2,minilm

For every distinct conv and linear shape of the benchmark models (batch 1), median of
interleaved calls, with the post-op and the rounding to uint8 included:

- fp32: the float op (the speed an 8-bit layer competes with)
- over ints: graphquant's float32 op over the integer values (kernels/x86.py)
- two calls: two oneDNN int8 calls on the activation's 7-bit halves
- one call: oneDNN's single int8 call, which saturates there (speed only: not exact), except in
  a depthwise conv where the depthwise probe finds it exact
- rule: the path kernels/x86.py takes for the shape (``TWO_CALLS_WEIGHTS_PER_OUTPUT``, depthwise)

Results are printed as a markdown table; the totals weight each shape by how often it occurs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import workloads  # noqa: E402
from isa_kernels import median_ms  # noqa: E402

from graphquant.kernels import onednn, x86  # noqa: E402


def _layer_shapes(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[tuple, int]:
    """(kind, input shape, weight shape, stride, padding, dilation, groups) -> how many layers."""
    seen: dict[tuple, int] = {}

    def hook(m: nn.Module, args: tuple[torch.Tensor, ...], _out: object) -> None:
        if isinstance(m, nn.Conv2d):
            key = ("conv", tuple(args[0].shape), tuple(m.weight.shape), tuple(m.stride), tuple(m.padding),
                   tuple(m.dilation), m.groups)
        else:
            key = ("linear", tuple(args[0].shape), tuple(m.weight.shape), (), (), (), 1)
        seen[key] = seen.get(key, 0) + 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(*inputs)
    for h in handles:
        h.remove()
    return seen


def _cases(key: tuple) -> tuple[dict[str, Callable[[], object]], str]:
    kind, x_shape, w_shape, stride, padding, dilation, groups = key
    g = torch.Generator().manual_seed(0)
    out = w_shape[0]
    w = torch.randint(-128, 128, w_shape, dtype=torch.int8, generator=g)
    w_scale, bias, w_zp = torch.rand(out, generator=g) * 0.01 + 1e-3, torch.randn(out, generator=g), torch.zeros(
        out, dtype=torch.int64)
    w_float = torch.randn(w_shape, generator=g)
    if kind == "conv":
        x = torch.randint(0, 256, x_shape, dtype=torch.uint8, generator=g).contiguous(memory_format=torch.channels_last)
        x_float = torch.randn(x_shape, generator=g).contiguous(memory_format=torch.channels_last)
        conv = (list(stride), list(padding), list(dilation), groups)
        packed = onednn.pack_conv(w, w_scale, 0.03, 120, *conv, x_shape=list(x_shape))

        def finish(v: torch.Tensor) -> torch.Tensor:
            return x86.quantize_real(v.clamp_min_(0.0), 0.05, 3)

        fns: dict[str, Callable[[], object]] = {
            "fp32": lambda: F.relu(F.conv2d(x_float, w_float, bias, *conv)),
            "over ints": lambda: finish(x86._conv_over_ints(x, 0.03, 120, packed, w_scale, bias, *conv)),
            "two calls": lambda: finish(x86._conv_two_halves(x, 0.03, 120, packed, w_scale, w_zp, bias, *conv)),
            "one call": lambda: x86.qconv_call(x, 0.03, 120, packed, w_scale, w_zp, bias, *conv, 0.05, 3, None, "relu",
                                               [], 255, False),
        }
        positions = x_shape[0]
        for size, step in zip(x_shape[2:], stride, strict=True):
            positions *= max(1, size // step)
        if x86.is_depthwise(packed, groups) and not x86.saturates(True):
            return fns, "one call"  # oneDNN's depthwise kernel does not saturate here: exact
        rule = "two calls" if packed.numel() > x86.TWO_CALLS_WEIGHTS_PER_OUTPUT * positions else "over ints"
        return fns, rule
    x = torch.randint(0, 256, x_shape, dtype=torch.uint8, generator=g)
    x_float = torch.randn(x_shape, generator=g)
    packed = onednn.pack_linear(w)

    def linear(q: torch.Tensor, scale: float, zero_point: int, b: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(q, scale, zero_point, packed, w_scale, w_zp, b, 1.0, 0,
                                                  torch.float32, "none", [], "")

    def two_calls() -> torch.Tensor:
        v = linear(x >> 1, 0.06, 60, bias).add_(linear(x & 1, 0.03, 0, None))
        return x86.quantize_real(v, 0.05, 3)

    fns = {
        "fp32": lambda: F.linear(x_float, w_float, bias),
        "over ints": lambda: x86.qlinear_call(x, 0.03, 120, packed, w_scale, w_zp, bias, 0.05, 3, None, "none", [],
                                              255, True),
        "two calls": two_calls,
        "one call": lambda: x86.qlinear_call(x, 0.03, 120, packed, w_scale, w_zp, bias, 0.05, 3, None, "none", [], 255,
                                             False),
    }
    return fns, "over ints"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="resnet50,mobilenet_v2,minilm")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"saturates here: {x86.saturates()} (the table means something only where it does)")
    print("| model | layer (x -> w, groups) | n | fp32 ms | over ints | two calls | one call (saturating) | rule |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in args.workloads.split(","):
        workload = getattr(workloads, name)(1, 1)
        totals = {"fp32": 0.0, "over ints": 0.0, "two calls": 0.0, "one call": 0.0, "rule": 0.0}
        for key, count in _layer_shapes(workload.model.eval(), workload.timed).items():
            fns, rule = _cases(key)
            ms = median_ms(fns, args.rounds)
            for k, v in ms.items():
                totals[k] += v * count
            totals["rule"] += ms[rule] * count
            exact = ("over ints", "two calls", "one call") if rule == "one call" else ("over ints", "two calls")
            best = min(exact, key=lambda k: ms[k])
            mark = "" if best == rule else f" ({best} faster)"
            print(f"| {name} | {key[0]} {key[1]} -> {key[2]}, g{key[6]} | {count} | {ms['fp32']:.3f} | "
                  f"{ms['over ints']:.3f} | {ms['two calls']:.3f} | {ms['one call']:.3f} | {rule}{mark} |")
        print(f"| {name} | **sum over layers** | | {totals['fp32']:.2f} | {totals['over ints']:.2f} | "
              f"{totals['two calls']:.2f} | {totals['one call']:.2f} | rule: {totals['rule']:.2f} |")


if __name__ == "__main__":
    main()
