"""QConfig: how to observe activations and weights; presets; ``qconfig_dict`` resolution.

``qconfig_dict`` keys are module paths: ``""`` is the whole model, ``"encoder.layer.0"``
a submodule. The most specific key wins, a submodule without a key inherits from its
parent, and ``None`` keeps that part in float.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from graphquant.errors import GraphQuantError
from graphquant.observers import OBSERVERS, Observer
from graphquant.quant_math import UINT4

CONFIG_VERSION = 1
# activation "observers" of dynamic quantization: qparams come from each batch at run time
DYNAMIC_ACTIVATIONS = ("dynamic", "dynamic_per_token")
# activation "observer" of weight-only quantization (embedding tables): activations are indices, or
# stay float; nothing is observed or quantized at run time
WEIGHT_ONLY = "weight_only"
_DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "float16": torch.float16, "uint4": UINT4,
           "float32": torch.float32}


@dataclass(frozen=True)
class ObserverSpec:
    """What kind of observer to build and with which integer format.

    ``axis`` set means per-channel along that axis (weights only).
    """

    observer: str = "minmax"
    dtype: torch.dtype = torch.uint8
    symmetric: bool = False
    axis: int | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS and self.observer not in (*DYNAMIC_ACTIVATIONS, WEIGHT_ONLY):
            raise GraphQuantError(
                f"graphquant: unknown observer {self.observer!r}; choose one of "
                f"{sorted(OBSERVERS) + list(DYNAMIC_ACTIVATIONS) + [WEIGHT_ONLY]}"
            )
        float_qparams = self.observer == "per_channel_float_qparams"
        if self.dtype == UINT4 and not float_qparams:
            raise GraphQuantError(
                "graphquant: torch.uint4 is for embedding tables (observer 'per_channel_float_qparams')"
            )
        if self.is_weight_only != (self.dtype == torch.float32):
            raise GraphQuantError(
                f"graphquant: the {WEIGHT_ONLY!r} activation spec, and only it, has dtype torch.float32 (got "
                f"{self.observer!r}, {self.dtype})"
            )
        if self.dtype not in (torch.uint8, torch.int8, torch.float16, UINT4, torch.float32):
            raise GraphQuantError(f"graphquant: observer dtype must be torch.uint8 or torch.int8, got {self.dtype}")
        if float_qparams and (self.dtype not in (torch.uint8, UINT4) or self.symmetric):
            raise GraphQuantError(
                "graphquant: float qparams are asymmetric, with dtype torch.uint8 (8-bit) or torch.uint4 (4-bit)"
            )
        allowed = {"reduce_range", "one_sided_rows"} if self.observer == "dynamic_per_token" else {"reduce_range"}
        unknown = set(dict(self.options)) - allowed
        if self.observer in DYNAMIC_ACTIVATIONS and unknown:
            raise GraphQuantError(f"graphquant: {self.observer!r} activations take the options {sorted(allowed)}, got "
                                  f"{sorted(unknown)}")
        if dict(self.options).get("reduce_range", False) not in (True, False, "auto"):
            raise GraphQuantError(f"graphquant: reduce_range is True, False or 'auto', got "
                                  f"{dict(self.options)['reduce_range']!r}")
        if dict(self.options).get("one_sided_rows", "asymmetric") not in ("asymmetric", "symmetric"):
            raise GraphQuantError("graphquant: one_sided_rows is 'asymmetric' (the default) or 'symmetric', got "
                                  f"{dict(self.options)['one_sided_rows']!r}")
        per_channel = self.observer.startswith("per_channel")
        if per_channel != (self.axis is not None):
            raise GraphQuantError(
                f"graphquant: observer {self.observer!r} {'needs' if per_channel else 'takes no'} axis "
                f"(got {self.axis})"
            )

    @property
    def is_dynamic(self) -> bool:
        """Whether qparams are computed per batch at run time (no observer, no calibration)."""
        return self.observer in DYNAMIC_ACTIVATIONS

    @property
    def is_weight_only(self) -> bool:
        """Whether this activation spec means "not quantized": weight-only quantization."""
        return self.observer == WEIGHT_ONLY

    def create(self) -> Observer:
        """A fresh observer module."""
        if self.is_dynamic or self.is_weight_only:
            raise GraphQuantError(f"graphquant: {self.observer!r} activations have no observer: they are not observed")
        kwargs: dict[str, Any] = dict(self.options)
        if self.axis is not None:
            kwargs["axis"] = self.axis
        return OBSERVERS[self.observer](dtype=self.dtype, symmetric=self.symmetric, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ObserverSpec:
        d = dict(d)
        d["dtype"] = _DTYPES[d["dtype"]]
        d["options"] = tuple(sorted(d.get("options", {}).items()))
        return cls(**d)


_ALPHAS = tuple(round(0.3 + 0.05 * i, 2) for i in range(11))  # 0.3, 0.35, ..., 0.8


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant (Xiao et al., 2023) for static linears: per input channel ``c``, divide the
    activation by ``s_c = max|x_c| ** alpha / max|w_c| ** (1 - alpha)`` and multiply the weight's
    column by it, so a few outlier channels no longer stretch the activation's one scale.

    At run time it costs one elementwise multiply by ``1 / s`` before the input's quantize (fused
    into it by Inductor); the kernels are unchanged. Linears reading one value share one ``s``
    (the largest weight column of the group). ``alpha="auto"`` searches ``alphas`` per
    group for the least output error of the quantized linears on up to ``rows`` calibration rows
    (and keeps a group unsmoothed when no alpha beats that). The smoothed input's range is its
    exact min/max, from per-channel statistics (the activation observer's method is not used).

    An activation right after an int8 linear (a transformer's FFN GELU) is applied inside that
    linear's kernel, which writes uint8 with one scale; its output is smoothed only with
    ``fused_activations=True``, which takes the activation out of the kernel (a float op and a
    float32 tensor more per FFN; measured on all-MiniLM-L6-v2: cosine 0.9967 -> 0.9978).
    """

    alpha: float | str = 0.5
    alphas: tuple[float, ...] = _ALPHAS
    rows: int = 512
    fused_activations: bool = False

    def __post_init__(self) -> None:
        fixed = isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
        if not (self.alpha == "auto" or (fixed and 0.0 <= float(self.alpha) <= 1.0)):
            raise GraphQuantError(f"graphquant: SmoothQuant alpha is a number in [0, 1] or 'auto', got {self.alpha!r}")
        if not self.alphas or not all(0.0 <= a <= 1.0 for a in self.alphas):
            raise GraphQuantError(f"graphquant: SmoothQuant alphas are numbers in [0, 1], got {self.alphas!r}")
        if self.rows < 1:
            raise GraphQuantError(f"graphquant: SmoothQuant rows must be >= 1, got {self.rows}")

    @property
    def search(self) -> bool:
        """Whether alpha is searched per group (``alpha="auto"``)."""
        return self.alpha == "auto"

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "alphas": list(self.alphas), "rows": self.rows,
                "fused_activations": self.fused_activations}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SmoothQuant:
        return cls(d["alpha"], tuple(d["alphas"]), d["rows"], bool(d.get("fused_activations", False)))


# QConfig.ops: which matched ops of static quantization run in int8 (graphquant.passes.insert_observers)
OPS = ("chains", "all")


@dataclass(frozen=True)
class QConfig:
    """How one part of the model is quantized: an activation and a weight observer spec, and
    optionally :class:`SmoothQuant` for its static linears and bias correction for its static
    convs and linears.

    ``ops`` says which of the ops a pattern matches run in int8 (static quantization):

    - ``"chains"`` (the default): every conv and linear, and an op between them (an add, a pool, a
      concatenation, an activation) only where int8 adds no rounding: each of its inputs is written in
      uint8 by an int8 op that would write uint8 anyway (a conv, an int8 add; not a linear, which
      writes float32 where only float ops read it) — ResNet's and MobileNet's chains run in int8, a
      transformer's residual adds, LayerNorms, GELUs and attention matmuls stay float, where each
      would round a value float keeps exact (all-MiniLM-L6-v2: sentence cosine 0.99 -> 0.88 with them);
    - ``"all"``: every op a pattern matches whose input is quantized, as torch.ao's graph mode does.
    """

    activation: ObserverSpec = field(default_factory=lambda: ObserverSpec("histogram"))
    weight: ObserverSpec = field(
        default_factory=lambda: ObserverSpec("per_channel_minmax", torch.int8, symmetric=True, axis=0)
    )
    smoothquant: SmoothQuant | None = None
    # bias correction for static convs and linears (graphquant.passes.bias_correction): each bias takes
    # off the mean output shift its weight's rounding causes on the calibration data
    bias_correction: bool = False
    ops: str = "chains"

    def __post_init__(self) -> None:
        if self.ops not in OPS:
            raise GraphQuantError(f"graphquant: QConfig ops is one of {OPS}, got {self.ops!r}")
        if not isinstance(self.activation, ObserverSpec) or not isinstance(self.weight, ObserverSpec):
            raise GraphQuantError("graphquant: QConfig(activation, weight) takes two ObserverSpec values")
        if self.weight.dtype == torch.int8 and not self.weight.symmetric:
            raise GraphQuantError(
                "graphquant: int8 weights must be symmetric (zero point 0) for the int8 kernels; "
                "set ObserverSpec(symmetric=True)"
            )
        float_qparams = self.weight.observer == "per_channel_float_qparams"
        if self.is_weight_only != float_qparams:
            raise GraphQuantError(
                f"graphquant: per-row float qparams (embedding tables) go with a {WEIGHT_ONLY!r} activation spec and "
                "it with them; use graphquant.embedding_qconfig or embedding_4bit_qconfig"
            )
        if self.activation.dtype != torch.uint8 and self.activation.observer not in ("dynamic_per_token", WEIGHT_ONLY):
            raise GraphQuantError(
                f"graphquant: activations are uint8 (affine) for the int8 kernels, got {self.activation.dtype}"
            )
        if self.weight.dtype == torch.float16 and not self.is_dynamic:
            raise GraphQuantError("graphquant: float16 weights are for dynamic quantization (float16_dynamic_qconfig)")
        if self.smoothquant is not None and (self.is_dynamic or self.is_weight_only):
            raise GraphQuantError(
                "graphquant: SmoothQuant is for static linears (one activation scale per tensor); dynamic "
                "quantization picks scales per batch: use per_token_dynamic_qconfig for outlier rows"
            )
        if self.bias_correction and (self.is_dynamic or self.is_weight_only):
            raise GraphQuantError("graphquant: bias correction is for static quantization: it needs calibration data")
        if self.smoothquant is not None and not isinstance(self.smoothquant, SmoothQuant):
            raise GraphQuantError(f"graphquant: QConfig smoothquant is a graphquant.SmoothQuant or None, got "
                                  f"{type(self.smoothquant).__name__}")

    @property
    def is_dynamic(self) -> bool:
        """Whether this is a dynamic-quantization config (activation qparams per batch)."""
        return self.activation.is_dynamic

    @property
    def is_weight_only(self) -> bool:
        """Whether this config quantizes weights only (embedding tables): it fits static and
        dynamic ``qconfig_dict`` alike, and leaves every other op float."""
        return self.activation.is_weight_only

    def to_dict(self) -> dict[str, Any]:
        d = {"version": CONFIG_VERSION, "activation": self.activation.to_dict(), "weight": self.weight.to_dict()}
        if self.smoothquant is not None:
            d["smoothquant"] = self.smoothquant.to_dict()
        if self.bias_correction:
            d["bias_correction"] = True
        d["ops"] = self.ops
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QConfig:
        if d.get("version") != CONFIG_VERSION:
            raise GraphQuantError(f"graphquant: QConfig dict version {d.get('version')} is not {CONFIG_VERSION}")
        smoothquant = SmoothQuant.from_dict(d["smoothquant"]) if d.get("smoothquant") else None
        # a dict written before QConfig.ops existed was quantized with every matched op
        return cls(ObserverSpec.from_dict(d["activation"]), ObserverSpec.from_dict(d["weight"]), smoothquant,
                   bool(d.get("bias_correction", False)), str(d.get("ops", "all")))


def qconfig_dict_by_type(
    model: nn.Module, qconfigs: Mapping[type[nn.Module], QConfig | None], default: QConfig | None = None,
    keep_float: Sequence[str] = (),
) -> dict[str, QConfig | None]:
    """A ``qconfig_dict`` keyed by module path from one keyed by module type.

    torch.ao's FX API took ``object_type`` keys; the graph-mode API takes paths only, so this
    spells the types out: ``qconfig_dict_by_type(model, {nn.Linear: get_default_qconfig()})``
    quantizes every ``nn.Linear`` and, with ``default=None``, keeps everything else float
    (attention matmuls, softmax, residual adds, LayerNorm). A linear that only float ops read
    then writes float32 (no output rounding): on all-MiniLM-L6-v2 that recipe keeps a sentence
    cosine of 0.993 where quantizing every op gives 0.87. ``keep_float`` lists paths to keep
    float as well (a transformer's FFN output projections, whose inputs carry the outliers).
    """
    if not isinstance(model, nn.Module):
        raise GraphQuantError(f"graphquant: qconfig_dict_by_type takes an nn.Module, got {type(model).__name__}")
    out: dict[str, QConfig | None] = {"": default}
    for name, module in model.named_modules():
        for kind, qconfig in qconfigs.items():
            if name and isinstance(module, kind):
                out[name] = qconfig
    paths = {name for name, _ in model.named_modules()}
    for path in keep_float:
        if path not in paths:
            close = difflib.get_close_matches(path, sorted(paths), n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise GraphQuantError(f"graphquant: keep_float path {path!r} matches no module of the model{hint}")
        out[path] = None
    return out


def get_default_qconfig(backend: str = "x86", reduce_range: bool | str = "auto") -> QConfig:
    """The recommended static qconfig for a backend.

    ``"x86"`` (oneDNN): histogram observer, uint8 affine activations; per-channel
    symmetric int8 weights. ``"portable"``: min-max uint8 activations, same weights —
    cheaper to calibrate, runs on the pure-PyTorch int8 kernels anywhere. Both quantize conv
    and linear chains (``ops="chains"``: a transformer's residual stream, LayerNorms and GELUs stay
    float) and smooth each linear input that has outlier channels (``SmoothQuant("auto")``, kept
    off where no alpha measures better). Measured (benchmarks/default_recipe.py): all-MiniLM-L6-v2
    b50 sentence cosine 0.9973 (every op int8: 0.884), BERT-base 33.5 dB.

    ``reduce_range`` is the activations' grid. ``"auto"`` (the default) decides per layer when the model
    is converted: where this CPU's int8 kernels saturate (x86 without VNNI, kernels/x86.py) a conv's or
    linear's input goes on 0..127, so the layer runs one exact int8 call instead of the exact float32
    op over its 8-bit integers at about fp32 speed; a depthwise conv, whose oneDNN kernel does not
    saturate, keeps 8 bits, and so does every layer on a CPU with VNNI. The report gives each 7-bit
    layer what it cost its input (estimated from the calibration histogram). ``True`` puts every
    activation on 0..127 (torch.ao's x86 default: for models that will run on CPUs without VNNI
    whichever CPU quantizes them); ``False`` keeps 8 bits everywhere (exact on every CPU, about fp32
    speed without VNNI).
    """
    options: tuple[tuple[str, Any], ...] = (("reduce_range", reduce_range),) if reduce_range else ()
    if backend in ("x86", "onednn", "fbgemm"):
        return QConfig(activation=ObserverSpec("histogram", options=options), smoothquant=SmoothQuant("auto"))
    if backend in ("portable", "qnnpack"):
        return QConfig(activation=ObserverSpec("minmax", options=options), smoothquant=SmoothQuant("auto"))
    raise GraphQuantError(f"graphquant: unknown backend {backend!r}; use 'x86' or 'portable'")


default_qconfig = get_default_qconfig("x86")


def get_default_dynamic_qconfig(per_token: bool = True, reduce_range: bool | str = "auto",
                                one_sided_rows: str = "asymmetric") -> QConfig:
    """A dynamic-quantization qconfig: :data:`default_dynamic_qconfig` (a symmetric int8 scale per
    activation row, per-channel weights) or, ``per_token=False``, :data:`per_tensor_dynamic_qconfig`
    (per-tensor uint8 activations, per-tensor int8 weights: torch.ao's ``default_dynamic_qconfig``).

    ``reduce_range=True`` quantizes each batch onto the 7-bit grid (0..127 per tensor, -64..63 per
    token): for models that will run on x86 CPUs without VNNI, where 7-bit activations run one
    int8 call and 8-bit ones run at about fp32 speed (kernels/x86.py). It costs one bit of
    activation resolution everywhere (docs/x86.md). ``"auto"`` (the default) takes 7 bits only where
    the converting CPU's int8 kernels saturate; ``False`` keeps 8 bits everywhere.

    Per token, a linear whose input is one-sided (the output of a ReLU, GELU, SiLU, hardswish,
    sigmoid or ReLU6: BERT's FFN output projection) gets asymmetric uint8 rows, each on its own
    ``[min, max]`` with a zero point, instead of symmetric int8 rows that leave half the grid unused;
    ``one_sided_rows="symmetric"`` keeps symmetric rows everywhere.
    """
    options: tuple[tuple[str, Any], ...] = (("reduce_range", reduce_range),) if reduce_range else ()
    if per_token and one_sided_rows != "asymmetric":
        options = (*options, ("one_sided_rows", one_sided_rows))
    if per_token:
        return QConfig(activation=ObserverSpec("dynamic_per_token", torch.int8, symmetric=True, options=options),
                       weight=ObserverSpec("per_channel_minmax", torch.int8, symmetric=True, axis=0))
    return QConfig(activation=ObserverSpec("dynamic", options=options),
                   weight=ObserverSpec("minmax", torch.int8, symmetric=True))


def asymmetric_one_sided(spec: ObserverSpec) -> bool:
    """Whether per-token rows of a one-sided input are asymmetric (the default)."""
    rows = dict(spec.options).get("one_sided_rows", "asymmetric")
    return spec.observer == "dynamic_per_token" and rows == "asymmetric"


def activation_qmax(spec: ObserverSpec, saturating: bool = False) -> int:
    """The activation grid's largest value a kernel is told about: 127 with ``reduce_range`` (7-bit),
    and with ``reduce_range="auto"`` where the kernel saturates on this CPU (``saturating``), else 255
    (the schema default)."""
    reduce_range = dict(spec.options).get("reduce_range", False)
    return 127 if reduce_range is True or (reduce_range == "auto" and saturating) else 255

# Dynamic quantization: weights int8 ahead of time, activations quantized per batch.
# torch.ao's default_dynamic_qconfig: one uint8 scale per batch, per-tensor weights.
per_tensor_dynamic_qconfig = QConfig(
    activation=ObserverSpec("dynamic"), weight=ObserverSpec("minmax", torch.int8, symmetric=True)
)
per_channel_dynamic_qconfig = QConfig(
    activation=ObserverSpec("dynamic"),
    weight=ObserverSpec("per_channel_minmax", torch.int8, symmetric=True, axis=0),
)
# Per token: one symmetric int8 scale per row of the activation (asymmetric uint8 rows where the input is
# one-sided: after a ReLU or GELU), per-channel weights. Costs a row-wise amax and a rescale of the output;
# buys accuracy when a few tokens have outlier magnitudes: all-MiniLM-L6-v2 b50 17.6 dB and a sentence cosine
# of 0.9974, per tensor 10.5 dB and 0.965 (benchmarks/default_recipe.py). graphquant's default.
per_token_dynamic_qconfig = QConfig(
    activation=ObserverSpec("dynamic_per_token", torch.int8, symmetric=True),
    weight=ObserverSpec("per_channel_minmax", torch.int8, symmetric=True, axis=0),
)
default_dynamic_qconfig = get_default_dynamic_qconfig()  # per token, 7 bits where this CPU saturates
float16_dynamic_qconfig = QConfig(
    activation=ObserverSpec("dynamic"), weight=ObserverSpec("minmax", torch.float16, symmetric=True)
)

# Embedding tables, weight-only: per-row scale and float offset, no activation observer (the
# inputs are indices), float output. torch.ao's float_qparams_weight_only_qconfig(_4bit). Put it
# on the embedding's module path, in `quantize` and `quantize_dynamic` alike:
# {"": default_qconfig, "embeddings": embedding_qconfig}. The other presets leave embeddings
# float, as torch.ao does: a table's error reaches every token unaveraged, so it is opted into.
embedding_qconfig = QConfig(
    activation=ObserverSpec(WEIGHT_ONLY, torch.float32),
    weight=ObserverSpec("per_channel_float_qparams", torch.uint8, axis=0),
)
# 4 bits a value, two values per byte, float16 scale and offset: 1/8 of the float table plus 4 bytes a row.
embedding_4bit_qconfig = QConfig(
    activation=ObserverSpec(WEIGHT_ONLY, torch.float32),
    weight=ObserverSpec("per_channel_float_qparams", UINT4, axis=0),
)
float_qparams_weight_only_qconfig = embedding_qconfig  # torch.ao's names, for migration
float_qparams_weight_only_qconfig_4bit = embedding_4bit_qconfig
QConfigDict = Mapping[str, "QConfig | None"]


@dataclass(frozen=True)
class Resolved:
    """The qconfig that applies to one module path, and the key it came from."""

    qconfig: QConfig | None
    key: str | None


def check_qconfig_dict(qconfig_dict: object, model: nn.Module) -> dict[str, QConfig | None]:
    """Validate ``qconfig_dict`` against the model's module paths and return a plain dict.

    A key that matches no module is an error naming the closest paths.
    """
    if not isinstance(qconfig_dict, Mapping):
        raise GraphQuantError(
            f"graphquant: qconfig_dict must be a dict of module path -> QConfig or None, got "
            f"{type(qconfig_dict).__name__}; e.g. {{'': graphquant.get_default_qconfig('x86')}}"
        )
    paths = [name for name, _ in model.named_modules()]
    out: dict[str, QConfig | None] = {}
    for key, value in qconfig_dict.items():
        if not isinstance(key, str):
            raise GraphQuantError(f"graphquant: qconfig_dict key {key!r} must be a module path string")
        if value is not None and not isinstance(value, QConfig):
            raise GraphQuantError(
                f"graphquant: qconfig_dict[{key!r}] is a {type(value).__name__}; it must be a graphquant "
                f"QConfig or None (keep float). Build one with graphquant.get_default_qconfig('x86')"
            )
        if key not in paths:
            close = difflib.get_close_matches(key, paths, n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise GraphQuantError(f"graphquant: qconfig_dict key {key!r} matches no module of the model{hint}")
        out[key] = value
    return out


def resolve(qconfig_dict: Mapping[str, QConfig | None], module_path: str) -> Resolved:
    """The qconfig for ``module_path``: its own key, else its nearest ancestor's, else float."""
    path = module_path
    while True:
        if path in qconfig_dict:
            return Resolved(qconfig_dict[path], path)
        if path == "":
            return Resolved(None, None)
        path = path.rpartition(".")[0]
