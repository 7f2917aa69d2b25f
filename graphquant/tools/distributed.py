"""Calibration sharded over processes and hosts with ``torch.distributed``.

Each rank calibrates the same prepared model on its own share of the data; then the observers'
statistics are merged over a process group, so that every rank holds the qparams of one
calibration over all of it, and :func:`graphquant.convert` gives the same model on every rank.
PyTorch's own engine does the work: any backend (gloo on CPU, nccl on GPUs), any launcher
(``torchrun --nproc-per-node N`` on one machine, ``--nnodes`` across hosts)::

    torch.distributed.init_process_group("gloo")     # torchrun sets rank, world size, address
    prepared = graphquant.prepare(model, {"": graphquant.default_qconfig}, example_inputs)
    graphquant.distributed.calibrate(prepared, batches, shard=True)   # this rank's share, then merge
    quantized = graphquant.convert(prepared)                          # the same on every rank
    if torch.distributed.get_rank() == 0:
        graphquant.save(quantized, "model_int8.pt2")

An observer's statistics are its buffers, and :meth:`Observer.merge` folds one observer's into
another's as if it had seen those tensors too. The merge gathers every rank's buffers (moved to
CPU: the same code for CPU and GPU models) and merges them in rank order on every rank, so ranks
agree bit for bit. For min/max and per-channel observers, and for the histogram observer (its
bins lie on a fixed power-of-two grid, so counts do not depend on how the data was split), the
qparams equal those of one process calibrating on all the data, bit for bit. The moving average
observer is the exception: each rank averages its own batches and the merge takes the mean
weighted by batch counts, which equals one pass only when the shards are equally long and
alike (its running average depends on the order of the batches by design).

A rank that fails during calibration does not leave the others waiting: every rank reports its
outcome before the merge, and all of them raise a :class:`GraphQuantError` that names the rank
and its error. A rank that dies or never reaches the merge surfaces as an error of the process
group's collective, after at most its ``timeout`` (``init_process_group(timeout=...)``).
"""

from __future__ import annotations

import copy
import datetime
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import fx, nn

from graphquant.api import PreparedModel
from graphquant.api import calibrate as calibrate_here
from graphquant.errors import GraphQuantError
from graphquant.observers import Observer, SharedQParams

T = TypeVar("T")
ProcessGroup = Any  # torch.distributed.ProcessGroup, or None for the default group

__all__ = ["calibrate", "init_from_env", "local_shard", "merge_observers"]


def _rank_and_world(group: ProcessGroup) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise GraphQuantError(
            "graphquant.distributed: torch.distributed is not initialized. Call "
            "torch.distributed.init_process_group first ('gloo' for CPU models, 'nccl' for GPU ones; torchrun "
            "sets the rank, world size and address), or graphquant.distributed.init_from_env()"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def init_from_env(backend: str = "gloo", timeout_s: float = 600.0) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) when it has more than one process and none is
    joined yet. Returns whether a group of several processes is in use.

    ``timeout_s`` bounds every collective: a rank that died or hangs makes the others fail with
    an error after at most that long instead of waiting for ever.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise GraphQuantError("graphquant.distributed: this PyTorch build has no torch.distributed")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def local_shard(data: Sequence[T], group: ProcessGroup = None) -> list[T]:
    """This rank's share of ``data``: items ``rank, rank + world, rank + 2 * world, ...`` (round
    robin, so shares differ by one item at most and every item is in exactly one)."""
    rank, world = _rank_and_world(group)
    return list(data[rank::world])


def _collective(run: Callable[[], T], what: str, group: ProcessGroup) -> T:
    """Run a collective; a failure of the process group (a rank that died, or a timeout) becomes
    a GraphQuantError on this rank."""
    try:
        return run()
    except (RuntimeError, ValueError) as error:  # gloo / nccl raise DistBackendError, a RuntimeError
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GraphQuantError(
            f"graphquant.distributed: {what} failed on rank {rank} of {world}: {first}. Another rank stopped, "
            "or did not get there within the process group's timeout (init_process_group(timeout=...)); "
            "see that rank's output. Nothing was merged"
        ) from error


def calibrate(
    prepared: PreparedModel, data: Iterable[Any] | Sequence[Any], group: ProcessGroup = None, shard: bool = False
) -> PreparedModel:
    """Calibrate ``prepared`` on this rank's data, then merge the observers over ``group`` (the
    default group when ``None``): afterwards every rank holds the same statistics, those of one
    calibration over every rank's data.

    ``data`` is this rank's own batches (a ``DataLoader`` with a ``DistributedSampler``, say);
    with ``shard=True`` it is the whole calibration set (a sequence, the same on every rank) and
    this rank takes its round-robin share (:func:`local_shard`). Every rank of the group must
    call it. If calibration raises on any rank, every rank raises a GraphQuantError naming it,
    and nothing is merged.
    """
    if not isinstance(prepared, PreparedModel):
        raise GraphQuantError("graphquant.distributed.calibrate takes the model returned by graphquant.prepare")
    rank, world = _rank_and_world(group)
    failure: BaseException | None = None
    try:
        if shard:
            if not isinstance(data, Sequence):
                raise GraphQuantError(
                    f"graphquant.distributed.calibrate: shard=True needs a sequence of batches (a list), got "
                    f"{type(data).__name__}; or pass this rank's own batches with shard=False"
                )
            data = local_shard(data, group)
        calibrate_here(prepared, data)
        if prepared.graph_module is None and prepared.partial_model is None:
            raise GraphQuantError(
                f"graphquant.distributed.calibrate: rank {rank} had no batch, and the model was prepared without "
                "example inputs, so it was never captured; pass example_inputs to graphquant.prepare"
            )
    except Exception as error:  # noqa: BLE001 - reported to every rank, then raised again below
        failure = error
    outcome = None if failure is None else f"{type(failure).__name__}: {str(failure).strip().splitlines()[0]}"
    outcomes: list[str | None] = [None] * world
    _collective(lambda: dist.all_gather_object(outcomes, outcome, group=group), "calibration", group)
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if failed:
        where = "; ".join(f"rank {r}: {o}" for r, o in failed)
        raise GraphQuantError(
            f"graphquant.distributed.calibrate: calibration failed on {len(failed)} of {world} ranks ({where}). "
            "Nothing was merged: fix that rank's data or model and run again"
        ) from failure
    merge_observers(prepared, group)
    return prepared


def _observers(prepared: PreparedModel | fx.GraphModule) -> list[tuple[str, Observer | SharedQParams]]:
    """Every observer, and every shared-qparams marker (their channel means, for bias correction), by
    module path: in the graph, or in the regions of a model captured region by region
    (graphquant.partial), the same paths on every rank that captured the same model."""
    gm: nn.Module | None = prepared
    if isinstance(prepared, PreparedModel):
        gm = prepared.graph_module if prepared.graph_module is not None else prepared.partial_model
    if gm is None:
        raise GraphQuantError(
            "graphquant.distributed.merge_observers: the prepared model was not captured yet; run it on a batch "
            "(or pass example_inputs to graphquant.prepare) first"
        )
    return [(name, module) for name, module in gm.named_modules() if isinstance(module, (Observer, SharedQParams))]


def _with_state(observer: Observer | SharedQParams, state: dict[str, torch.Tensor]) -> Any:
    """A CPU copy of ``observer`` holding another rank's statistics."""
    other = copy.deepcopy(observer).cpu()
    for key, value in state.items():
        setattr(other, key, value)
    return other


def merge_observers(prepared: PreparedModel | fx.GraphModule, group: ProcessGroup = None) -> None:
    """Merge every observer's statistics over ``group`` (the default group when ``None``), in
    place: what :func:`calibrate` does after calibrating, for callers with their own
    calibration loop (``prepare_jit``, a ``run_fn``, then this, then ``convert_jit``). Every rank
    of the group must call it, with the same prepared model."""
    rank, world = _rank_and_world(group)
    observers = _observers(prepared)
    local = [
        (name, type(obs).__name__, {key: buf.detach().cpu() for key, buf in obs.named_buffers(recurse=False)})
        for name, obs in observers
    ]
    gathered: list[Any] = [None] * world
    _collective(lambda: dist.all_gather_object(gathered, local, group=group), "merging observers", group)
    layout = [(name, kind) for name, kind, _ in local]
    for other_rank, states in enumerate(gathered):
        if [(name, kind) for name, kind, _ in states] != layout:
            raise GraphQuantError(
                f"graphquant.distributed.merge_observers: rank {other_rank}'s prepared model has other observers "
                f"than rank {rank}'s ({len(states)} vs {len(layout)}); prepare the same model with the same "
                "qconfig_dict and example input shapes on every rank"
            )
    for i, (_, obs) in enumerate(observers):
        merged = _with_state(obs, gathered[0][i][2])
        for states in gathered[1:]:
            merged.merge(_with_state(obs, states[i][2]))  # the same class as merged
        device = next((buf.device for buf in obs.buffers(recurse=False)), torch.device("cpu"))
        for key, value in merged.named_buffers(recurse=False):
            setattr(obs, key, value.to(device))
