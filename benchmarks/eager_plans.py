#!/usr/bin/env python
"""The eager GraphModule with and without its call sites' plans (kernels/direct.py), beside its
TorchScript form, interleaved in one process (issue #16: the eager path's cost per int8 op).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/eager_plans.py [--workloads mobilenet_v2:1,minilm:1]

Without plans is a copy of the same GraphModule whose code was generated with ``direct.call_for``
answering None: each call runs the whole checked kernel, as before plans. Static, graphquant's default x86 qconfig on
the whole model (MobileNetV2, ResNet-50) or on the linears (the encoders); benchmarks/workloads.py.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import fx, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from timing import command_line, cpu_name, time_interleaved  # noqa: E402
from workloads import WORKLOADS, Workload  # noqa: E402

import graphquant as gq  # noqa: E402
from graphquant.kernels import direct  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="mobilenet_v2:1,resnet50:1,minilm:1,bert:1")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(f"Command: `{command_line()}`; {cpu_name()}, {torch.get_num_threads()} threads\n")
    print("| workload | GraphModule, plans ms | without plans ms | TorchScript ms | plans vs without "
          "| vs TorchScript |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for item in args.workloads.split(","):
        key, batch = item.split(":")
        print(row(WORKLOADS[key](int(batch), 2), args.rounds), flush=True)


def row(w: Workload, rounds: int) -> str:
    """One table row: ``w`` quantized, timed as the GraphModule with and without plans and as TorchScript."""
    qconfig_dict = ({"": gq.default_qconfig} if w.kind == "cnn"
                    else gq.qconfig_dict_by_type(w.model, {nn.Linear: gq.default_qconfig}))
    q = gq.quantize(w.model, qconfig_dict, lambda m, bs: [m(*b) for b in bs], [w.calibration],
                    example_inputs=w.calibration[0])
    scripted = gq.to_torchscript(q)
    call_for = direct.call_for
    direct.call_for = lambda kernel, plannable: call_for(kernel, False)  # type: ignore[assignment]
    try:
        unplanned = fx.GraphModule(q, copy.deepcopy(q.graph))  # q's tensors, its forward generated again
    finally:
        direct.call_for = call_for
    assert "_gq_" in unplanned.code
    with torch.no_grad():
        timing = time_interleaved({"plans": lambda: q(*w.timed), "without": lambda: unplanned(*w.timed),
                                   "torchscript": lambda: scripted(*w.timed)}, rounds, warmup=3)
    plans, without, ts = (timing.median_ms(n) for n in ("plans", "without", "torchscript"))
    return f"| {w.key} {w.name} | {plans:.2f} | {without:.2f} | {ts:.2f} | {plans / without:.2f}x | {plans / ts:.2f}x |"

if __name__ == "__main__":
    main()
