"""Calibration sharded over processes with torch.distributed (gloo on 127.0.0.1): merged qparams
equal one process calibrating on all the data, bit for bit; a failing rank fails every rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import cli_models
import dist_workers
import pytest
import torch
import torch.multiprocessing as mp

import graphquant as gq

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:  # type: ignore[type-arg]
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(dist_workers.sharded, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def one_process() -> dict:  # type: ignore[type-arg]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: float ops between the int8 ones round by thread count
    try:
        return dist_workers.calibrate_all(distributed=False)
    finally:
        torch.set_num_threads(threads)


def _same(a: dict, b: dict) -> bool:  # type: ignore[type-arg]
    return a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)


@pytest.mark.parametrize("workload", ["conv", "bert"])
@pytest.mark.parametrize("qconfig", ["histogram", "minmax", "per_tensor", "percentile", "entropy"])
def test_merged_qparams_equal_one_pass_bit_for_bit(two_ranks, one_process, workload, qconfig):  # type: ignore[no-untyped-def]
    """Min/max, histogram (MSE), percentile and entropy activation observers, per-channel and
    per-tensor weights: every rank holds the same qparams, those of one pass over all the data,
    and converts to the same model."""
    key = f"{workload}/{qconfig}"
    assert len(one_process[key]) >= (5 if workload == "conv" else 15)
    assert _same(two_ranks[0][key], two_ranks[1][key])
    assert _same(two_ranks[0][key], one_process[key])
    histograms = [(two_ranks[0][f"{key}/histograms"], one_process[f"{key}/histograms"])]
    on_histograms = qconfig in ("histogram", "percentile", "entropy")
    assert all(len(a) == len(b) == (len(one_process[key]) if on_histograms else 0) for a, b in histograms)
    assert all(torch.equal(x, y) for a, b in histograms for x, y in zip(a, b, strict=True))  # the counts too
    output = f"{key}/int8_output"
    assert torch.equal(two_ranks[0][output], two_ranks[1][output])
    assert torch.equal(two_ranks[0][output], one_process[output])


def test_a_model_captured_region_by_region_calibrates_sharded(two_ranks, one_process):  # type: ignore[no-untyped-def]
    """graphquant.partial: the regions' observers merge like a whole graph's, bit for bit."""
    key = "partial/histogram"
    assert len(one_process[key]) >= 10 and {k.split("/")[0] for k in one_process[key]} >= {"stem", "head"}
    assert _same(two_ranks[0][key], two_ranks[1][key]) and _same(two_ranks[0][key], one_process[key])
    assert torch.equal(two_ranks[0][f"{key}/int8_output"], one_process[f"{key}/int8_output"])


def test_moving_average_merge_is_the_documented_mean(two_ranks, one_process):  # type: ignore[no-untyped-def]
    """Each rank averages its own batches and the merge takes their batch-weighted mean: the ranks
    agree, but not with one pass, whose average depends on the order of all the batches."""
    for workload in ("conv", "bert"):
        key = f"{workload}/moving_average"
        assert _same(two_ranks[0][key], two_ranks[1][key])
        assert not _same(two_ranks[0][key], one_process[key])


@pytest.mark.parametrize("how", ["raises", "exits"])
def test_a_failing_rank_fails_every_rank_with_a_graphquant_error(tmp_path, how):  # type: ignore[no-untyped-def]
    start = time.monotonic()
    ctx = mp.start_processes(dist_workers.failing, args=(2, _free_port(), str(tmp_path), how), nprocs=2, join=False,
                             start_method="spawn")
    while not ctx.join(timeout=60):
        pass
    elapsed = time.monotonic() - start
    rank0 = (tmp_path / "rank0.txt").read_text()
    assert rank0.startswith("GraphQuantError"), rank0
    if how == "raises":
        assert "calibration failed on 1 of 2 ranks (rank 1: GraphQuantError" in rank0 and "Nothing was merged" in rank0
        assert (tmp_path / "rank1.txt").read_text().startswith("GraphQuantError: graphquant.distributed.calibrate")
    else:
        assert "failed on rank 0 of 2" in rank0 and "timeout" in rank0
    assert elapsed < 60, elapsed  # no hang: a dead peer is seen at once, the group timeout is 30 s


def test_without_a_process_group_it_says_how_to_start_one():
    prepared = gq.prepare(dist_workers.make_net(), {"": gq.default_qconfig}, (dist_workers.conv_data()[0],))
    with pytest.raises(gq.GraphQuantError, match=r"torch.distributed is not initialized.*init_process_group"):
        gq.distributed.calibrate(prepared, dist_workers.conv_data())
    assert gq.distributed.init_from_env() is False  # no torchrun environment: nothing to join


def test_cli_under_torchrun_shards_calibration_and_rank_0_saves(tmp_path):  # type: ignore[no-untyped-def]
    """`torchrun --nproc-per-node 2 -m graphquant quantize`: the saved model equals the one a single
    process writes from the same data (histogram observers: bit for bit)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]), "OMP_NUM_THREADS": "1"}
    common = ["quantize", "cli_models:make_model", "--data", "cli_models:calibration", "--quiet"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(_free_port()), "-m", "graphquant", *common, "--out", str(tmp_path / "two.pt2")]
    run = subprocess.run(torchrun, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "calibrated on 2 processes" in run.stdout and run.stdout.count("wrote ") == 1, run.stdout
    single = subprocess.run([sys.executable, "-m", "graphquant", *common, "--out", str(tmp_path / "one.pt2")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr
    two, one = gq.load(tmp_path / "two.pt2"), gq.load(tmp_path / "one.pt2")
    x = cli_models.held_out()[0]
    with torch.no_grad():
        assert torch.equal(two(x), one(x))
