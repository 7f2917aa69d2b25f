"""Which int8 GEMM / conv is exact, and how fast, on this CPU (or under an ISA cap).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/isa_kernels.py
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 OMP_NUM_THREADS=2 .venv/bin/python benchmarks/isa_kernels.py

For transformer and CNN shapes, with worst-case operands (uint8 activations over 0..255,
int8 weights over -128..127), each candidate kernel's result is compared with exact integer
math (float64 accumulation of the same integers) and timed (median of interleaved calls):

- fp32: the float op on float operands (the speed to beat; not an int8 kernel)
- u8 (8-bit): oneDNN, one call, full-range uint8 activations (saturates without VNNI)
- u8 split: oneDNN, the activation as two 7-bit halves ``2 * (x >> 1) + (x & 1)``, two calls
- u8 (7-bit acts): oneDNN, one call, activations in 0..127 (``reduce_range``; exact by range)
- s8 src: oneDNN linear with an int8 source (per-token dynamic's int8 values)
- fp32 over ints: the float op over the integer values ``x_q - zp`` and ``w_q`` (every
  product exact in float32; the sums round like float)
- fbgemm (7-bit acts): torch's ``quantized::linear`` on quantized tensors, activations in 0..127
  (torch.ao's x86 setting). fbgemm picks its own ISA: ``ONEDNN_MAX_CPU_ISA`` does not cap it, so
  under the cap on a VNNI machine its time is not an AVX2 figure. Its error is in output steps.
- torch._int_mm: int8 x int8 -> int32 (the activation shifted to int8)

Errors are in units of the accumulator's range, so "0" means exact to float rounding.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from graphquant.kernels import onednn  # noqa: E402


def median_ms(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median milliseconds of each call, timed interleaved after one warm-up call each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _linear_case(m: int, k: int, n: int) -> tuple[dict[str, Callable[[], torch.Tensor]], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
    x[:, ::2] = 255  # 255 beside 255 with weights at the ends: the worst pairs
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    w[:, :8] = 127
    zp = 128
    w_scale = torch.ones(n)
    packed = onednn.pack_linear(w)
    wzp = torch.zeros(n, dtype=torch.int64)
    exact = F.linear(x.double() - zp, w.double())
    xf, wf = torch.randn(m, k), torch.randn(n, k)
    w_ints = w.float()
    hi, lo = x >> 1, x & 1
    x7 = x >> 1
    xs8 = (x.to(torch.int16) - 128).to(torch.int8)

    def call(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(q, scale, zero_point, packed, w_scale, wzp, None, 1.0, 0,
                                                  torch.float32, "none", [], "")

    torch.backends.quantized.engine = "fbgemm"
    qx7 = torch.quantize_per_tensor(x7.float() - 64, 1.0, 64, torch.quint8)
    qw = torch.quantize_per_channel(w.float(), torch.ones(n, dtype=torch.double), torch.zeros(n, dtype=torch.long), 0,
                                    torch.qint8)
    fbgemm_w = torch.ops.quantized.linear_prepack(qw, None)
    exact7 = F.linear(x7.double() - 64, w.double())
    out_scale = float(exact7.max() - exact7.min()) / 255
    out_zp = int(round(-float(exact7.min()) / out_scale))
    w_t = w.t().contiguous()

    fns: dict[str, Callable[[], torch.Tensor]] = {
        "fp32": lambda: F.linear(xf, wf),
        "u8 (8-bit)": lambda: call(x, 1.0, zp),
        "u8 split": lambda: call(x >> 1, 2.0, zp >> 1).add_(call(x & 1, 1.0, zp & 1)),
        "u8 (7-bit acts)": lambda: call(x7, 1.0, 64),
        "s8 src": lambda: call(xs8, 1.0, 0),
        "fp32 over ints": lambda: F.linear(x.float() - zp, w_ints),
        "fbgemm (7-bit acts)": lambda: torch.ops.quantized.linear(qx7, fbgemm_w, out_scale, out_zp).dequantize(),
        "torch._int_mm": lambda: torch._int_mm(xs8, w_t),
    }
    del hi, lo
    exacts = {
        "u8 (7-bit acts)": exact7,
        "fbgemm (7-bit acts)": exact7,
        "s8 src": F.linear(xs8.double(), w.double()),
        "torch._int_mm": F.linear(xs8.double(), w.double()),
    }
    return fns, exact, exacts  # type: ignore[return-value]


def _conv_case(n: int, c: int, o: int, hw: int, k: int, groups: int = 1):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, c, hw, hw), dtype=torch.uint8, generator=g)
    x[:, ::2] = 255
    w = torch.randint(-128, 128, (o, c // groups, k, k), dtype=torch.int8, generator=g)
    w[:, :2] = 127
    zp, pad = 128, k // 2
    w_scale = torch.ones(o)
    packed = onednn.pack_conv(w, w_scale, 1.0, zp, [1, 1], [pad, pad], [1, 1], groups, x_shape=list(x.shape))
    packed7 = onednn.pack_conv(w, w_scale, 1.0, 64, [1, 1], [pad, pad], [1, 1], groups, x_shape=list(x.shape))
    wzp = torch.zeros(o, dtype=torch.int64)
    exact = F.conv2d(x.double() - zp, w.double(), None, 1, pad, 1, groups)
    xf, wf = torch.randn(n, c, hw, hw), torch.randn(o, c // groups, k, k)
    xf = xf.contiguous(memory_format=torch.channels_last)
    w_ints = w.float()
    x7 = x >> 1
    xcl = x.contiguous(memory_format=torch.channels_last)

    def call(q: torch.Tensor, scale: float, zero_point: int, p: torch.Tensor = packed) -> torch.Tensor:
        return torch.ops.onednn.qconv_pointwise(q, scale, zero_point, p, w_scale, wzp, None, [1, 1], [pad, pad],
                                                [1, 1], groups, 1.0, 0, torch.float32, "none", [], "")

    fns = {
        "fp32": lambda: F.conv2d(xf, wf, None, 1, pad, 1, groups),
        "u8 (8-bit)": lambda: call(xcl, 1.0, zp),
        "u8 split": lambda: call(xcl >> 1, 2.0, zp >> 1).add_(call(xcl & 1, 1.0, zp & 1)),
        "u8 (7-bit acts)": lambda: call(x7.contiguous(memory_format=torch.channels_last), 1.0, 64, packed7),
        "fp32 over ints": lambda: F.conv2d(xcl.float() - zp, w_ints, None, 1, pad, 1, groups),
    }
    exacts = {"u8 (7-bit acts)": F.conv2d(x7.double() - 64, w.double(), None, 1, pad, 1, groups)}
    return fns, exact, exacts


CASES = {
    "linear 128x384->1536": lambda: _linear_case(128, 384, 1536),
    "linear 128x1536->384": lambda: _linear_case(128, 1536, 384),
    "linear 1024x768->3072": lambda: _linear_case(1024, 768, 3072),
    "conv 64->64 3x3 56x56 b1": lambda: _conv_case(1, 64, 64, 56, 3),
    "conv 256->1024 1x1 14x14 b1": lambda: _conv_case(1, 256, 1024, 14, 1),
    "depthwise 144 3x3 56x56 b1": lambda: _conv_case(1, 144, 144, 56, 3, groups=144),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "none")
    print(f"ONEDNN_MAX_CPU_ISA={cap}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    print("| case | kernel | ms | vs fp32 | max error / accumulator range |")
    print("| --- | --- | ---: | ---: | ---: |")
    for case in args.cases.split(","):
        fns, exact, exacts = CASES[case]()
        times = median_ms(fns, args.rounds)
        for name, fn in fns.items():
            if name == "fp32":
                err = "—"
            else:
                ref = exacts.get(name, exact)
                out = fn().double()  # type: ignore[union-attr]
                err = f"{float((out - ref).abs().max()) / float(ref.max() - ref.min()):.1e}"
                if name.startswith("fbgemm"):  # uint8 out: its error in output steps
                    err = f"{float((out - ref).abs().max()) / (float(ref.max() - ref.min()) / 255):.1f} steps"
            print(f"| {case} | {name} | {times[name]:.3f} | {times['fp32'] / times[name]:.2f}x | {err} |")


if __name__ == "__main__":
    main()
