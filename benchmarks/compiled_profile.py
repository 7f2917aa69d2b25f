#!/usr/bin/env python
"""Where a call's time goes in graphquant's three forms of one quantized model — the eager
GraphModule, TorchScript and the AOTInductor package — by torch.profiler (issue #16: why the
package is slower than TorchScript on the encoders at batch 8-50).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/compiled_profile.py --workload bert:8 --mode static

The package is compiled as ``graphquant.compile`` compiles it, plus Inductor's
``cpp.enable_kernel_profile``, so each of its generated C++ loops is recorded by name. Each form's
calls are profiled after warm-up; the self CPU time of every recorded op is summed by group (per
call, main thread and OpenMP workers together, so a group can exceed the wall time at 2 threads)
and the wall time of the same calls is beside it. Static calls quantize the linears only (PT2E's
recipe), dynamic calls every linear (graphquant's default dynamic qconfig).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from timing import command_line, cpu_name  # noqa: E402
from workloads import WORKLOADS, Workload  # noqa: E402

import graphquant as gq  # noqa: E402
from graphquant.deploy import compiled  # noqa: E402

GROUPS = ("int8 GEMM / conv (onednn::)", "attention (SDPA, bmm)", "Inductor loops (cpp_fused_*)",
          "other aten ops", "quantize / scale ops")


def group(name: str) -> str:
    """The group an op recorded by torch.profiler falls in."""
    if name.startswith("onednn::") or name.startswith("quantized::"):
        return GROUPS[0]
    if "scaled_dot_product" in name or name in ("aten::bmm", "aten::baddbmm", "aten::matmul"):
        return GROUPS[1]
    if "cpp_fused" in name:
        return GROUPS[2]
    if any(word in name for word in ("aminmax", "quantize", "round", "clamp", "graphquant::")):
        return GROUPS[4]
    return GROUPS[3]


def package(q: nn.Module) -> Callable[..., object]:
    """``q`` compiled as graphquant.compile does, its generated loops recorded by the profiler."""
    path = os.path.join(tempfile.mkdtemp(prefix="graphquant-profile-"), "model.pt2")
    compiled.save_package(q, path, inductor_configs={"cpp.enable_kernel_profile": True})
    return compiled.load_package(path)


def profile(call: Callable[[], object], calls: int) -> tuple[float, dict[str, float], list[tuple[str, float]]]:
    """Wall ms per call, self CPU ms per call by group, and the top ops by self CPU ms per call."""
    for _ in range(3):
        call()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    wall = (time.perf_counter() - start) * 1e3 / calls
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            call()
    by_group: dict[str, float] = defaultdict(float)
    ops = []
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3 / calls
        by_group[group(event.key)] += ms
        ops.append((event.key, ms))
    ops.sort(key=lambda item: -item[1])
    return wall, by_group, ops[:10]


def quantized(w: Workload, mode: str) -> nn.Module:
    if mode == "static":
        qconfig_dict = gq.qconfig_dict_by_type(w.model, {nn.Linear: gq.default_qconfig})
        return gq.quantize(w.model, qconfig_dict, lambda m, bs: [m(*b) for b in bs], [w.calibration],
                           example_inputs=w.calibration[0])
    return gq.quantize_dynamic(w.model, {"": gq.default_dynamic_qconfig}, example_inputs=w.calibration[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="bert:8")
    parser.add_argument("--mode", choices=("static", "dynamic"), default="static")
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    key, batch = args.workload.split(":")
    w = WORKLOADS[key](int(batch), 2)
    q = quantized(w, args.mode)
    forms = {"GraphModule": q, "TorchScript": gq.to_torchscript(q), "AOTI": package(q)}
    print(f"Command: `{command_line()}`; {cpu_name()}, {torch.get_num_threads()} threads; {w.name} {args.mode}\n")
    results = {}
    with torch.no_grad():
        for name, form in forms.items():
            results[name] = profile(lambda form=form: form(*w.timed), args.calls)
    print("| ms per call | " + " | ".join(forms) + " |")
    print("| --- |" + " ---: |" * len(forms))
    print("| wall | " + " | ".join(f"{results[n][0]:.2f}" for n in forms) + " |")
    for g in GROUPS:
        print(f"| {g} | " + " | ".join(f"{results[n][1].get(g, 0.0):.2f}" for n in forms) + " |")
    for name in forms:
        print(f"\n{name}, top ops by self CPU ms per call: "
              + "; ".join(f"{op} {ms:.2f}" for op, ms in results[name][2]))


if __name__ == "__main__":
    main()
