"""Interleaved, quiet-aware timing shared by the benchmarks. No graphquant imports.

Each round calls every variant once, in a freshly shuffled order, and times that call;
rounds run in blocks of about half a second, and for each block the CPU time *other*
processes used is read from ``/proc/stat``. With ``quiet_only`` seconds, blocks in which
others used ``QUIET_CORES`` or more are dropped (and the timer stands back for 2 s) until
enough quiet rounds are in. Two-thread PyTorch slows down many times over when another
process holds one of two cores; this is how the tables stay honest on a shared machine.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
QUIET_CORES = 0.15  # other processes' CPU use under which a block of rounds counts as quiet
# Each variant's turn in a round: one untimed call, then BURST timed ones. The untimed call
# takes what the previous variant left behind: its weights in the caches, and its thread pool
# still spinning on a core (ONNX Runtime's workers spin after a run; interleaved call by call,
# every PyTorch variant at 2 threads took about twice its time after it).
BURST = 2
BLOCK_SECONDS = 0.5  # long enough that /proc/stat's 10 ms ticks resolve ~0.02 cores


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes on the machine have spent busy, from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU time of this process, all threads (ONNX Runtime's pool included)."""
    return time.process_time()


class BackgroundMeter:
    """Cores' worth of CPU used by *other* processes while the meter runs:
    machine-wide busy time minus this process's own CPU time, over wall time."""

    def __enter__(self) -> BackgroundMeter:
        self.busy_start = busy_cpu_seconds()
        self.own_start = own_cpu_seconds()
        self.wall_start = time.perf_counter()
        self.cores: float | None = None
        return self

    def __exit__(self, *exc_info: object) -> None:
        busy_end = busy_cpu_seconds()
        if self.busy_start is None or busy_end is None:
            return
        own = own_cpu_seconds() - self.own_start
        wall = time.perf_counter() - self.wall_start
        self.cores = max(0.0, (busy_end - self.busy_start - own) / wall)


@dataclass
class Timing:
    samples: dict[str, list[float]]  # seconds per call, per variant, over the kept rounds
    background_cores: float | None  # other processes' mean CPU use over the kept blocks
    kept_blocks: int
    dropped_blocks: int

    def median_ms(self, name: str) -> float:
        return statistics.median(self.samples[name]) * 1e3

    def iqr_ms(self, name: str) -> float:
        times = self.samples[name]
        if len(times) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
        return (q3 - q1) * 1e3

    @property
    def timed_calls(self) -> int:
        """Timed calls per variant (BURST a round)."""
        return len(next(iter(self.samples.values())))

    def describe(self) -> str:
        cores = "n/a" if self.background_cores is None else f"{self.background_cores:.2f}"
        dropped = f", {self.dropped_blocks} busier blocks dropped" if self.dropped_blocks else ""
        busy = self.background_cores is not None and self.background_cores >= QUIET_CORES
        return f"{self.timed_calls} timed calls, others used {cores} cores{dropped}{' — NOT QUIET' if busy else ''}"


def _time_block(
    calls: list[tuple[str, Callable[[], object]]], rounds: int, shuffler: random.Random
) -> tuple[dict[str, list[float]], float | None]:
    samples: dict[str, list[float]] = {name: [] for name, _ in calls}
    with BackgroundMeter() as meter:
        for _ in range(rounds):
            shuffler.shuffle(calls)
            for name, call in calls:
                call()  # untimed: see BURST
                for _ in range(BURST):
                    start = time.perf_counter_ns()
                    call()
                    samples[name].append((time.perf_counter_ns() - start) * 1e-9)
    return samples, meter.cores


def time_interleaved(
    calls: dict[str, Callable[[], object]], rounds: int, warmup: int, quiet_only: float = 0.0,
    seed: int = 0, max_seconds: float | None = None,
) -> Timing:
    """Time ``calls`` in blocks of interleaved rounds (about ``BLOCK_SECONDS`` each).

    ``rounds`` is the number of rounds wanted; ``max_seconds`` caps the timed wall time
    (fewer rounds, at least 5, for slow variants). Without ``quiet_only`` every block is
    kept; with it, blocks go on until enough rounds were timed in quiet blocks or the time
    runs out, and the quietest blocks are kept.
    """
    order = list(calls.items())
    shuffler = random.Random(seed)
    for _name, call in order:
        for _ in range(warmup):
            call()
    start = time.perf_counter()
    _time_block(order, 1, shuffler)
    round_s = time.perf_counter() - start
    if max_seconds is not None:
        rounds = max(5, min(rounds, int(max_seconds / max(round_s, 1e-9))))
    block_rounds = max(1, min(rounds, round(BLOCK_SECONDS / max(round_s, 1e-9))))

    blocks: list[tuple[dict[str, list[float]], float | None]] = []
    deadline = time.monotonic() + quiet_only
    quiet_rounds = total_rounds = 0
    while True:
        block = _time_block(order, block_rounds, shuffler)
        blocks.append(block)
        total_rounds += block_rounds
        if block[1] is not None and block[1] < QUIET_CORES:
            quiet_rounds += block_rounds
        elif quiet_only > 0:
            time.sleep(2.0)  # stand back while others are busy, rather than compete with them
        if quiet_only <= 0:
            if total_rounds >= rounds:
                break
        elif quiet_rounds >= rounds:
            break
        elif time.monotonic() > deadline:
            print("warning: machine never quiet long enough; keeping the quietest blocks", file=sys.stderr)
            break

    kept = blocks
    if quiet_only > 0:
        by_quiet = sorted(blocks, key=lambda block: math.inf if block[1] is None else block[1])
        kept = by_quiet[: -(-rounds // block_rounds)]
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for block_samples, _ in kept:
        for name, times in block_samples.items():
            samples[name] += times
    measured = [cores for _, cores in kept if cores is not None]
    background = sum(measured) / len(measured) if measured else None
    return Timing(samples, background, len(kept), len(blocks) - len(kept))


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence C++ warnings (the quantized-dtype deprecation notices), which bypass
    Python's warnings module and write straight to file descriptor 2."""
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


def write_section(path: Path, start_marker: str, end_marker: str, body: str, title: str) -> None:
    """Replace the text between the markers in ``path``, or append a titled section."""
    text = path.read_text()
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        text = text.rstrip("\n") + f"\n\n{title}\n\n{start_marker}\n{body}\n{end_marker}\n"
    else:
        text = text[: start + len(start_marker)] + "\n" + body + "\n" + text[end:]
    path.write_text(text)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
