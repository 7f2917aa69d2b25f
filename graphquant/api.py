"""The public verbs: prepare, calibrate, convert, quantize, and the seed's ``*_jit`` names.

``prepare`` captures the model (now, or on the first call when no example inputs are
given), folds batch-norm, annotates patterns and inserts observers. ``calibrate`` runs
data through it. ``convert`` lowers it to a reference graph (``debug=True``) or to an
int8 kernel graph, returned as a ``torch.fx.GraphModule``. A model that ``torch.export`` cannot
capture whole is quantized region by region (``partial="auto"``, :mod:`graphquant.partial`): the
result is then a copy of the user's model with its captured submodules quantized.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from graphquant.capture import capture, check_capturable, check_control_flow, load_program, module_tree, stamp_qconfig
from graphquant.errors import CaptureError, GraphQuantError
from graphquant.graph import rebind_matches
from graphquant.inputs import input_specs, install_input_check
from graphquant.kernels import onednn
from graphquant.partial import capture_regions, convert_regions, regions
from graphquant.passes.annotate import annotate
from graphquant.passes.fold_bn import fold_bn
from graphquant.passes.insert_observers import insert_observers
from graphquant.passes.lower import lower
from graphquant.passes.verify import check_lowered, check_matches
from graphquant.qconfig import QConfig, check_qconfig_dict, default_dynamic_qconfig
from graphquant.quantized import QuantizedRecord, attach, find_record, set_report
from graphquant.report import ConversionReport, EagerPart
from graphquant.runtimes import install_direct_calls

BACKENDS = ("onednn", "portable")
PARTIAL = (True, False, "auto")
# what the verbs accept: an nn.Module, a torch.jit.script / torch.jit.trace module, an ExportedProgram or a .pt2 path
ModelInput = nn.Module | torch.export.ExportedProgram | str | os.PathLike[str]


class PreparedModel(nn.Module):
    """A float model with observers, ready for calibration.

    Without example inputs the model is captured on the first call, with the inputs of
    that call (the seed API ``quantize_jit(model, qconfig_dict, run_fn, run_args)`` has
    none). ``graph_module`` is the observed graph once captured; for a model captured region
    by region (``partial``), ``partial_model`` is the user's model with a prepared region in
    place of each captured submodule and ``eager_parts`` what stayed eager and why.
    """

    def __init__(
        self, model: nn.Module | torch.export.ExportedProgram, qconfig_dict: dict[str, QConfig | None],
        dynamic: bool = False, partial: bool | str = "auto", module_path: str = "",
    ) -> None:
        super().__init__()
        if partial not in PARTIAL or not isinstance(partial, (bool, str)):
            raise GraphQuantError(f"graphquant: partial must be True, False or 'auto', got {partial!r}")
        self.qconfig_dict = qconfig_dict
        self.module_path = module_path  # a region's path in the user's model: its nodes' qconfig_dict keys
        self.dynamic = dynamic
        self.partial = partial
        self.graph_module: fx.GraphModule | None = None
        self.partial_model: nn.Module | None = None
        self.eager_parts: list[EagerPart] = []
        self._float_model = [model]  # a list, so nn.Module does not register it as a child

    def capture(self, example_inputs: Sequence[Any]) -> None:
        """Capture, fold batch-norm, annotate and insert observers; region by region where the
        whole model does not export (``partial``)."""
        model = self._float_model[0]
        by_regions = isinstance(model, nn.Module) and not isinstance(model, torch.jit.ScriptModule)
        if self.partial is True and by_regions:
            self._capture_regions(tuple(example_inputs), None)
            return
        try:
            gm = capture(model, example_inputs)
        except CaptureError as error:
            if self.partial is False or not by_regions:
                raise
            self._capture_regions(tuple(example_inputs), error)
            return
        stamp_qconfig(gm, self.qconfig_dict, self.module_path)
        check_control_flow(gm)
        gm = fold_bn(gm)
        matches = annotate(gm, dynamic=self.dynamic)
        self.graph_module = insert_observers(gm, matches)
        check_matches(self.graph_module, "insert_observers")
        install_input_check(self.graph_module)  # first again: observers must not see a bad batch
        self._float_model.clear()

    def _capture_regions(self, example_inputs: tuple[Any, ...], whole_error: CaptureError | None) -> None:
        """Partial graph mode (graphquant.partial): each largest submodule that exports becomes a region
        inside the user's model, prepared here as a whole graph; the rest stays eager."""
        model = self._float_model[0]
        assert isinstance(model, nn.Module)

        def prepare_region(path: str, module: nn.Module, inputs: tuple[Any, ...]) -> nn.Module:
            region = PreparedModel(module, self.qconfig_dict, self.dynamic, partial=False, module_path=path)
            region.capture(inputs)
            specs = input_specs(region.graph_module) if region.graph_module is not None else None
            if specs is None or any(s is not None and s.rank > 0 and not s.dynamic_batch for s in specs):
                raise CaptureError("export fixed its batch size (a region must take any batch)")
            return region

        self.eager_parts = capture_regions(model, example_inputs, self.qconfig_dict, whole_error, prepare_region,
                                           announce=self.partial == "auto")
        self.partial_model = model
        self._float_model.clear()

    def forward(self, *args: Any) -> Any:
        # Calibration never needs gradients. Without no_grad a run_fn that keeps its outputs
        # (``[model(b) for b in batches]``) keeps every batch's autograd graph alive: 7 GB on BERT-base.
        with torch.no_grad():
            if self.graph_module is None and self.partial_model is None:
                self.capture(args)
            if self.partial_model is not None:
                return self.partial_model(*args)
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
    inplace: bool = False, partial: bool | str = "auto",
) -> PreparedModel:
    """Capture ``model`` and insert observers as ``qconfig_dict`` asks.

    ``inplace=False`` (the default) works on a copy: the user's model is never changed.
    With ``example_inputs=None`` capture waits for the first calibration call.
    ``partial``: ``"auto"`` captures the whole model when it exports and region by region when
    it does not (with one warning naming what stays eager); ``False`` refuses a model that does
    not export whole; ``True`` always quantizes region by region (:mod:`graphquant.partial`).
    """
    return _prepare(model, qconfig_dict, example_inputs, inplace, dynamic=False, partial=partial)


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
    inplace: bool, dynamic: bool, partial: bool | str = "auto",
) -> PreparedModel:
    model = _model(model, inplace)
    checked = check_qconfig_dict(qconfig_dict, module_tree(model))
    for key, qconfig in checked.items():
        if qconfig is not None and not qconfig.is_weight_only and qconfig.is_dynamic != dynamic:
            want = "quantize_dynamic / prepare_dynamic" if qconfig.is_dynamic else "quantize / prepare"
            raise GraphQuantError(
                f"graphquant: qconfig_dict[{key!r}] is a {'dynamic' if qconfig.is_dynamic else 'static'} qconfig; "
                f"use it with {want}"
            )
    prepared = PreparedModel(model, checked, dynamic=dynamic, partial=partial)
    inputs = _check_example_inputs(example_inputs)
    if inputs is not None:
        prepared.capture(inputs)
    return prepared


def prepare_dynamic(
    model: ModelInput, qconfig_dict: Mapping[str, QConfig | None] | None = None,
    example_inputs: Sequence[Any] | None = None, inplace: bool = False, partial: bool | str = "auto",
) -> PreparedModel:
    """Capture ``model`` for dynamic quantization: no observers, no calibration needed.

    ``qconfig_dict`` defaults to ``{"": default_dynamic_qconfig}``; ``partial`` as in :func:`prepare`.
    """
    qconfig_dict = {"": default_dynamic_qconfig} if qconfig_dict is None else qconfig_dict
    return _prepare(model, qconfig_dict, example_inputs, inplace, dynamic=True, partial=partial)


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

    The result is a ``GraphModule``; ``graphquant.report(result)`` says what was
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
    if prepared.partial_model is not None:
        return _convert_regions(prepared, debug, inplace, backend)  # type: ignore[return-value]
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
        gm = copy.deepcopy(gm)
        rebind_matches(gm)
    check_matches(gm, "copying the prepared graph" if not inplace else "prepare")
    mode = "reference" if debug else "kernel"
    attach(gm, QuantizedRecord(ConversionReport(mode, backend), dict(prepared.qconfig_dict)))  # lowering packs into it
    set_report(gm, lower(gm, debug, backend, fuse))
    check_lowered(gm)
    # An inference model: nothing backpropagates through int8 kernels. Float parameters left
    # (LayerNorm, embeddings) requiring grad would make every call outside torch.no_grad()
    # record autograd state, and in-place steps on values that need grad copy them first.
    for parameter in gm.parameters():
        parameter.requires_grad_(False)
    install_input_check(gm)  # first again: lowering put quantize nodes right after the inputs
    install_direct_calls(gm)  # its forward calls the Python kernels without PyTorch's dispatcher
    return gm


def _convert_regions(prepared: PreparedModel, debug: bool, inplace: bool, backend: str | None) -> nn.Module:
    """``convert`` of a model captured region by region (graphquant.partial): each region converted
    as a whole graph."""
    assert prepared.partial_model is not None
    model = prepared.partial_model if inplace else copy.deepcopy(prepared.partial_model)
    if not inplace:  # the copy's matches still name the prepared graphs' nodes
        for region in regions(model):
            if isinstance(region.inner, PreparedModel) and region.inner.graph_module is not None:
                rebind_matches(region.inner.graph_module)

    def convert_region(inner: nn.Module) -> nn.Module:
        assert isinstance(inner, PreparedModel)
        return _convert(inner, debug, True, backend)

    report = convert_regions(model, prepared.eager_parts, convert_region, "reference" if debug else "kernel",
                             backend or default_backend())
    attach(model, QuantizedRecord(report, dict(prepared.qconfig_dict)))
    return model


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
    partial: bool | str = "auto",
) -> fx.GraphModule:
    """Static post-training quantization: prepare, ``run_fn(prepared, *run_args)``, convert.

    ``inplace=True`` turns ``model`` itself into the quantized graph (no copy is made);
    ``inplace=False`` leaves it untouched. ``partial`` as in :func:`prepare`: a model that does
    not export whole comes back as a copy of itself with its captured parts quantized.
    """
    _check_run_fn(run_fn, run_args)
    prepared = prepare(model, qconfig_dict, example_inputs, inplace=inplace, partial=partial)
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
    def graphquant_record(self) -> QuantizedRecord | None:
        """The quantized graph's record once it has run (graphquant.quantized)."""
        return None if self.quantized is None else find_record(self.quantized)

    @property
    def graphquant_report(self) -> ConversionReport | None:
        record = self.graphquant_record
        return None if record is None else record.report


def quantize_dynamic(
    model: ModelInput,
    qconfig_dict: Mapping[str, QConfig | None] | None = None,
    example_inputs: Sequence[Any] | None = None,
    inplace: bool = False,
    debug: bool = False,
    backend: str | None = None,
    partial: bool | str = "auto",
) -> nn.Module:
    """Dynamic quantization: int8 weights now, activation qparams from each batch at run time.

    With ``example_inputs`` the result is a ``GraphModule``; without, a module that captures
    and converts on its first call. ``partial`` as in :func:`prepare`.
    """
    prepared = prepare_dynamic(model, qconfig_dict, example_inputs, inplace=inplace, partial=partial)
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
) -> nn.Module:
    """``torch.ao.quantization.quantize_dynamic_jit``: no calibration; captured on the first call."""
    return quantize_dynamic(model, qconfig_dict, None, inplace=inplace, debug=debug)


def report(quantized: nn.Module) -> ConversionReport:
    """The conversion report of a converted model."""
    record = find_record(quantized)
    if record is None:
        raise GraphQuantError("graphquant: this model was not produced by graphquant.convert")
    return record.report
