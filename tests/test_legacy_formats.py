"""Files written by an older graphquant still load and give the outputs they gave when saved
(tests/legacy, written at commit 9829105 by tests/legacy/make_legacy.py, before the layout of
issue #28): a ``.pt2`` program on oneDNN and on the portable kernels, a dynamic per-token one, a
partial archive, and their TorchScript forms (loaded by torch alone)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import graphquant as gq

LEGACY = Path(__file__).resolve().parent / "legacy"
sys.path.insert(0, str(LEGACY))
from legacy_models import Gated  # noqa: E402

PROGRAMS = ["residual_onednn", "residual_portable", "mlp_per_token"]


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """The saved output, to float rounding: the same integers on every CPU, and the float arithmetic
    around them (the exact float32 path where oneDNN saturates, another CPU's vector width) moves
    the last bits only (7.7e-8 of the largest output seen under ONEDNN_MAX_CPU_ISA=AVX2)."""
    return got.shape == want.shape and float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())


def _io(name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    data = torch.load(LEGACY / f"{name}.io.pt", weights_only=True)
    return data["inputs"], data["outputs"]


@pytest.mark.parametrize("name", PROGRAMS)
def test_an_old_program_loads_bit_identical(name: str) -> None:
    model = gq.load(LEGACY / f"{name}.pt2")
    inputs, outputs = _io(name)
    with torch.no_grad():
        for x, want in zip(inputs, outputs, strict=True):
            assert _same(model(x), want)
    assert len(gq.report(model).quantized) >= 2


@pytest.mark.parametrize("name", PROGRAMS)
def test_an_old_torchscript_file_loads_bit_identical(name: str) -> None:
    model = torch.jit.load(str(LEGACY / f"{name}.ts"))
    inputs, outputs = _io(name)
    with torch.no_grad():
        for x, want in zip(inputs, outputs, strict=True):
            assert _same(model(x), want)


def test_an_old_partial_archive_loads_bit_identical() -> None:
    model = gq.load(LEGACY / "gated_partial.pt2", float_model=Gated())
    inputs, outputs = _io("gated_partial")
    with torch.no_grad():
        for x, want in zip(inputs, outputs, strict=True):
            assert _same(model(x), want)
    assert [region.path for region in gq.report(model).regions] == ["stem", "head"]
