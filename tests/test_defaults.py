"""The default recipe (issue #29): what ``get_default_qconfig`` and ``default_dynamic_qconfig`` quantize
on a CNN, a post-LN encoder and a pre-LN (ViT) block, why the report says each op stayed float, and
that the default beats quantizing every op where the rule keeps ops float."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import graphquant as gq
from graphquant.kernels import x86
from graphquant.quant_math import sqnr

CHAINS = "kept float (qconfig ops='chains')"


def _quantize(model: nn.Module, qconfig: gq.QConfig, batches: list[tuple[torch.Tensor, ...]]) -> nn.Module:
    return gq.quantize(model, {"": qconfig}, lambda m, bs: [m(*b) for b in bs], [batches], example_inputs=batches[0])


def _floats(q: nn.Module) -> dict[str, list[str]]:
    """op -> the reasons its float nodes give."""
    out: dict[str, list[str]] = {}
    for n in gq.report(q).float_nodes:
        out.setdefault(n.op, []).append(n.reason)
    return out


class ResidualCnn(nn.Module):
    """conv-bn-relu, a residual block (conv + add + relu), max pool, a concatenation of two convs,
    a hardswish between convs, average pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.left, self.right = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.block(x) + x)
        x = nn.functional.max_pool2d(x, 2)
        x = torch.cat([self.left(x), self.right(x)], 1)
        x = self.mix(nn.functional.hardswish(x))
        return self.head(x.mean((2, 3)))


def test_a_cnn_runs_its_chains_in_int8() -> None:
    """Convs, the residual join, the pool, the concatenation and the hardswish between convs all int8:
    each reads values an int8 conv writes in uint8 anyway, so int8 adds no rounding there."""
    torch.manual_seed(0)
    model = ResidualCnn().eval()
    batches = [(torch.randn(4, 3, 16, 16),) for _ in range(3)]
    q = _quantize(model, gq.default_qconfig, batches)
    kernels = {n.kernel for n in gq.report(q).quantized}
    assert {"qconv2d", "qconv2d_add", "graphquant.qcat", "qlinear"} <= kernels, kernels
    quantized_ops = {n.op for n in gq.report(q).quantized}
    assert {"aten.max_pool2d.default", "aten.hardswish.default", "aten.mean.dim"} <= quantized_ops, quantized_ops
    assert not any(CHAINS in reason for reasons in _floats(q).values() for reason in reasons), _floats(q)
    every = _quantize(model, gq.QConfig(ops="all"), batches)
    assert {n.op for n in gq.report(every).quantized} == quantized_ops  # on a CNN the same ops as torch.ao's


def _tiny_bert() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64)
    bert = transformers.BertModel(config, add_pooling_layer=False).eval()

    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 200, (4, 16), generator=g), torch.ones(4, 16, dtype=torch.long)) for _ in range(4)]
    return Hidden().eval(), batches


def test_an_encoder_keeps_its_residual_stream_float_and_says_why() -> None:
    """Post-LN BERT: every linear int8; the residual adds and the LayerNorms float, each with the reason;
    the default closer to float than every op int8."""
    model, batches = _tiny_bert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = _quantize(model, gq.default_qconfig, batches[:3])
        every = _quantize(model, gq.QConfig(ops="all"), batches[:3])
    linears = [n for n in gq.report(q).nodes if n.op == "aten.linear.default"]
    assert len(linears) == 12 and all(n.quantized for n in linears)
    floats = _floats(q)
    adds = [r for r in floats["aten.add.Tensor"] if r.startswith(CHAINS)]
    assert len(adds) == 4, floats["aten.add.Tensor"]  # two residual adds a layer
    assert all("float32 output of linear" in r and "QConfig(ops='all')" in r for r in adds)
    assert len(floats["aten.layer_norm.default"]) == 5  # embeddings + two a layer
    assert {n.op for n in gq.report(every).quantized} >= {"aten.add.Tensor", "aten.layer_norm.default"}
    x = batches[3]
    with torch.no_grad():
        want = model(*x)
        default_db, every_db = sqnr(want, q(*x)), sqnr(want, every(*x))
    assert default_db > every_db + 3, (default_db, every_db)


def test_a_pre_ln_block_folds_smoothquant_into_its_layer_norm() -> None:
    """ViT (pre-LN): the LayerNorm before q/k/v feeds only them, so where SmoothQuant smooths their
    input it folds 1/s into the LayerNorm (nothing added at run time); adds and LayerNorms float."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=128)
    vit = transformers.ViTModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # outlier channels in the residual stream, as trained transformers have
        vit.embeddings.cls_token[..., :4] = 20.0
        vit.embeddings.position_embeddings[..., :4] += 20.0

    class Features(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = vit

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.vit(pixel_values=pixels).last_hidden_state

    model = Features().eval()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 3, 32, 32, generator=g),) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = _quantize(model, gq.default_qconfig, batches[:3])
    report = gq.report(q)
    assert all(n.quantized for n in report.nodes if n.op == "aten.linear.default")
    floats = _floats(q)
    assert "aten.layer_norm.default" in floats and all(r.startswith(CHAINS) for r in floats["aten.add.Tensor"]
                                                        if "linear" in r)
    folded = [s for s in report.smoothing if s.alpha is not None and s.folded]
    assert folded, [str(s) for s in report.smoothing]
    assert all("layernorm_before" in s.folded or "layer_norm" in s.folded for s in folded), [s.folded for s in folded]
    with torch.no_grad():
        want = model(*batches[3])
        assert sqnr(want, q(*batches[3])) > 20


def test_the_default_dynamic_qconfig_is_per_token_and_per_tensor_stays_available() -> None:
    assert gq.default_dynamic_qconfig.activation.observer == "dynamic_per_token"
    assert gq.per_tensor_dynamic_qconfig.activation.observer == "dynamic"
    assert gq.get_default_dynamic_qconfig(per_token=False).activation.observer == "dynamic"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    x = torch.randn(6, 16)
    q = gq.quantize_dynamic(model, example_inputs=(x,))  # qconfig_dict defaults to the default
    assert {n.kernel for n in gq.report(q).quantized} == {"qlinear_dynamic"}


def test_seven_bits_only_where_this_cpu_saturates() -> None:
    """reduce_range="auto": a GEMM-shaped layer's input takes 7 bits exactly where this CPU's int8 kernels
    saturate (the AVX2-capped run), else 8; True and False force either."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    batches = [(torch.randn(2, 3, 8, 8),)]
    want = {None: 7 if x86.saturates() else 8, True: 7, False: 8}
    for reduce_range, bits in want.items():
        qconfig = gq.default_qconfig if reduce_range is None else gq.get_default_qconfig(reduce_range=reduce_range)
        q = _quantize(model, qconfig, batches)
        convs = [n for n in gq.report(q).quantized if n.op == "aten.conv2d.default"]
        assert {n.activation_bits for n in convs} == {bits}, (reduce_range, [n.activation_bits for n in convs])
        costs = [n.bits_cost_db for n in convs]
        assert all((c is not None) == (reduce_range is None and bits == 7) for c in costs), costs
