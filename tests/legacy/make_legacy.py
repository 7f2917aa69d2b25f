"""Writes the saved files tests/test_legacy_formats.py loads: one of each format graphquant wrote
before the layout of issue #28 (commit 9829105), with the inputs and the outputs the saving model
gave. Run once, at that commit (``python tests/legacy/make_legacy.py``); never regenerate: the
point of these files is that they were written by an older graphquant.

Models (kept tiny, a few kB each): a residual CNN (qconv2d_add, qlinear, oneDNN), the same on the
portable backend, a per-token dynamic MLP, and a model quantized region by region (partial archive;
its float model is ``legacy_models.Gated``).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import graphquant as gq  # noqa: E402
from legacy_models import Gated, Mlp, Residual  # noqa: E402


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def tokens(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 5, 16, generator=torch.Generator().manual_seed(seed))


def calibrate(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    for batch in batches:
        model(batch)


def main() -> None:
    warnings.simplefilter("ignore")
    calibration = [images(4, seed) for seed in range(3)]
    models = {
        "residual_onednn": (gq.quantize(Residual(), {"": gq.default_qconfig}, calibrate, [calibration]), images),
        "residual_portable": (gq.quantize(Residual(), {"": gq.default_qconfig}, calibrate, [calibration],
                                          backend="portable"), images),
        "mlp_per_token": (gq.quantize_dynamic(Mlp(), {"": gq.per_token_dynamic_qconfig},
                                              example_inputs=(tokens(1, 0),)), tokens),
        "gated_partial": (gq.quantize(Gated(), {"": gq.default_qconfig}, calibrate, [calibration],
                                      example_inputs=(calibration[0],)), images),
    }
    for name, (model, make) in models.items():
        inputs = [make(3, 11), make(1, 12)]
        with torch.no_grad():
            outputs = [model(x) for x in inputs]
        torch.save({"inputs": inputs, "outputs": outputs}, HERE / f"{name}.io.pt")
        gq.save(model, HERE / f"{name}.pt2")
        if name != "gated_partial":
            torch.jit.save(gq.to_torchscript(model), str(HERE / f"{name}.ts"))


if __name__ == "__main__":
    main()
