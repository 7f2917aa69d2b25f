#!/usr/bin/env python
"""Peak resident memory while quantizing BERT-base, against the float model's size.

    .venv/bin/python benchmarks/quantize_memory.py [--mode static|dynamic|both] [--write]

Each measurement runs in a fresh child process: it builds BERT-base (random weights, from
``transformers.BertConfig()``), records its RSS, then quantizes (static: prepare, calibrate on
8 batches of 8x128 tokens, convert; dynamic: ``quantize_dynamic`` with example inputs) and
reads the peak RSS (``ru_maxrss``). The figure the issue asks for is the peak added by
quantizing, in multiples of the float model's parameter bytes; the float model itself and the
interpreter (torch, transformers) are there before quantization starts and are reported apart.
Memory does not depend on how busy the machine is, unlike the timings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import warnings
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
START, END = "<!-- quantize_memory:start -->", "<!-- quantize_memory:end -->"


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str) -> None:
    warnings.filterwarnings("ignore")
    import torch
    from workloads import bert_base

    import graphquant as gq

    torch.set_num_threads(2)
    w = bert_base(8, 8)
    model_mib = sum(p.numel() * p.element_size() for p in w.model.parameters()) / 2**20
    before = _rss_mib()
    peak_before = _peak_mib()
    if mode == "static":
        q = gq.quantize(w.model, {"": gq.default_qconfig}, lambda m, bs: [m(*b) for b in bs], [w.calibration],
                        example_inputs=w.calibration[0])
    else:
        q = gq.quantize_dynamic(w.model, {"": gq.default_dynamic_qconfig}, example_inputs=w.calibration[0])
    with torch.no_grad():
        q(*w.timed)
    print(json.dumps({"mode": mode, "model_mib": model_mib, "rss_before_mib": before, "peak_before_mib": peak_before,
                      "peak_mib": _peak_mib(), "rss_after_mib": _rss_mib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="both", choices=["static", "dynamic", "both"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help="replace the section in BENCHMARKS.md")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    rows = ["| mode | float params MiB | RSS before quantizing MiB | peak RSS MiB | added by quantizing MiB "
            "| added / model size |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for mode in ["static", "dynamic"] if args.mode == "both" else [args.mode]:
        env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
        out = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True, env=env,
                             check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        base = max(r["rss_before_mib"], r["peak_before_mib"])
        added = r["peak_mib"] - base
        rows.append(f"| {mode} | {r['model_mib']:.0f} | {base:.0f} | {r['peak_mib']:.0f} | {added:.0f} "
                    f"| {added / r['model_mib']:.2f}x |")
        print(rows[-1], flush=True)
    from timing import cpu_name

    body = "\n".join([f"Command: `.venv/bin/python benchmarks/quantize_memory.py {' '.join(sys.argv[1:])}` "
                      f"({datetime.date.today().isoformat()}, {cpu_name()})", "",
                      "BERT-base (random weights), static: 8 calibration batches of 8x128 tokens; each mode in a fresh "
                      "process; peak from `ru_maxrss`. The float model and the interpreter (torch, transformers) are in "
                      '"RSS before quantizing"; the target (peak RSS at most 2x the model) is read on what quantizing '
                      "adds.", "", *rows])
    print(body)
    if args.write:
        from timing import REPO_ROOT, write_section

        write_section(REPO_ROOT / "BENCHMARKS.md", START, END, body, "## Memory while quantizing (`benchmarks/quantize_memory.py`)")


if __name__ == "__main__":
    main()
