"""Quantization under an accuracy budget: layers go back to float, most harmful first, until the
metric's drop from the float model is at most ``max_drop``.

Peers do this one full evaluation per layer (NNCF's ``quantize_with_accuracy_control`` evaluates
each candidate layer; Intel Neural Compressor's tuning walks its search space), which takes hours
on a large model. graphquant ranks the layers once, from what it already measures: each layer's
own SQNR with exact inputs (:mod:`graphquant.numerics`, the median output channel), worst first.
Then it bisects over that ranking: keeping the worst ``k`` layers float, for which ``k`` is the
drop met? That is ``2 + ceil(log2(n))`` quantizations and evaluations for ``n`` ranked layers,
assuming (as the ranking is meant to make true) that returning more of the worst layers to float
does not make the metric worse. Deterministic: the same model, data and ``eval_fn`` give the same
steps.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from graphquant.api import quantize
from graphquant.capture import module_tree
from graphquant.errors import GraphQuantError
from graphquant.qconfig import QConfig, check_qconfig_dict
from graphquant.quantized import record_of
from graphquant.tools.numerics import compare

EvalFn = Callable[[nn.Module], float]


@dataclass(frozen=True)
class AccuracyStep:
    """One quantization tried: the layers kept float, the metric, its drop from float, the time."""

    keep_float: tuple[str, ...]
    metric: float
    drop: float
    seconds: float

    def __str__(self) -> str:
        kept = f"{len(self.keep_float)} layers float" if self.keep_float else "every layer int8"
        return f"{kept:>22}: metric {self.metric:.6g} (drop {self.drop:+.6g}) in {self.seconds:.1f} s"


@dataclass
class AccuracyControlReport:
    """What :func:`quantize_with_accuracy_control` did: the float metric, the ranking it bisected
    over, every step, what went back to float, and whether the drop was met."""

    float_metric: float
    max_drop: float
    ranking: tuple[str, ...]  # module paths, most harmful first
    steps: list[AccuracyStep] = field(default_factory=list)
    keep_float: tuple[str, ...] = ()
    met: bool = False
    seconds: float = 0.0
    stopped_by_budget: bool = False

    def __str__(self) -> str:
        verdict = "met" if self.met else "NOT met" + (" (time budget spent)" if self.stopped_by_budget else "")
        lines = [f"graphquant accuracy control: float metric {self.float_metric:.6g}, max drop {self.max_drop:g}: "
                 f"{verdict} with {len(self.keep_float)} layers float, {len(self.steps)} quantizations in "
                 f"{self.seconds:.1f} s"]
        lines += [f"  {step}" for step in self.steps]
        if self.keep_float:
            lines.append("  kept float (most harmful first): " + ", ".join(self.keep_float))
        return "\n".join(lines)


def _recording(run_fn: Callable[..., Any], limit: int) -> tuple[Callable[..., Any], list[tuple[Any, ...]]]:
    """``run_fn`` that also keeps the first ``limit`` batches it feeds the model (for the ranking)."""
    seen: list[tuple[Any, ...]] = []

    def run(model: nn.Module, *args: Any) -> Any:
        def hook(_: nn.Module, inputs: tuple[Any, ...]) -> None:
            if len(seen) < limit:
                seen.append(tuple(inputs))

        handle = model.register_forward_pre_hook(hook)
        try:
            return run_fn(model, *args)
        finally:
            handle.remove()

    return run, seen


def quantize_with_accuracy_control(
    model: nn.Module,
    qconfig_dict: Mapping[str, QConfig | None],
    run_fn: Callable[..., Any],
    run_args: Sequence[Any],
    eval_fn: EvalFn,
    max_drop: float,
    *,
    example_inputs: Sequence[Any] | None = None,
    time_budget_s: float | None = None,
    backend: str | None = None,
    ranking_batches: int = 4,
    progress: bool = False,
) -> tuple[nn.Module, AccuracyControlReport]:
    """Quantize ``model``; if ``eval_fn`` (higher is better) drops by more than ``max_drop`` from
    the float model's, return layers to float, most harmful first, until it does not.

    A model quantized region by region (:mod:`graphquant.partial`) returns whole regions to float,
    lowest region SQNR first. Otherwise the layers are ranked once by their own SQNR
    (:func:`graphquant.numerics.compare`, on the first
    ``ranking_batches`` batches ``run_fn`` calibrates with; a layer whose output rounding is the
    cause is followed by the layers reading that output, which would round it the same way), then
    the number kept float is bisected.
    Stops when the drop is met or ``time_budget_s`` is spent (the best model that meets the drop so
    far, else the one with the most layers float). Returns the model and a report of every step;
    ``progress=True`` prints each step as it finishes.
    """
    if not callable(eval_fn):
        raise GraphQuantError("graphquant: eval_fn(model) -> float (higher is better) must be a function")
    if not (isinstance(max_drop, (int, float)) and max_drop >= 0 and math.isfinite(max_drop)):
        raise GraphQuantError(f"graphquant: max_drop must be a finite number >= 0, got {max_drop!r}")
    checked = check_qconfig_dict(qconfig_dict, module_tree(model))
    start = time.perf_counter()

    def say(line: str) -> None:
        if progress:
            print(f"graphquant accuracy control: {line}", file=sys.stderr, flush=True)

    with torch.no_grad():
        float_metric = float(eval_fn(model))
    report = AccuracyControlReport(float_metric, float(max_drop), ())
    recording_run, batches = _recording(run_fn, ranking_batches)

    def trial(keep: tuple[str, ...], run: Callable[..., Any] = run_fn) -> tuple[nn.Module, bool]:
        began = time.perf_counter()
        trial_dict: dict[str, QConfig | None] = {path: None for path in keep}
        trial_dict.update({k: v for k, v in checked.items() if k not in trial_dict})
        quantized = quantize(model, trial_dict, run, run_args, example_inputs=example_inputs, backend=backend)
        with torch.no_grad():
            metric = float(eval_fn(quantized))
        step = AccuracyStep(keep, metric, float_metric - metric, time.perf_counter() - began)
        report.steps.append(step)
        say(str(step))
        return quantized, step.drop <= max_drop

    def out_of_time() -> bool:
        return time_budget_s is not None and time.perf_counter() - start > time_budget_s

    best, met = trial((), recording_run)
    if not met:
        if not batches:
            raise GraphQuantError("graphquant: run_fn fed the model no batch; accuracy control needs calibration")
        regions = record_of(best).report.regions
        if regions:  # quantized region by region (graphquant.partial): whole regions, lowest SQNR first
            report.ranking = tuple(r.path for r in sorted(regions, key=lambda r: (r.sqnr_db is None, r.sqnr_db or 0)))
        else:
            # numerics' suggestion with no SQNR bar and no limit: every layer, worst first, each followed
            # by the layers that read its output when that output's rounding is the cause
            ranked = compare(model, checked, batches, backend=backend, min_sqnr_db=math.inf, max_layers=1 << 30)
            report.ranking = ranked.suggestion.keep_float
        say(f"{len(report.ranking)} layers ranked, worst first: {', '.join(report.ranking[:5])}...")
        lo, hi = 0, len(report.ranking)
        if hi and not out_of_time():
            model_hi, met_hi = trial(report.ranking[:hi])
            best, met = model_hi, met_hi
            report.keep_float = report.ranking[:hi]
            if met_hi:
                while hi - lo > 1 and not out_of_time():
                    mid = (lo + hi) // 2
                    candidate, ok = trial(report.ranking[:mid])
                    if ok:
                        hi, best, report.keep_float = mid, candidate, report.ranking[:mid]
                    else:
                        lo = mid
        report.stopped_by_budget = out_of_time() and (not met or hi - lo > 1)
    report.met = met
    report.seconds = time.perf_counter() - start
    return best, report


__all__ = ["AccuracyControlReport", "AccuracyStep", "quantize_with_accuracy_control"]
