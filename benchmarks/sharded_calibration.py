#!/usr/bin/env python
"""Calibration time of BERT-base, static, in one process or sharded over two (graphquant.distributed).

    .venv/bin/python benchmarks/sharded_calibration.py [--batches 32,64] [--write]

BERT-base (random weights, ``transformers.BertConfig()``), ``{"": graphquant.default_qconfig}``,
batches of 8x128 tokens (W3's). Each variant runs in fresh processes: "1 process x 2 threads"
calibrates on every batch; "2 processes x 1 thread" is ``torchrun --nproc-per-node 2`` (gloo on
127.0.0.1), each rank calibrating on its round-robin half and merging the observers. The time is
the slowest rank's, from the first batch to merged observers; the merge alone is timed too (a
second merge, after the qparams are recorded). The variants run one after another (interleaved
by data size) on an otherwise idle machine: two 1-thread processes use the same two cores as one
2-thread process. The qparams of the two variants are compared bit for bit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
START, END = "<!-- sharded_calibration:start -->", "<!-- sharded_calibration:end -->"


def child(batches: int, threads: int, out: str) -> None:
    """One rank (or the only process): calibrate, record times and qparams."""
    import torch

    torch.set_num_threads(threads)
    import workloads

    import graphquant as gq
    from graphquant.passes.lower import observer_qparams

    w = workloads.bert_base(8, batches)
    sharded = gq.distributed.init_from_env(timeout_s=1800)
    prepared = gq.prepare(w.model, {"": gq.default_qconfig}, w.calibration[0])
    start = time.perf_counter()
    if sharded:
        gq.distributed.calibrate(prepared, w.calibration, shard=True)
    else:
        gq.calibrate(prepared, w.calibration)
    calibrate_s = time.perf_counter() - start
    assert prepared.graph_module is not None
    observed = observer_qparams(prepared.graph_module)
    qparams = {name: (float(qp.scale), int(qp.zero_point)) for name, qp in observed.items()}
    merge_s = 0.0
    if sharded:
        start = time.perf_counter()
        gq.distributed.merge_observers(prepared)  # timed only: doubles the counts, not the qparams
        merge_s = time.perf_counter() - start
    rank = torch.distributed.get_rank() if sharded else 0
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"calibrate_s": calibrate_s, "merge_s": merge_s,
                                                          "qparams": qparams}))
    if sharded:
        torch.distributed.destroy_process_group()


def run_variant(batches: int, processes: int, tmp: str) -> dict[str, object]:
    out = os.path.join(tmp, f"b{batches}_p{processes}")
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // processes)}
    script = [str(Path(__file__).resolve()), "--child", "--batches", str(batches), "--threads", str(2 // processes),
              "--out", out]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                   "--master-port", "29517", *script]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(processes)]
    return {"calibrate_s": max(r["calibrate_s"] for r in ranks), "merge_s": max(r["merge_s"] for r in ranks),
            "wall_s": wall_s, "qparams": ranks[0]["qparams"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="32,64", help="calibration set sizes, in batches of 8x128")
    parser.add_argument("--write", action="store_true", help="replace the section in BENCHMARKS.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(int(args.batches), args.threads, args.out)
        return
    sizes = [int(s) for s in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batches in sizes:
            one = run_variant(batches, 1, tmp)
            two = run_variant(batches, 2, tmp)
            same = one["qparams"] == two["qparams"]
            rows.append((batches, one, two, same))
            print(f"{batches} batches: 1x2 threads {one['calibrate_s']:.1f} s, 2x1 thread {two['calibrate_s']:.1f} s "
                  f"(merge {two['merge_s'] * 1e3:.0f} ms), qparams identical: {same}", flush=True)
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    lines = [
        START,
        f"Run {datetime.date.today()}: torch {torch.__version__}, {cpu}, {os.cpu_count()} cores. "
        f"Command: `.venv/bin/python benchmarks/sharded_calibration.py --batches {args.batches} --write`",
        "",
        "| calibration set | 1 process x 2 threads | 2 processes x 1 thread | of which merge | speed-up "
        "| process start to exit (1 / 2) | qparams |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for batches, one, two, same in rows:
        lines.append(f"| {batches} x 8x128 | {one['calibrate_s']:.1f} s | {two['calibrate_s']:.1f} s | "
                     f"{two['merge_s'] * 1e3:.0f} ms | {one['calibrate_s'] / two['calibrate_s']:.2f}x | "
                     f"{one['wall_s']:.0f} / {two['wall_s']:.0f} s | "
                     f"{'identical' if same else 'DIFFER'} |")
    lines.append(END)
    text = "\n".join(lines)
    print(text)
    if args.write:
        path = BENCH_DIR.parent / "BENCHMARKS.md"
        doc = path.read_text()
        if START in doc:
            doc = doc[: doc.index(START)] + text + doc[doc.index(END) + len(END):]
        else:
            doc = doc.rstrip() + "\n\n## Sharded calibration (graphquant.distributed)\n\n" + text + "\n"
        path.write_text(doc)


if __name__ == "__main__":
    main()
