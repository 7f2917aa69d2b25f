#!/usr/bin/env python
"""Interleaved latency benchmark on a small ResNet: fp32 eager vs graphquant int8 vs
torch.ao.quantization.quantize_jit (TorchScript graph mode, x86 engine).

Each round times every variant once, in a shuffled order, after a warm-up; the
report gives the median and interquartile range over rounds, so a noisy moment on
the machine hits all variants alike instead of one of them.

    .venv/bin/python benchmarks/bench_cnn.py             # markdown table to stdout
    .venv/bin/python benchmarks/bench_cnn.py --quick     # fewer rounds, for a smoke test
    .venv/bin/python benchmarks/bench_cnn.py --write     # also update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from models import make_small_resnet  # noqa: E402

START_MARKER = "<!-- bench_cnn:start -->"
END_MARKER = "<!-- bench_cnn:end -->"
INPUT_SHAPE = (3, 64, 64)
CALIBRATION_IMAGES = 32
EVAL_IMAGES = 32
VARIANTS = ("graphquant", "quantize_jit")  # fp32 eager always runs: it is the baseline

Batches = list[torch.Tensor]


@dataclass
class Variant:
    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    size_bytes: int | None
    quantize_s: float | None


@dataclass
class Row:
    batch_size: int
    variant: str
    median_ms: float
    iqr_ms: float
    speedup: float
    sqnr_db: float | None
    size_bytes: int | None
    quantize_s: float | None


def run_calibration(model: Callable[[torch.Tensor], torch.Tensor], batches: Batches) -> None:
    """run_fn for both quantizers: one forward per calibration batch."""
    with torch.no_grad():
        for batch in batches:
            model(batch)


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    noise = (reference - output).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(torch.log10(torch.tensor(signal / noise)))


def state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def script_bytes(model: torch.jit.ScriptModule) -> int:
    buffer = io.BytesIO()
    torch.jit.save(model, buffer)
    return buffer.tell()


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence C++ TORCH_WARNs (the quantized-dtype deprecation notice), which
    bypass Python's warnings module and write straight to file descriptor 2."""
    sys.stderr.flush()
    saved_fd = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        os.close(devnull)


def build_fp32(model: nn.Module) -> Variant:
    return Variant("fp32 eager", model, state_dict_bytes(model), None)


def graphquant_missing() -> str | None:
    """Why the graphquant variant cannot run, or None when its API is there."""
    try:
        import graphquant
    except Exception as error:
        return f"graphquant not importable ({type(error).__name__}: {error})"
    absent = [name for name in ("quantize", "get_default_qconfig") if not hasattr(graphquant, name)]
    if absent:
        return f"graphquant has no {', '.join(absent)} yet"
    return None


def build_graphquant(model: nn.Module, example: torch.Tensor, calibration: Batches) -> Variant:
    import graphquant

    start = time.perf_counter()
    qmodel = graphquant.quantize(
        copy.deepcopy(model),
        {"": graphquant.get_default_qconfig("x86")},
        run_calibration,
        [calibration],
        example_inputs=(example,),
        debug=False,
    )
    quantize_s = time.perf_counter() - start
    size: int | None = None
    try:
        if any(tensor.dtype == torch.int8 for tensor in qmodel.state_dict().values()):
            size = state_dict_bytes(qmodel)
        else:  # weights live only in opaque packed form: the state_dict bytes would understate
            print("note: graphquant state_dict holds no int8 weights; size n/a", file=sys.stderr)
    except Exception as error:  # opaque packed weights must not leak into the state dict
        print(f"note: graphquant state_dict does not save: {error}", file=sys.stderr)
    return Variant("graphquant int8", qmodel, size, quantize_s)


def build_quantize_jit(model: nn.Module, example: torch.Tensor, calibration: Batches) -> Variant:
    from torch.ao.quantization import get_default_qconfig, quantize_jit

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings(), quiet_native_stderr():
        # torch.jit.* and the quint8/qint8 dtypes are deprecated on 2.13 but still run
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        traced = torch.jit.trace(copy.deepcopy(model), example)
        qmodel = quantize_jit(traced, {"": get_default_qconfig("x86")}, run_calibration, [calibration])
        quantize_s = time.perf_counter() - start
        with torch.no_grad():
            qmodel(example)  # first call emits the deprecation TORCH_WARN; keep it in here
        size = script_bytes(qmodel)
    return Variant("torch.ao quantize_jit", qmodel, size, quantize_s)


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes on the machine have spent busy, from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class BackgroundMeter:
    """Cores' worth of CPU used by *other* processes while the meter runs:
    machine-wide busy time minus this process's own CPU time, over wall time."""

    def __enter__(self) -> BackgroundMeter:
        self.busy_start = busy_cpu_seconds()
        self.own_start = time.process_time()
        self.wall_start = time.perf_counter()
        self.cores: float | None = None
        return self

    def __exit__(self, *exc_info: object) -> None:
        busy_end = busy_cpu_seconds()
        if self.busy_start is None or busy_end is None:
            return
        own = time.process_time() - self.own_start
        wall = time.perf_counter() - self.wall_start
        self.cores = max(0.0, (busy_end - self.busy_start - own) / wall)


QUIET_CORES = 0.15  # other processes' CPU use under which a block of rounds counts as quiet
BLOCK_SECONDS = 0.5  # long enough that /proc/stat's 10 ms ticks resolve ~0.02 cores


@dataclass
class Timing:
    samples: dict[str, list[float]]  # seconds per call, per variant, over the kept rounds
    background_cores: float | None  # other processes' mean CPU use over the kept blocks
    kept_blocks: int
    dropped_blocks: int


def time_block(
    order: list[Variant], x: torch.Tensor, rounds: int, shuffler: random.Random
) -> tuple[dict[str, list[float]], float | None]:
    """One call per variant per round, in a freshly shuffled order each round."""
    samples: dict[str, list[float]] = {variant.name: [] for variant in order}
    with BackgroundMeter() as meter:
        for _ in range(rounds):
            shuffler.shuffle(order)
            for variant in order:
                start = time.perf_counter_ns()
                variant.forward(x)
                samples[variant.name].append((time.perf_counter_ns() - start) * 1e-9)
    return samples, meter.cores


def time_interleaved(
    variants: Sequence[Variant],
    x: torch.Tensor,
    args: argparse.Namespace,
    seed: int,
) -> Timing:
    """Time the variants in blocks of interleaved rounds (~BLOCK_SECONDS each).

    Without --quiet-only every block is kept. With it, blocks continue until
    args.rounds rounds were timed in quiet blocks (other processes under QUIET_CORES)
    or the time runs out, and the quietest blocks enough for args.rounds are kept.
    """
    order = list(variants)
    shuffler = random.Random(seed)
    with torch.no_grad():
        for variant in variants:
            for _ in range(args.warmup):
                variant.forward(x)
        start = time.perf_counter()
        time_block(order, x, 3, shuffler)
        round_s = (time.perf_counter() - start) / 3
        block_rounds = max(5, min(args.rounds, round(BLOCK_SECONDS / round_s)))

        blocks: list[tuple[dict[str, list[float]], float | None]] = []
        deadline = time.monotonic() + args.quiet_only
        quiet_rounds = total_rounds = 0
        while True:
            block = time_block(order, x, block_rounds, shuffler)
            blocks.append(block)
            total_rounds += block_rounds
            if block[1] is not None and block[1] < QUIET_CORES:
                quiet_rounds += block_rounds
            elif args.quiet_only > 0:
                time.sleep(2.0)  # stand back while others are busy, rather than compete with them
            if args.quiet_only <= 0:
                if total_rounds >= args.rounds:
                    break
            elif quiet_rounds >= args.rounds:
                break
            elif time.monotonic() > deadline:
                print("warning: machine never quiet long enough; keeping the quietest blocks", file=sys.stderr)
                break

    kept = blocks
    if args.quiet_only > 0:
        # quietest first; enough blocks for args.rounds rounds (all quiet ones when there are enough)
        by_quiet = sorted(blocks, key=lambda block: math.inf if block[1] is None else block[1])
        kept = by_quiet[: -(-args.rounds // block_rounds)]
    samples: dict[str, list[float]] = {variant.name: [] for variant in variants}
    for block_samples, _ in kept:
        for name, times in block_samples.items():
            samples[name] += times
    measured = [cores for _, cores in kept if cores is not None]
    background = sum(measured) / len(measured) if measured else None
    return Timing(samples, background, len(kept), len(blocks) - len(kept))


def evaluate(variant: Variant, eval_batches: Batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([variant.forward(batch) for batch in eval_batches])


def bench_batch_size(
    model: nn.Module,
    batch_size: int,
    args: argparse.Namespace,
    notes: list[str],
    timings: dict[int, Timing],
) -> list[Row]:
    generator = torch.Generator().manual_seed(1000 + batch_size)
    calibration_set = torch.randn(CALIBRATION_IMAGES, *INPUT_SHAPE, generator=generator)
    eval_set = torch.randn(EVAL_IMAGES, *INPUT_SHAPE, generator=generator)
    # Same batch size for calibration, evaluation and timing, so a quantizer that
    # captures static shapes is not penalised.
    calibration = list(calibration_set.split(batch_size))
    eval_batches = list(eval_set.split(batch_size))
    x = torch.randn(batch_size, *INPUT_SHAPE, generator=generator)

    variants = [build_fp32(model)]
    builders: list[tuple[str, Callable[[], Variant]]] = []
    if "graphquant" in args.variants and args.with_graphquant:
        builders.append(("graphquant int8", lambda: build_graphquant(model, x, calibration)))
    if "quantize_jit" in args.variants:
        builders.append(("torch.ao quantize_jit", lambda: build_quantize_jit(model, x, calibration)))
    for name, build in builders:
        print(f"[batch {batch_size}] quantizing: {name}", file=sys.stderr)
        try:
            variants.append(build())
        except Exception as error:
            if args.strict:
                raise
            traceback.print_exc(file=sys.stderr)
            note = f"{name} skipped at batch {batch_size}: {type(error).__name__}: {error}"
            print(f"note: {note}", file=sys.stderr)
            notes.append(note.splitlines()[0])

    reference = evaluate(variants[0], eval_batches)
    print(
        f"[batch {batch_size}] timing {len(variants)} variants x {args.rounds} rounds",
        file=sys.stderr,
    )
    timing = time_interleaved(variants, x, args, seed=batch_size)
    timings[batch_size] = timing
    samples = timing.samples
    fp32_median = statistics.median(samples[variants[0].name])

    rows = []
    for variant in variants:
        times = samples[variant.name]
        q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
        sqnr = None if variant is variants[0] else sqnr_db(reference, evaluate(variant, eval_batches))
        rows.append(
            Row(
                batch_size,
                variant.name,
                median * 1e3,
                (q3 - q1) * 1e3,
                fp32_median / median,
                sqnr,
                variant.size_bytes,
                variant.quantize_s,
            )
        )
    return rows


def format_size(size_bytes: int | None) -> str:
    return "n/a" if size_bytes is None else f"{size_bytes / 1024:.0f} KiB"


def render_table(rows: Sequence[Row]) -> str:
    lines = [
        "| batch | variant | median ms | IQR ms | speed-up vs fp32 | SQNR vs fp32 dB | size | quantize s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        sqnr = "—" if row.sqnr_db is None else f"{row.sqnr_db:.1f}"
        quantize = "—" if row.quantize_s is None else f"{row.quantize_s:.2f}"
        lines.append(
            f"| {row.batch_size} | {row.variant} | {row.median_ms:.3f} | {row.iqr_ms:.3f} "
            f"| {row.speedup:.2f}x | {sqnr} | {format_size(row.size_bytes)} | {quantize} |"
        )
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def command_line() -> str:
    """The command as typed from the repo root, thread variables included."""
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(REPO_ROOT)
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(REPO_ROOT)
    env = [f"{name}={os.environ[name]}" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if name in os.environ]
    return " ".join([*env, shlex.join([str(python), str(script), *sys.argv[1:]])])


def describe_timing(batch_size: int, timing: Timing) -> str:
    rounds = len(next(iter(timing.samples.values())))
    cores = "n/a" if timing.background_cores is None else f"{timing.background_cores:.2f}"
    dropped = f", {timing.dropped_blocks} busier blocks dropped" if timing.dropped_blocks else ""
    busy = timing.background_cores is not None and timing.background_cores >= QUIET_CORES
    warning = " — NOT QUIET, treat as noisy" if busy else ""
    return f"batch {batch_size}: {rounds} rounds, others used {cores} cores{dropped}{warning}"


def render_report(
    rows: Sequence[Row],
    notes: Sequence[str],
    timings: dict[int, Timing],
    args: argparse.Namespace,
) -> str:
    header = [
        f"Command: `{command_line()}`",
        "",
        f"Run {datetime.date.today().isoformat()}: torch {torch.__version__}, {cpu_name()}, "
        f"{torch.get_num_threads()} threads, quantized engine "
        f"`{torch.backends.quantized.engine}`; input 3x64x64; {args.warmup} warm-up calls, "
        "then interleaved rounds ("
        + "; ".join(describe_timing(size, timing) for size, timing in timings.items())
        + ").",
        "",
        render_table(rows),
    ]
    if notes:
        header += ["", *[f"- {note}" for note in notes]]
    return "\n".join(header)


def write_section(path: Path, body: str) -> None:
    text = path.read_text()
    start = text.find(START_MARKER)
    end = text.find(END_MARKER)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: markers {START_MARKER} ... {END_MARKER} not found")
    updated = text[: start + len(START_MARKER)] + "\n" + body + "\n" + text[end:]
    path.write_text(updated)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Interleaved latency benchmark on a small ResNet: fp32 eager vs graphquant "
        "int8 vs torch.ao.quantization.quantize_jit."
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma separated (default 1,8)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 300, quick 40)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 20, quick 5)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke test")
    parser.add_argument("--write", action="store_true", help="replace the bench_cnn section of BENCHMARKS.md")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="raise instead of skipping a variant that fails to quantize",
    )
    parser.add_argument(
        "--quiet-only",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep only blocks of rounds during which other processes were idle, "
        "trying for up to SECONDS per batch size (for a shared machine)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma separated quantized variants to run beside fp32 (default {','.join(VARIANTS)})",
    )
    args = parser.parse_args(argv)
    args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.rounds is None:
        args.rounds = 40 if args.quick else 300
    if args.warmup is None:
        args.warmup = 5 if args.quick else 20
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "x86"
    model = make_small_resnet()

    rows: list[Row] = []
    notes: list[str] = []
    timings: dict[int, Timing] = {}
    missing = graphquant_missing() if "graphquant" in args.variants else None
    args.with_graphquant = missing is None
    if missing is not None:
        note = f"graphquant rows skipped: {missing}"
        print(f"note: {note}", file=sys.stderr)
        notes.append(note)
    for batch_size in (int(size) for size in args.batch_sizes.split(",")):
        rows += bench_batch_size(model, batch_size, args, notes, timings)

    report = render_report(rows, list(dict.fromkeys(notes)), timings, args)
    print(report)
    if args.write:
        write_section(REPO_ROOT / "BENCHMARKS.md", report)
        print(f"wrote {REPO_ROOT / 'BENCHMARKS.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
