"""The public verbs: prepare, calibrate, convert, quantize, and the seed's ``*_jit`` names.

``prepare`` captures the model (now, or on the first call when no example inputs are
given), folds batch-norm, annotates patterns and inserts observers. ``calibrate`` runs
data through it. ``convert`` lowers it to a reference graph (``debug=True``) or to an
int8 kernel graph, returned as a ``torch.fx.GraphModule``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import fx, nn

from graphquant.capture import capture, check_capturable, check_control_flow, load_program, module_tree
from graphquant.errors import GraphQuantError
from graphquant.graph import rebind_matches
from graphquant.inputs import install_input_check
from graphquant.kernels import onednn
from graphquant.passes.annotate import annotate
from graphquant.passes.fold_bn import fold_bn
from graphquant.passes.insert_observers import insert_observers
from graphquant.passes.lower import lower
from graphquant.qconfig import QConfig, check_qconfig_dict, default_dynamic_qconfig
from graphquant.report import ConversionReport

BACKENDS = ("onednn", "portable")
# what the verbs accept: an nn.Module, a torch.jit.script / torch.jit.trace module, an ExportedProgram or a .pt2 path
ModelInput = nn.Module | torch.export.ExportedProgram | str | os.PathLike[str]


class PreparedModel(nn.Module):
    """A float model with observers, ready for calibration.

    Without example inputs the model is captured on the first call, with the inputs of
    that call (the seed API ``quantize_jit(model, qconfig_dict, run_fn, run_args)`` has
    none). ``graph_module`` is the observed graph once captured.
    """

    def __init__(
        self, model: nn.Module | torch.export.ExportedProgram, qconfig_dict: dict[str, QConfig | None],
        dynamic: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.qconfig_dict = qconfig_dict
        self.dynamic = dynamic
        self.graph_module: fx.GraphModule | None = None
        self._float_model = [model]  # a list, so nn.Module does not register it as a child

    def capture(self, example_inputs: Sequence[Any]) -> None:
        """Capture, fold batch-norm, annotate and insert observers."""
        gm = capture(self._float_model[0], example_inputs)
        check_control_flow(gm, self.qconfig_dict)
        gm = fold_bn(gm)
        matches = annotate(gm, self.qconfig_dict, dynamic=self.dynamic)
        self.graph_module = insert_observers(gm, matches)
        install_input_check(self.graph_module)  # first again: observers must not see a bad batch
        self._float_model.clear()

    def forward(self, *args: Any) -> Any:
        # Calibration never needs gradients. Without no_grad a run_fn that keeps its outputs
        # (``[model(b) for b in batches]``) keeps every batch's autograd graph alive: 7 GB on BERT-base.
        with torch.no_grad():
            if self.graph_module is None:
                self.capture(args)
            assert self.graph_module is not None
            return self.graph_module(*args)


def _check_example_inputs(example_inputs: Any) -> tuple[Any, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise GraphQuantError(
            f"graphquant: example_inputs must be a tuple of model inputs, got {type(example_inputs).__name__}"
        )
    return tuple(example_inputs)


def prepare(
    model: ModelInput, qconfig_dict: Mapping[str, QConfig | None], example_inputs: Sequence[Any] | None = None,
    inplace: bool = False,
) -> PreparedModel:  # fmt: skip
    """Capture ``model`` and insert observers as ``qconfig_dict`` asks.

    ``inplace=False`` (the default) works on a copy: the user's model is never changed.
    With ``example_inputs=None`` capture waits for the first calibration call.
    """
    return _prepare(model, qconfig_dict, example_inputs, inplace, dynamic=False)


def _model(model: ModelInput, inplace: bool) -> nn.Module | torch.export.ExportedProgram:
    """The model to capture: a ``.pt2`` path loaded; a copy unless ``inplace``. A TorchScript module
    or a program cannot turn into its quantized graph in place."""
    if isinstance(model, (str, os.PathLike)):
        model = load_program(model)
    check_capturable(model)
    if isinstance(model, (torch.jit.ScriptModule, torch.export.ExportedProgram)):
        if inplace:
            raise GraphQuantError(
                f"graphquant: inplace=True cannot turn a {type(model).__name__} into a GraphModule; "
                "use inplace=False and keep the returned model"
            )
        return model  # never written to: capture converts it into a new graph
    return model if inplace else copy.deepcopy(model)


def _prepare(
    model: ModelInput, qconfig_dict: Mapping[str, QConfig | None], example_inputs: Sequence[Any] | None,
    inplace: bool, dynamic: bool,
) -> PreparedModel:  # fmt: skip
    model = _model(model, inplace)
    checked = check_qconfig_dict(qconfig_dict, module_tree(model))
    for key, qconfig in checked.items():
        if qconfig is not None and not qconfig.is_weight_only and qconfig.is_dynamic != dynamic:
            want = "quantize_dynamic / prepare_dynamic" if qconfig.is_dynamic else "quantize / prepare"
            raise GraphQuantError(
                f"graphquant: qconfig_dict[{key!r}] is a {'dynamic' if qconfig.is_dynamic else 'static'} qconfig; "
                f"use it with {want}"
            )
    prepared = PreparedModel(model, checked, dynamic=dynamic)
    inputs = _check_example_inputs(example_inputs)
    if inputs is not None:
        prepared.capture(inputs)
    return prepared


def prepare_dynamic(
    model: ModelInput, qconfig_dict: Mapping[str, QConfig | None] | None = None,
    example_inputs: Sequence[Any] | None = None, inplace: bool = False,
) -> PreparedModel:  # fmt: skip
    """Capture ``model`` for dynamic quantization: no observers, no calibration needed.

    ``qconfig_dict`` defaults to ``{"": default_dynamic_qconfig}``.
    """
    qconfig_dict = {"": default_dynamic_qconfig} if qconfig_dict is None else qconfig_dict
    return _prepare(model, qconfig_dict, example_inputs, inplace, dynamic=True)


def calibrate(prepared: PreparedModel, data: Iterable[Any]) -> PreparedModel:
    """Run every batch of ``data`` (a tensor or a tuple of inputs) through ``prepared``."""
    if not isinstance(prepared, PreparedModel):
        raise GraphQuantError("graphquant: calibrate takes the model returned by graphquant.prepare")
    with torch.no_grad():
        for batch in data:
            prepared(*batch) if isinstance(batch, (tuple, list)) else prepared(batch)
    return prepared


def default_backend() -> str:
    """``"onednn"`` where this PyTorch has the oneDNN int8 ops, else ``"portable"``."""
    return "onednn" if onednn.available() else "portable"


def convert(
    prepared: PreparedModel, debug: bool = False, inplace: bool = False, backend: str | None = None
) -> fx.GraphModule:
    """Lower a calibrated model: a reference graph (``debug=True``) or an int8 kernel graph.

    The result is a ``GraphModule``; ``result.graphquant_report`` says what was
    quantized and what stayed float, and why. It is for inference: its float parameters do
    not require grad, so calling it outside ``torch.no_grad()`` records no autograd graph.
    """
    return _convert(prepared, debug, inplace, backend)


def _convert(
    prepared: PreparedModel, debug: bool, inplace: bool, backend: str | None, fuse: bool = True
) -> fx.GraphModule:
    """``convert``; ``fuse=False`` is for numerics, which compares every node's own output."""
    if not isinstance(prepared, PreparedModel):
        raise GraphQuantError(
            f"graphquant: convert takes the model returned by graphquant.prepare, got {type(prepared).__name__}"
        )
    if prepared.graph_module is None and prepared.dynamic:
        return LazyQuantized(prepared, debug, backend)  # type: ignore[return-value]
    if prepared.graph_module is None:
        raise GraphQuantError(
            "graphquant: convert before calibration: the model was never called, so it was not captured "
            "and its observers saw nothing. Call graphquant.calibrate(prepared, batches) first"
        )
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise GraphQuantError(f"graphquant: unknown backend {backend!r}; use one of {BACKENDS}")
    if backend == "onednn" and not onednn.available():
        raise GraphQuantError("graphquant: this PyTorch has no oneDNN int8 ops; use backend='portable'")
    gm = prepared.graph_module
    assert gm is not None
    if not inplace:
        source = gm
        gm = copy.deepcopy(gm)
        rebind_matches(gm)
        for name, value in vars(source).items():  # GraphModule's deepcopy keeps only modules and tensors
            if name.startswith("graphquant_") and not hasattr(gm, name):
                setattr(gm, name, copy.deepcopy(value))
    report = lower(gm, debug, backend, prepared.qconfig_dict, fuse)
    # An inference model: nothing backpropagates through int8 kernels. Float parameters left
    # (LayerNorm, embeddings) requiring grad would make every call outside torch.no_grad()
    # record autograd state, and in-place steps on values that need grad copy them first.
    for parameter in gm.parameters():
        parameter.requires_grad_(False)
    install_input_check(gm)  # first again: lowering put quantize nodes right after the inputs
    # plain attributes on the GraphModule, set with setattr: nn.Module types its attributes as tensors or modules
    setattr(gm, "graphquant_report", report)  # noqa: B010
    setattr(gm, "graphquant_qconfig_dict", dict(prepared.qconfig_dict))  # noqa: B010
    setattr(gm, "graphquant_backend", backend)  # noqa: B010
    setattr(gm, "graphquant_debug", debug)  # noqa: B010
    return gm


def _check_run_fn(run_fn: Any, run_args: Any) -> None:
    if run_fn is None or not callable(run_fn):
        raise GraphQuantError(
            "graphquant: static quantization needs calibration: pass run_fn(model, *run_args) that runs the "
            "model on representative data, or use graphquant.quantize_dynamic, which needs none"
        )
    if run_args is None or not isinstance(run_args, (tuple, list)):
        raise GraphQuantError(
            "graphquant: run_args must be a list or tuple of arguments for run_fn, e.g. [calibration_batches]"
        )


def _become(target: nn.Module, source: nn.Module) -> nn.Module:
    """Turn ``target`` into ``source`` in place, for ``inplace=True``: the caller's reference
    now runs the quantized graph."""
    target.__class__ = source.__class__
    target.__dict__ = source.__dict__
    return target


def quantize(
    model: ModelInput,
    qconfig_dict: Mapping[str, QConfig | None],
    run_fn: Callable[..., Any],
    run_args: Sequence[Any],
    example_inputs: Sequence[Any] | None = None,
    inplace: bool = False,
    debug: bool = False,
    backend: str | None = None,
) -> fx.GraphModule:
    """Static post-training quantization: prepare, ``run_fn(prepared, *run_args)``, convert.

    ``inplace=True`` turns ``model`` itself into the quantized graph (no copy is made);
    ``inplace=False`` leaves it untouched.
    """
    _check_run_fn(run_fn, run_args)
    prepared = prepare(model, qconfig_dict, example_inputs, inplace=inplace)
    run_fn(prepared, *run_args)
    quantized = convert(prepared, debug=debug, inplace=True, backend=backend)
    return _become(model, quantized) if inplace else quantized  # type: ignore[arg-type,return-value]


class LazyQuantized(nn.Module):
    """Dynamic quantization without example inputs: captured and converted on the first call."""

    def __init__(self, prepared: PreparedModel, debug: bool, backend: str | None) -> None:
        super().__init__()
        self.prepared = prepared
        self.debug = debug
        self.backend = backend
        self.quantized: fx.GraphModule | None = None

    def forward(self, *args: Any) -> Any:
        if self.quantized is None:
            self.prepared.capture(args)
            self.quantized = convert(self.prepared, debug=self.debug, inplace=True, backend=self.backend)
        return self.quantized(*args)

    @property
    def graphquant_report(self) -> ConversionReport | None:
        return None if self.quantized is None else cast(ConversionReport, self.quantized.graphquant_report)


def quantize_dynamic(
    model: ModelInput,
    qconfig_dict: Mapping[str, QConfig | None] | None = None,
    example_inputs: Sequence[Any] | None = None,
    inplace: bool = False,
    debug: bool = False,
    backend: str | None = None,
) -> nn.Module:
    """Dynamic quantization: int8 weights now, activation qparams from each batch at run time.

    With ``example_inputs`` the result is a ``GraphModule``; without, a module that captures
    and converts on its first call.
    """
    prepared = prepare_dynamic(model, qconfig_dict, example_inputs, inplace=inplace)
    quantized = convert(prepared, debug=debug, inplace=True, backend=backend)
    return _become(model, quantized) if inplace else quantized  # type: ignore[arg-type]


# The seed's names: torch.ao.quantization.quantize_jit users change only the import.


def prepare_jit(
    model: ModelInput, qconfig_dict: Mapping[str, QConfig | None], inplace: bool = False
) -> PreparedModel:
    """``torch.ao.quantization.prepare_jit``: observers in, captured on the first call."""
    return prepare(model, qconfig_dict, None, inplace=inplace)


def convert_jit(
    model: PreparedModel, inplace: bool = False, debug: bool = False, preserved_attrs: Any = None
) -> fx.GraphModule:
    """``torch.ao.quantization.convert_jit``: the reference graph with ``debug=True``, else int8 kernels."""
    return convert(model, debug=debug, inplace=inplace)


def quantize_jit(
    model: ModelInput,
    qconfig_dict: Mapping[str, QConfig | None],
    run_fn: Callable[..., Any],
    run_args: Sequence[Any],
    inplace: bool = False,
    debug: bool = False,
) -> fx.GraphModule:
    """``torch.ao.quantization.quantize_jit``: same signature and meaning, on ``torch.export``."""
    return quantize(model, qconfig_dict, run_fn, run_args, None, inplace=inplace, debug=debug)


def prepare_dynamic_jit(
    model: ModelInput, qconfig_dict: Mapping[str, QConfig | None] | None = None, inplace: bool = False
) -> PreparedModel:
    """``torch.ao.quantization.prepare_dynamic_jit``."""
    return prepare_dynamic(model, qconfig_dict, None, inplace=inplace)


def convert_dynamic_jit(
    model: PreparedModel, inplace: bool = False, debug: bool = False, preserved_attrs: Any = None
) -> nn.Module:
    """``torch.ao.quantization.convert_dynamic_jit``: converted on the first call if not yet captured."""
    return convert(model, debug=debug, inplace=inplace)


def quantize_dynamic_jit(
    model: ModelInput, qconfig_dict: Mapping[str, QConfig | None] | None = None, inplace: bool = False,
    debug: bool = False,
) -> nn.Module:  # fmt: skip
    """``torch.ao.quantization.quantize_dynamic_jit``: no calibration; captured on the first call."""
    return quantize_dynamic(model, qconfig_dict, None, inplace=inplace, debug=debug)


def report(quantized: nn.Module) -> ConversionReport:
    """The conversion report of a converted model."""
    rep = getattr(quantized, "graphquant_report", None)
    if rep is None:
        raise GraphQuantError("graphquant: this model was not produced by graphquant.convert")
    return rep
