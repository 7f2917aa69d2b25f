"""Partial graph mode: quantize the parts of a model that ``torch.export`` captures, run the rest
eager.

When the whole model does not export (data-dependent control flow, ``.item()``, a loop over a
Python list of variable length, a third-party layer), graphquant runs the float model once on the
example inputs with a hook on every submodule, recording the inputs of each call (and once the
regions are known, a second run records their float outputs, for their SQNR), and walks the
module tree top-down: a submodule that captures becomes a *region*, quantized as a whole graph
its nodes keyed into ``qconfig_dict`` under its path; one that does not is split into its children.
The regions are swapped into a copy of the user's model, so whatever did not capture (the
control flow between regions included) stays in the user's Python and runs in float.

A region is captured with the inputs of its first call: positional tensors with a dynamic batch
dimension, every further argument at its default. A submodule called with other non-batch shapes
on later calls, with non-tensor arguments or keyword arguments off their defaults is split
instead (a region would refuse such calls, and quantizing must never make a model fail to run).
Each region quantizes its own inputs and dequantizes its outputs: at a border between two regions
a tensor is dequantized to float32 and quantized again (one more rounding than a whole graph
would make, and two small elementwise passes).

This module finds regions, captures and converts the model region by region and holds the regions
(:func:`capture_regions`, :func:`convert_regions`, :func:`regions`); :mod:`graphquant.api` hands it
the whole-graph prepare and convert it runs on each region.
"""

from __future__ import annotations

import inspect
import os
import re
import traceback
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from graphquant.errors import CaptureError, GraphQuantError
from graphquant.qconfig import QConfig, resolve
from graphquant.quant_math import output_sqnr
from graphquant.quantized import find_record, record_of
from graphquant.report import ConversionReport, EagerPart, RegionReport


def export_reason(error: BaseException) -> str:
    """One line for the report: the first line of export's error and the source line it stopped
    at (``model.py:12: if x.sum() > 0:``), from the message where it names one, else the last
    frame of the user's code in its traceback."""
    cause = error.__cause__ if isinstance(error, CaptureError) and error.__cause__ is not None else error
    text = str(cause)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(("def ", " "))]
    first = lines[0][:160] if lines else type(cause).__name__
    where = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s+(.+)', text)
    if not where:
        where = re.findall(r"# File: (\S+?):(\d+) in \w+, code: (.+)", text)
    if not where:  # the last frame of the user's own code in the traceback
        libraries = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
        where = [(frame.filename, str(frame.lineno), frame.line) for frame in traceback.extract_tb(cause.__traceback__)
                 if frame.line and not os.path.abspath(frame.filename).startswith(libraries)]
    if where:
        path, line, code = where[-1]
        return f"{first} (at {path.rpartition('/')[2]}:{line}: {code.strip()})"
    return first


@dataclass
class _Calls:
    """What the recording pass saw a submodule called with."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    count: int = 1
    refusal: str | None = None  # why its calls cannot be one captured signature


def _signature(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """What must not change between calls of one region: every tensor's shape without its batch
    dimension and dtype, every other value itself."""

    def one(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape[1:]), value.dtype, value.dim())
        if isinstance(value, (int, float, bool, str, type(None))):
            return value
        return ("object", type(value).__name__)

    return tuple(one(a) for a in args) + tuple((k, one(v)) for k, v in sorted(kwargs.items()))


def record_calls(model: nn.Module, example_inputs: tuple[Any, ...]) -> dict[str, _Calls]:
    """Run ``model`` on ``example_inputs`` once, recording each submodule's calls."""
    calls: dict[str, _Calls] = {}
    signatures: dict[str, tuple[Any, ...]] = {}
    handles = []

    def hook_for(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen = calls.get(path)
            if seen is None:
                calls[path] = _Calls(tuple(args), dict(kwargs))
                signatures[path] = _signature(args, kwargs)
                return
            seen.count += 1
            if seen.refusal is None and _signature(args, kwargs) != signatures[path]:
                seen.refusal = "called with inputs of different shapes or arguments on one run"

        return hook

    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_pre_hook(hook_for(path), with_kwargs=True))
    _run_hooked(model, example_inputs, handles)
    return calls


def record_outputs(model: nn.Module, example_inputs: tuple[Any, ...], paths: Collection[str]) -> dict[str, Any]:
    """Run ``model`` on ``example_inputs`` once more, keeping the first output of each of ``paths``
    (the regions: a region's SQNR is measured against it). A second run, so that the recording
    pass never holds every submodule's output at once."""
    outputs: dict[str, Any] = {}

    def hook_for(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            outputs.setdefault(path, output)

        return hook

    handles = [model.get_submodule(path).register_forward_hook(hook_for(path)) for path in paths]
    _run_hooked(model, example_inputs, handles)
    return outputs


def _run_hooked(model: nn.Module, example_inputs: tuple[Any, ...], handles: list[Any]) -> None:
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception as error:  # noqa: BLE001 - the user's own model on the user's own inputs
        raise GraphQuantError(
            f"graphquant: the float model raised on its example inputs, so its parts cannot be recorded: "
            f"{type(error).__name__}: {error}"
        ) from error
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Binding:
    """How a region's calls map to the positional tensors it was captured with: the first
    ``tensors`` parameters of ``forward``; every later one must stay at its default."""

    names: list[str]
    tensors: int
    signature: inspect.Signature | None = field(default=None, repr=False)

    @classmethod
    def of(cls, module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Binding:
        """The binding of ``module``'s recorded call, or a CaptureError saying why it has none."""
        try:
            signature = inspect.signature(module.forward)
            bound = signature.bind(*args, **kwargs)
        except (TypeError, ValueError) as error:
            raise CaptureError(f"its forward's arguments cannot be bound ({error})") from error
        bound.apply_defaults()
        names = list(signature.parameters)
        kinds = [p.kind for p in signature.parameters.values()]
        if any(k in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for k in kinds):
            if any(bound.arguments.get(n) for n, k in zip(names, kinds, strict=True)
                   if k in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)):
                raise CaptureError("called with *args or **kwargs")
        tensors = 0
        while tensors < len(names) and isinstance(bound.arguments.get(names[tensors]), torch.Tensor):
            tensors += 1
        for name in names[tensors:]:
            parameter = signature.parameters[name]
            if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                continue
            if not _is_default(bound.arguments.get(name), parameter.default):
                raise CaptureError(f"called with {name}={_short(bound.arguments.get(name))}, not a leading tensor "
                                   "argument nor its default")
        if tensors == 0:
            raise CaptureError("called without tensor arguments")
        return cls(names[:tensors], tensors, signature)

    def inputs(self, path: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        """A call's positional tensors, after checking that the rest is at its defaults."""
        if not kwargs and len(args) == self.tensors:
            return args
        assert self.signature is not None
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise GraphQuantError(f"graphquant: region {path}: {error}") from error
        for name, value in bound.arguments.items():
            if name not in self.names[: self.tensors]:
                parameter = self.signature.parameters[name]
                if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) and not value:
                    continue
                if not _is_default(value, parameter.default):
                    raise GraphQuantError(
                        f"graphquant: region {path} was captured with {name} at its default; this call passes "
                        f"{name}={_short(value)}. Keep it float with qconfig_dict={{{path!r}: None}}, or pass it "
                        "in the example inputs' call too"
                    )
        return tuple(bound.arguments[name] for name in self.names[: self.tensors])


def _is_default(value: Any, default: Any) -> bool:
    if value is default:
        return True
    if isinstance(value, torch.Tensor) or default is inspect.Parameter.empty:
        return False
    try:
        return bool(value == default)
    except Exception:  # noqa: BLE001 - an object whose == is not a bool
        return False


def _short(value: Any) -> str:
    text = f"<tensor {tuple(value.shape)}>" if isinstance(value, torch.Tensor) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Region(nn.Module):
    """A captured submodule inside the user's model: binds each call to the positional tensors it
    was captured with and runs ``inner`` (the prepared model while calibrating, the quantized
    graph after convert). ``example`` and ``float_output`` hold the recorded call until convert
    has measured the region's SQNR on it."""

    def __init__(self, path: str, inner: nn.Module, binding: Binding, example: tuple[Any, ...] | None,
                 float_output: Any) -> None:
        super().__init__()
        self.path = path
        self.inner = inner
        self.binding = binding
        self.example: tuple[Any, ...] | None = example
        self.float_output: Any = float_output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*self.binding.inputs(self.path, args, kwargs))

    def train(self, mode: bool = True) -> Region:
        """A quantized region is for inference: ``model.train()`` / ``model.eval()`` on the user's
        model leave it as it is (a loaded program refuses ``train``)."""
        self.training = mode
        return self

    def extra_repr(self) -> str:
        return f"path={self.path!r}"


def _quantizes_anything(module: nn.Module, qconfig_dict: Mapping[str, QConfig | None], path: str) -> bool:
    return any(
        resolve(qconfig_dict, f"{path}.{name}" if name else path).qconfig is not None
        for name, _ in module.named_modules()
    )


def find_regions(
    model: nn.Module,
    calls: Mapping[str, _Calls],
    qconfig_dict: Mapping[str, QConfig | None],
    whole_error: BaseException,
    make_region: Callable[[str, nn.Module, tuple[Any, ...]], nn.Module],
) -> tuple[dict[str, Region], list[EagerPart]]:
    """The largest submodules of ``model`` that capture, top-down, each made into a region by
    ``make_region(path, module, inputs)`` (which raises CaptureError where export fails); and
    every module left eager with its reason, the model's own forward first."""
    regions: dict[str, Region] = {}
    eager = [EagerPart("", export_reason(whole_error))]

    def visit(path: str, module: nn.Module) -> None:
        if not _quantizes_anything(module, qconfig_dict, path):
            return  # float by the qconfig_dict: nothing to capture
        seen = calls.get(path)
        children = list(module.named_children())
        if seen is None:  # a ModuleList / ModuleDict is never called itself; a module may be unused here
            if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
                for name, child in children:
                    visit(f"{path}.{name}", child)
            elif any(True for _ in module.parameters()):
                eager.append(EagerPart(path, "not called on the example inputs"))
            return
        reason = seen.refusal
        if reason is None:
            try:
                binding = Binding.of(module, seen.args, seen.kwargs)
                inputs = binding.inputs(path, seen.args, seen.kwargs)
                regions[path] = Region(path, make_region(path, module, inputs), binding, inputs, None)
                return
            except CaptureError as error:
                reason = export_reason(error) if error.__cause__ is not None else str(error)
            except Exception as error:  # noqa: BLE001 - any failure to prepare a part leaves it eager, never breaks the model
                reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        eager.append(EagerPart(path, reason))
        for name, child in children:
            visit(f"{path}.{name}", child)

    for name, child in model.named_children():
        visit(name, child)
    return regions, eager


def regions(model: nn.Module) -> list[Region]:
    """The regions of a model captured region by region, in module order (none for a model captured
    whole): what every output format and tool asks for a partial model's parts."""
    if isinstance(model, fx.GraphModule):
        return []
    return [module for module in model.modules() if isinstance(module, Region)]


def capture_regions(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    qconfig_dict: Mapping[str, QConfig | None],
    whole_error: CaptureError | None,
    prepare_region: Callable[[str, nn.Module, tuple[Any, ...]], nn.Module],
    announce: bool,
) -> list[EagerPart]:
    """Partial graph mode on ``model``, in place: each largest submodule that exports becomes a
    region holding ``prepare_region(path, module, its inputs)`` (which raises ``CaptureError`` where
    export fails); the rest stays eager. Returns what stayed eager and why (the model's own forward
    first: ``whole_error``, or None where partial mode was asked for); ``announce`` warns once,
    naming both."""
    calls = record_calls(model, example_inputs)
    if whole_error is None:
        whole_error = CaptureError("partial=True: the model's own forward runs eager")
    found, eager = find_regions(model, calls, qconfig_dict, whole_error, prepare_region)
    outputs = record_outputs(model, example_inputs, list(found))  # before the float parts are swapped out
    for path, region in found.items():
        region.float_output = outputs.get(path)
        model.set_submodule(path, region)
    if announce:
        warnings.warn(
            f"graphquant: {type(model).__name__} does not export whole ({eager[0].reason}); quantized "
            f"{len(found)} parts that do ({', '.join(found) or 'none'}), the rest runs eager in float: "
            f"{', '.join(p.path or '<model>' for p in eager)}. graphquant.report(q) says why for each; "
            "partial=False refuses instead",
            stacklevel=6,
        )
    return eager


def convert_regions(model: nn.Module, eager: list[EagerPart], convert_region: Callable[[nn.Module], nn.Module],
                    mode: str, backend: str) -> ConversionReport:
    """Convert each region of ``model`` (in place) with ``convert_region``, measure it against the
    float output recorded for it, and report the whole: every region's nodes under its path, every
    region and every part left eager (``mode`` and ``backend`` name a model with no region)."""
    nodes, found, smoothing, corrected = [], [], [], []
    for region in regions(model):
        if find_record(region.inner) is not None:
            continue  # converted already (convert in place, twice)
        quantized = convert_region(region.inner)
        region.inner = quantized
        rep = record_of(quantized).report
        mode, backend = rep.mode, rep.backend
        nodes += [replace(n, module_path=f"{region.path}.{n.module_path}" if n.module_path else region.path)
                  for n in rep.nodes]
        smoothing += [replace(s, linears=tuple(f"{region.path}.{p}" if p else region.path for p in s.linears))
                      for s in rep.smoothing]
        corrected += [replace(b, layer=f"{region.path}.{b.layer}" if b.layer else region.path)
                      for b in rep.bias_correction]
        region_sqnr = None
        if region.example is not None and region.float_output is not None:
            with torch.no_grad():
                region_sqnr = output_sqnr(region.float_output, quantized(*region.example))
        region.example, region.float_output = None, None
        found.append(RegionReport(region.path, len(rep.quantized), len(rep.float_nodes), region_sqnr))
    return ConversionReport(mode, backend, nodes, regions=found, eager=list(eager), smoothing=smoothing,
                            bias_correction=corrected)
