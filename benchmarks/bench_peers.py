#!/usr/bin/env python
"""graphquant against every peer on the issue's workloads, interleaved in one process.

    make bench                                                # the full table, written to BENCHMARKS.md
    .venv/bin/python benchmarks/bench_peers.py --quick        # a subset in a few minutes
    .venv/bin/python benchmarks/bench_peers.py --workloads minilm:1 --modes dynamic --threads 2

For each workload and mode every variant is built once (quantize time and first call
measured), checked against fp32 on held-out batches (SQNR; W4 also the sentence
embeddings' cosine), then timed in interleaved rounds at each thread count. Peers that
cannot take a model get a note with the reason instead of a row.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from peers import BUILDERS, Unsupported, Variant, forget_quantized  # noqa: E402
from timing import REPO_ROOT, command_line, cpu_name, time_interleaved, write_section  # noqa: E402
from workloads import WORKLOADS, Workload  # noqa: E402

START, END = "<!-- bench_peers:start -->", "<!-- bench_peers:end -->"
FULL = "mobilenet_v2:1,minilm:1,resnet50:1,minilm:50,bert:1,resnet50:8,bert:8"
QUICK = "mobilenet_v2:1,minilm:1"
# the issue's latency targets: graphquant at most this times the fastest peer (W2: ONNX Runtime)
LATENCY_TARGET = {"W1": 0.9, "W2": 1.0, "W3": 0.9, "W4": 0.9}


@dataclass
class Row:
    workload: Workload
    mode: str
    threads: int
    variant: Variant
    median_ms: float
    iqr_ms: float
    sqnr_db: float | None
    cosine: tuple[float, float] | None


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    noise = (reference.float() - output.float()).pow(2).sum().item()
    signal = reference.float().pow(2).sum().item()
    return float("inf") if noise == 0.0 else 10.0 * float(torch.log10(torch.tensor(signal / noise)))


def fidelity(w: Workload, variant: Variant, reference: list[torch.Tensor]) -> tuple[float, tuple[float, float] | None]:
    with torch.no_grad():
        outputs = [variant.call(batch) for batch in w.evaluation]
    db = sqnr_db(torch.cat(reference), torch.cat(outputs))
    if w.embed is None:
        return db, None
    cos = torch.cat([(w.embed(r, b) * w.embed(o, b)).sum(-1) for r, o, b in zip(reference, outputs, w.evaluation)])
    return db, (float(cos.mean()), float(cos.min()))


def build(w: Workload, mode: str, threads: int, only: set[str] | None, notes: list[str]) -> list[Variant]:
    built: list[Variant] = []
    for key, builder in BUILDERS[mode]:
        if only is not None and key not in only and key != "fp32":
            continue
        print(f"[{w.name} {mode}] building {key}", file=sys.stderr, flush=True)
        try:
            built.append(builder(w, mode, threads))
        except Unsupported as why:
            notes.append(f"{w.key} {w.name} {mode}: {key} — {why}")
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            notes.append(f"{w.key} {w.name} {mode}: {key} failed — {type(error).__name__}: "
                         f"{str(error).splitlines()[0][:120] if str(error) else ''}")
        gc.collect()
    return built


def bench(w: Workload, mode: str, args: argparse.Namespace, notes: list[str], threads_list: list[int]) -> list[Row]:
    torch.set_num_threads(args.threads[0])
    variants = build(w, mode, args.threads[0], args.only, notes)
    with torch.no_grad():
        reference = [w.model(*batch) for batch in w.evaluation]
    quality = {v.name: fidelity(w, v, reference) for v in variants[1:]}
    rows: list[Row] = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        calls = {}
        for v in variants:
            call = v.call if v.at_threads is None or threads == args.threads[0] else v.at_threads(threads)
            calls[v.name] = (lambda call=call: call(w.timed))
        print(f"[{w.name} {mode}] timing {len(calls)} variants at {threads} threads", file=sys.stderr, flush=True)
        with torch.no_grad():
            timing = time_interleaved(calls, args.rounds, args.warmup, args.quiet_only, max_seconds=args.max_seconds)
        notes.append(f"{w.name} {mode}, {threads} threads: {timing.describe()}")
        timed = list(variants)
        for v in variants:
            if v.alone is None:
                continue
            alone = dataclasses.replace(v, name=f"{v.name} (spinning, timed alone)", at_threads=None, alone=None)
            call = v.alone(threads)
            with torch.no_grad():
                solo = time_interleaved({alone.name: lambda call=call: call(w.timed)}, args.rounds, args.warmup,
                                        args.quiet_only, max_seconds=args.max_seconds)
            notes.append(f"{w.name} {mode}, {threads} threads, {alone.name}: {solo.describe()}")
            quality[alone.name] = quality.get(v.name, (None, None))
            timing.samples[alone.name] = solo.samples[alone.name]
            timed.append(alone)
        for v in timed:
            db, cos = quality.get(v.name, (None, None))
            rows.append(Row(w, mode, threads, v, timing.median_ms(v.name), timing.iqr_ms(v.name), db, cos))
        print(render_rows(rows[-len(timed):]), file=sys.stderr, flush=True)
    torch.set_num_threads(args.threads[0])
    return report_only(w, rows)


def _freed(inputs: object) -> torch.Tensor:
    raise RuntimeError("bench_peers: this variant's model was freed after its workload was timed")


def report_only(w: Workload, rows: list[Row]) -> list[Row]:
    """``rows`` holding only what the report reads: no model, no variant's call, no batches. Rows
    that held them kept every workload's float model and all its quantized, compiled and ONNX
    Runtime variants alive to the end of the run: the full run was killed for memory (24 GB) at
    its last workload."""
    label = dataclasses.replace(w, model=torch.nn.Module(), timed=(), calibration=[], evaluation=[], embed=None)
    return [dataclasses.replace(r, workload=label, variant=dataclasses.replace(r.variant, call=_freed, at_threads=None,
                                                                             alone=None))
            for r in rows]


def _mib(size: int | None) -> str:
    return "—" if size is None else f"{size / 2**20:.1f}"


def _opt(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def render_rows(rows: list[Row]) -> str:
    lines = ["| workload | mode | threads | variant | median ms | IQR ms | vs fp32 | vs fastest peer | SQNR dB "
             "| cosine mean / min | size MiB | quantize s | first call s |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        group = [g for g in rows if g.workload is r.workload and g.mode == r.mode and g.threads == r.threads]
        fp32 = next(g for g in group if g.variant.name == "fp32 eager")
        peers = [g.median_ms for g in group if g.variant.peer]
        vs_peer = f"{r.median_ms / min(peers):.2f}x" if peers and r.variant.name != "fp32 eager" else "—"
        cos = "—" if r.cosine is None else f"{r.cosine[0]:.4f} / {r.cosine[1]:.4f}"
        lines.append(
            f"| {r.workload.key} {r.workload.name} | {r.mode} | {r.threads} | {r.variant.name} | {r.median_ms:.2f} "
            f"| {r.iqr_ms:.2f} | {fp32.median_ms / r.median_ms:.2f}x | {vs_peer} | {_opt(r.sqnr_db, '.1f')} | {cos} "
            f"| {_mib(r.variant.size_bytes)} | {_opt(r.variant.quantize_s, '.1f')} "
            f"| {_opt(r.variant.first_call_s, '.2f')} |"
        )
    return "\n".join(lines)


def render_targets(rows: list[Row], threads: int) -> str:
    """One line per workload and mode: graphquant's fastest variant against the fastest peer, and
    graphquant's most faithful variant against the most faithful peer."""
    lines = ["| workload | mode | graphquant fastest | ms | fastest peer | ms | ratio | target | met "
             "| graphquant most faithful | SQNR dB | cosine mean | best peer SQNR dB | peer cosine mean "
             "| quantize s (graphquant / quantize_jit) |",
             "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    seen = []
    for r in rows:
        if r.threads == threads and (r.workload, r.mode) not in seen:
            seen.append((r.workload, r.mode))
    for w, mode in seen:
        group = [r for r in rows if r.workload is w and r.mode == mode and r.threads == threads]
        ours = [r for r in group if r.variant.name.startswith("graphquant")]
        peers = [r for r in group if r.variant.peer]
        if not ours or not peers:
            continue
        best = min(ours, key=lambda r: r.median_ms)
        rivals = [r for r in peers if r.variant.name.startswith("ONNX")] if w.key == "W2" else peers
        fastest = min(rivals or peers, key=lambda r: r.median_ms)
        ratio = best.median_ms / fastest.median_ms
        target = LATENCY_TARGET[w.key]
        faithful = max(ours, key=lambda r: -1e9 if r.sqnr_db is None else r.sqnr_db)
        peer_best = max(peers, key=lambda r: -1e9 if r.sqnr_db is None else r.sqnr_db)
        jit = next((r for r in peers if "jit" in r.variant.name), None)
        qtime = f"{_opt(best.variant.quantize_s, '.1f')} / {_opt(jit.variant.quantize_s if jit else None, '.1f')}"

        def cos(r: Row) -> str:
            return "—" if r.cosine is None else f"{r.cosine[0]:.4f}"

        lines.append(
            f"| {w.key} {w.name} | {mode} | {best.variant.name} | {best.median_ms:.2f} | {fastest.variant.name} "
            f"| {fastest.median_ms:.2f} | {ratio:.2f}x | {target:.1f}x | {'yes' if ratio <= target else 'no'} "
            f"| {faithful.variant.name} | {_opt(faithful.sqnr_db, '.1f')} | {cos(faithful)} "
            f"| {_opt(peer_best.sqnr_db, '.1f')} ({peer_best.variant.name}) | {cos(peer_best)} | {qtime} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=None, help=f"name:batch,... (default {FULL}; quick {QUICK})")
    parser.add_argument("--modes", default="static,dynamic", help="static,dynamic (encoders run both)")
    parser.add_argument("--only", default=None, help="comma separated builder keys to run beside fp32")
    parser.add_argument("--threads", default="2,1", help="thread counts, timed in this order (default 2,1)")
    parser.add_argument("--other-threads-max-batch", type=int, default=1,
                        help="time the thread counts after the first only up to this batch size (default 1)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds wanted (default 30, quick 8)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per variant (default 3, quick 1)")
    parser.add_argument("--max-seconds", type=float, default=None, help="cap per timing (default 40, quick 10)")
    parser.add_argument("--calibration-batches", type=int, default=None, help="default 8, quick 2")
    parser.add_argument("--image", type=int, default=224, help="image side for W1/W2 (default 224)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length for W3/W4 (default 128)")
    parser.add_argument("--quiet-only", type=float, default=0.0, metavar="SECONDS",
                        help="keep only rounds timed while other processes were idle, waiting up to SECONDS")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK} at 2 threads, few rounds")
    parser.add_argument("--write", action="store_true", help="replace the bench_peers section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.quick and args.threads == "2,1":
        args.threads = "2"
    args.workloads = args.workloads or (QUICK if args.quick else FULL)
    args.threads = [int(t) for t in args.threads.split(",")]
    args.modes = set(args.modes.split(","))
    args.only = None if args.only is None else set(args.only.split(","))
    args.rounds = args.rounds or (8 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.max_seconds = args.max_seconds or (10.0 if args.quick else 40.0)
    args.calibration_batches = args.calibration_batches or (2 if args.quick else 8)
    return args


def report(rows: list[Row], notes: list[str], args: argparse.Namespace, elapsed: float, done: int, total: int) -> str:
    partial = "" if done == total else f" PARTIAL: {done} of {total} workloads done."
    body = [
        f"Command: `{command_line()}`",
        "",
        f"Run {datetime.date.today().isoformat()} in {elapsed / 60:.0f} min: torch {torch.__version__}, {cpu_name()}, "
        f"{os.cpu_count()} cores; threads {', '.join(map(str, args.threads))} (the second count for batch "
        f"<= {args.other_threads_max_batch} only); {args.calibration_batches} calibration batches; up to {args.rounds} "
        f"interleaved rounds per timing (capped at {args.max_seconds:.0f} s).{partial}",
        "",
        f"Targets at {args.threads[0]} threads: graphquant's fastest variant against the fastest peer (W2: against "
        "ONNX Runtime), and its most faithful variant against the most faithful peer:",
        "",
        render_targets(rows, args.threads[0]),
        "",
        "All rows:",
        "",
        render_rows(rows),
        "",
        *[f"- {note}" for note in notes],
    ]
    return "\n".join(body)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.backends.quantized.engine = "x86"
    rows: list[Row] = []
    notes: list[str] = []
    specs = args.workloads.split(",")
    text = ""
    for done, spec in enumerate(specs, 1):
        name, batch = spec.split(":")
        factory = WORKLOADS[name]
        kwargs = {"image": args.image} if name in ("resnet50", "mobilenet_v2") else {"seq": args.seq}
        w = factory(int(batch), args.calibration_batches, **kwargs)  # type: ignore[call-arg]
        threads = args.threads if int(batch) <= args.other_threads_max_batch else args.threads[:1]
        for mode in w.modes:
            if mode in args.modes:
                rows += bench(w, mode, args, notes, threads)
                forget_quantized()  # a mode's variants go before the next mode's are built (BERT-base b8: 20 GB)
                torch._dynamo.reset()  # PT2E's compiled graphs (and their frozen weights) live in dynamo's cache
                gc.collect()
        del w
        gc.collect()
        text = report(rows, notes, args, time.perf_counter() - started, done, len(specs))
        if args.write:  # after every workload: a run cut short still leaves its table
            write_section(REPO_ROOT / "BENCHMARKS.md", START, END, text,
                          "## graphquant against its peers (`benchmarks/bench_peers.py`)")
    print(text)


if __name__ == "__main__":
    main()
