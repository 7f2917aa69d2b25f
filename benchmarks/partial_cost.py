#!/usr/bin/env python
"""What partial graph mode costs: tests/test_partial.py's model (an `if` on a tensor, an `.item()`,
a data-dependent loop; 7 regions) quantized region by region, against its exportable twin quantized
whole and against float.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/partial_cost.py

SQNR against float on one batch of 8, then the time per call: 5 interleaved rounds of 50 calls
each, the median round. Run it on a quiet machine.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    warnings.simplefilter("ignore")
    import test_partial

    from graphquant.quant_math import sqnr

    model, twin = test_partial.Net().eval(), test_partial.Net(fixed=True).eval()
    partial, whole = test_partial._quantize(model), test_partial._quantize(twin)
    x = torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(11))
    variants = {"float": model, "partial (7 regions)": partial, "whole (exportable twin)": whole}
    with torch.no_grad():
        print(f"SQNR vs float: partial {sqnr(model(x), partial(x)):.1f} dB, whole {sqnr(twin(x), whole(x)):.1f} dB")
        for f in variants.values():
            for _ in range(20):
                f(x)
        rounds: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(5):
            for name, f in variants.items():
                start = time.perf_counter()
                for _ in range(50):
                    f(x)
                rounds[name].append((time.perf_counter() - start) / 50 * 1e3)
    for name, times in rounds.items():
        print(f"{name}: {sorted(times)[2]:.2f} ms per call (batch 8, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
