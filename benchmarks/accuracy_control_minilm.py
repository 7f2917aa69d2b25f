#!/usr/bin/env python
"""Issue #17's accuracy-control target on all-MiniLM-L6-v2 (real weights), static int8 linears:

    .venv/bin/python benchmarks/accuracy_control_minilm.py

``quantize_with_accuracy_control`` with a drop budget of 0.002 in sentence-embedding cosine (the
mean over the 24 sentences of tests/test_transformers.py not calibrated on; calibrated on the other
48 in 4 batches of 12), with the default histogram observer and with SmoothQuant "auto". Prints each
run's report: how many linears went back to float (the FFN-out recipe keeps 6), in how long.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from calibration_methods import minilm_sentences

    import graphquant as gq

    warnings.simplefilter("ignore")
    encoder, ids, mask, calibration = minilm_sentences()
    with torch.no_grad():
        reference = encoder(ids[48:], mask[48:])

    def cosine(model: nn.Module) -> float:
        with torch.no_grad():
            return float((reference * model(ids[48:], mask[48:])).sum(-1).mean())

    for name, qconfig in (("histogram", gq.default_qconfig),
                          ("SmoothQuant auto", gq.QConfig(smoothquant=gq.SmoothQuant("auto")))):
        qconfig_dict = gq.qconfig_dict_by_type(encoder, {nn.Linear: qconfig})
        start = time.perf_counter()
        run_fn = lambda m, bs: [m(*b) for b in bs]  # noqa: E731
        _, report = gq.quantize_with_accuracy_control(encoder, qconfig_dict, run_fn, [calibration], cosine, 0.002,
                                                      example_inputs=calibration[0])
        print(f"{name}: {time.perf_counter() - start:.1f} s\n{report}\n")


if __name__ == "__main__":
    main()
