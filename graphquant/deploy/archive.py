"""``graphquant.save`` / ``graphquant.load``: one ``.pt2`` program for a model quantized whole
(:mod:`graphquant.program`), an archive of programs for one quantized region by region
(:mod:`graphquant.partial`).

The archive of a partial model is a zip file holding each region's ``.pt2`` program (saved and
loaded by :mod:`graphquant.program`, int8 weights repacked on load), the float state of
everything else (``torch.save`` of the model's ``state_dict`` without the regions), and
``graphquant/partial.json``: the model's class, each region's path and program, and the report
(regions, eager parts and their reasons, every node). The manifest is also written beside it
(``model.pt2`` -> ``model.manifest.json``). Loading builds the float model from its class (or
takes the one passed as ``float_model``), loads the float state and swaps each region in: the
user rebuilds nothing but the class.
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphquant.deploy import compiled, program
from graphquant.errors import GraphQuantError
from graphquant.inputs import input_specs
from graphquant.partial import Binding, Region, regions
from graphquant.qconfig import QConfig
from graphquant.quantized import QuantizedRecord, attach, record_of
from graphquant.report import ConversionReport, EagerPart, NodeReport, RegionReport, bias_lines, smoothing_lines

PARTIAL_MANIFEST = "graphquant/partial.json"
PARTIAL_FORMAT, PARTIAL_VERSION = "graphquant-partial", 1


def save(qmodel: nn.Module, path: str | os.PathLike[str], package: str = "program") -> None:
    """Write a quantized model: a ``.pt2`` program and its manifest, or for a model quantized
    region by region an archive of one program per region plus the float rest.

    ``package="aoti"``: an AOTInductor package instead (:func:`graphquant.compiled.save_package`),
    the graph compiled by Inductor into a shared library that runs without Python or graphquant
    (``torch._inductor.aoti_load_package``, or ``AOTIModelPackageLoader`` in C++). Models quantized
    whole only."""
    if package not in ("program", "aoti"):
        raise GraphQuantError(f"graphquant: save(package={package!r}): choose 'program' (a .pt2 program, the "
                              "default) or 'aoti' (an AOTInductor package)")
    if package == "aoti":
        if regions(qmodel):
            raise GraphQuantError(
                "graphquant: save(package='aoti') compiles a model quantized whole; this one was quantized region "
                "by region (it does not export whole): save it with graphquant.save(qmodel, path), or compile its "
                "regions with graphquant.compile"
            )
        compiled.save_package(qmodel, path)
        return
    parts = regions(qmodel)
    if not parts:
        program.save(qmodel, path)
        return
    record = record_of(qmodel)
    program.check_writable(path)
    program.check_writable(program.manifest_path(path), "the manifest")
    cls = type(qmodel)
    region_paths = [r.path for r in parts]
    state = {k: v for k, v in qmodel.state_dict().items() if not any(k.startswith(p + ".") for p in region_paths)}
    data: dict[str, Any] = {
        "format": PARTIAL_FORMAT,
        "version": PARTIAL_VERSION,
        "model_class": f"{cls.__module__}:{cls.__qualname__}",
        "regions": [{"path": r.path, "file": f"regions/{i}.pt2"} for i, r in enumerate(parts)],
        "report": record.report.to_dict(),
        "qconfig_dict": {key: None if q is None else q.to_dict() for key, q in record.qconfig_dict.items()},
    }
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(path, "w") as archive:
        for i, region in enumerate(parts):
            file = Path(tmp) / f"{i}.pt2"
            program.save(region.inner, file)
            archive.write(file, f"regions/{i}.pt2")
        buffer = io.BytesIO()
        torch.save(state, buffer)
        archive.writestr("float_state.pt", buffer.getvalue())
        archive.writestr(PARTIAL_MANIFEST, text)
    with open(program.manifest_path(path), "w", encoding="utf-8") as f:
        f.write(text)


def _is_partial(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return PARTIAL_MANIFEST in archive.namelist()


def _float_model(model_class: str, path: str) -> nn.Module:
    module_name, _, qualname = model_class.partition(":")
    way_out = f"pass the float model: graphquant.load({path!r}, float_model=YourModel(...))"
    try:
        owner: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            owner = getattr(owner, part)
        return owner()
    except Exception as error:  # noqa: BLE001 - any failure to import or build the class: say how to pass it
        raise GraphQuantError(
            f"graphquant: {path} holds a partially quantized {model_class}, and building it here failed "
            f"({type(error).__name__}: {error}); {way_out}"
        ) from error


def load(path: str | os.PathLike[str], float_model: nn.Module | None = None) -> nn.Module:
    """A model saved by :func:`save`. For a partially quantized model (an archive), the float
    model is built from its recorded class with no arguments unless ``float_model`` is given (an
    instance of that class; it is modified: its regions are replaced by the quantized ones)."""
    text = os.fspath(path)
    if compiled.is_package(text):
        if float_model is not None:
            raise GraphQuantError(f"graphquant: {text} is an AOTInductor package: load it without float_model")
        return compiled.load_package(text)
    if not _is_partial(text):
        if float_model is not None:
            raise GraphQuantError(f"graphquant: {text} is a whole quantized program: load it without float_model")
        return program.load(text)
    with zipfile.ZipFile(text) as archive:
        data = json.loads(archive.read(PARTIAL_MANIFEST))
        if data.get("format") != PARTIAL_FORMAT or data.get("version") != PARTIAL_VERSION:
            raise GraphQuantError(f"graphquant: {text} is a partial archive of another format or version: {data}")
        model = (float_model if float_model is not None else _float_model(data["model_class"], text)).eval()
        recorded = data["model_class"]
        actual = f"{type(model).__module__}:{type(model).__qualname__}"
        if actual != recorded:
            raise GraphQuantError(f"graphquant: {text} was saved from a {recorded}, float_model is a {actual}")
        state = torch.load(io.BytesIO(archive.read("float_state.pt")), weights_only=True)
        with tempfile.TemporaryDirectory() as tmp:
            for entry in data["regions"]:
                file = Path(tmp) / Path(entry["file"]).name
                file.write_bytes(archive.read(entry["file"]))
                inner = program.load(file)
                try:
                    module = model.get_submodule(entry["path"])
                except AttributeError as error:
                    raise GraphQuantError(f"graphquant: {text}: the float model has no submodule {entry['path']!r} "
                                          "for the saved region") from error
                signature = inspect.signature(module.forward)
                tensors = len(input_specs(inner) or ())
                binding = Binding(list(signature.parameters)[:tensors], tensors, signature)
                model.set_submodule(entry["path"], Region(entry["path"], inner, binding, None, None))
    missing, unexpected = model.load_state_dict(state, strict=False)
    region_paths = [entry["path"] for entry in data["regions"]]
    missing = [k for k in missing if not any(k.startswith(p + ".") for p in region_paths)]
    if missing or unexpected:
        raise GraphQuantError(f"graphquant: {text}: the float model's state does not match the saved one "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]}); build it with the same "
                              "arguments")
    rep = data["report"]
    report = ConversionReport(rep["mode"], rep["backend"], [NodeReport(**n) for n in rep["nodes"]],
                              regions=[RegionReport(**r) for r in rep.get("regions", [])],
                              eager=[EagerPart(**p) for p in rep.get("eager", [])],
                              smoothing=smoothing_lines(rep.get("smoothing", [])),
                              bias_correction=bias_lines(rep.get("bias_correction", [])))
    qconfig_dict = {key: None if q is None else QConfig.from_dict(q) for key, q in data.get("qconfig_dict", {}).items()}
    attach(model, QuantizedRecord(report, qconfig_dict))  # archives written before the record have none
    return model


__all__ = ["load", "save"]
