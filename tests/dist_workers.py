"""What each process of tests/test_distributed.py runs (spawned: importable by reference)."""

from __future__ import annotations

import datetime
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from conftest import make_net  # noqa: E402

import graphquant as gq  # noqa: E402
from graphquant.observers import HistogramObserver  # noqa: E402
from graphquant.partial import Region  # noqa: E402
from graphquant.passes.lower import observer_qparams  # noqa: E402

MINMAX = gq.QConfig(activation=gq.ObserverSpec("minmax"))  # per-channel min/max weights
PER_TENSOR = gq.QConfig(activation=gq.ObserverSpec("minmax"),
                        weight=gq.ObserverSpec("minmax", torch.int8, symmetric=True))
MOVING = gq.QConfig(activation=gq.ObserverSpec("moving_average_minmax", options=(("averaging_constant", 0.1),)))
PERCENTILE = gq.QConfig(activation=gq.ObserverSpec("percentile", options=(("percentile", 99.9),)))
ENTROPY = gq.QConfig(activation=gq.ObserverSpec("entropy"))
HISTOGRAM = gq.QConfig(activation=gq.ObserverSpec("histogram"))  # default_qconfig adds SmoothQuant observers
QCONFIGS = {"histogram": HISTOGRAM, "minmax": MINMAX, "per_tensor": PER_TENSOR, "moving_average": MOVING,
            "percentile": PERCENTILE, "entropy": ENTROPY}


class TinyBert(nn.Module):
    """A 2-layer BERT with random weights: layer norms, GELU, softmax, linears."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        torch.manual_seed(0)
        config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=32)
        self.bert = transformers.BertModel(config).eval()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids).last_hidden_state


def conv_data() -> list[torch.Tensor]:
    """Eight batches whose ranges grow: a rank's histogram range differs from the whole's."""
    g = torch.Generator().manual_seed(3)
    return [torch.randn(2, 3, 16, 16, generator=g) * (1 + i) for i in range(8)]


def bert_data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return [torch.randint(0, 100, (2, 12), generator=g) for _ in range(6)]


def workloads() -> dict[str, tuple[nn.Module, list[torch.Tensor]]]:
    return {"conv": (make_net(), conv_data()), "bert": (TinyBert().eval(), bert_data())}


def partial_model() -> tuple[nn.Module, list[torch.Tensor]]:
    """A model that does not export whole (tests/test_partial.py's): quantized region by region."""
    import test_partial

    return test_partial.Net().eval(), test_partial.batches(6) + [b / 2 for b in test_partial.batches(2, seed=2)]


def qparams(prepared: gq.PreparedModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every observer's qparams; of each region's graph for a model captured region by region."""
    if prepared.graph_module is not None:
        graphs = {"": prepared.graph_module}
    else:
        assert prepared.partial_model is not None
        graphs = {m.path: m.inner.graph_module for m in prepared.partial_model.modules() if isinstance(m, Region)}
    return {f"{where}/{name}": (qp.scale.clone(), qp.zero_point.clone())
            for where, gm in graphs.items() for name, qp in observer_qparams(gm).items()}


def calibrate_all(distributed: bool) -> dict[str, Any]:
    """The activation observers' qparams of every workload x qconfig (sharded and merged, or in
    this process over all the data), and the converted int8 model's output on one batch (weights
    are quantized at convert, from the same weights on every rank)."""
    out: dict[str, Any] = {}
    for wname, (model, data) in workloads().items():
        for qname, qconfig in QCONFIGS.items():
            prepared = gq.prepare(model, {"": qconfig}, (data[0],))
            if distributed:
                gq.distributed.calibrate(prepared, data, shard=True)
            else:
                gq.calibrate(prepared, data)
            out[f"{wname}/{qname}"] = qparams(prepared)
            assert prepared.graph_module is not None
            out[f"{wname}/{qname}/histograms"] = [m.histogram.clone() for m in prepared.graph_module.modules()
                                                  if isinstance(m, HistogramObserver)]
            with torch.no_grad():
                out[f"{wname}/{qname}/int8_output"] = gq.convert(prepared)(data[0])
    model, data = partial_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "does not export whole"
        prepared = gq.prepare(model, {"": gq.default_qconfig}, (data[0],))
    if distributed:
        gq.distributed.calibrate(prepared, data, shard=True)
    else:
        gq.calibrate(prepared, data)
    out["partial/histogram"] = qparams(prepared)
    with torch.no_grad():
        out["partial/histogram/int8_output"] = gq.convert(prepared)(data[-1])
    return out


def _join(rank: int, world: int, port: int, timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def sharded(rank: int, world: int, port: int, out_dir: str) -> None:
    """Every workload and qconfig, calibrated on this rank's share and merged."""
    _join(rank, world, port, 60)
    try:
        torch.save(calibrate_all(distributed=True), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def failing(rank: int, world: int, port: int, out_dir: str, how: str) -> None:
    """Rank 1 fails (``how``: "raises" in its calibration data, or "exits" before the merge);
    each rank writes the error it got."""
    _join(rank, world, port, 30)  # a dead peer is seen at once; 30 s only bounds a slow start
    model, data = make_net(), conv_data()
    prepared = gq.prepare(model, {"": gq.default_qconfig}, (data[0],))
    if rank == 1:
        if how == "exits":
            os._exit(0)  # dies without a word, as a killed process would
        data = [torch.randn(2, 5, 16, 16)]  # 5 channels for a 3-channel conv: the model raises
    try:
        gq.distributed.calibrate(prepared, data)
        message = "no error"
    except gq.GraphQuantError as error:
        message = f"GraphQuantError: {error}"
    except Exception as error:  # noqa: BLE001 - written for the test to read
        message = f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
    Path(out_dir, f"rank{rank}.txt").write_text(message)
    # leave without tearing down a group whose peer failed: gloo's threads can abort the process at
    # interpreter exit ("terminate called without an active exception"), after the message is written
    os._exit(0)
