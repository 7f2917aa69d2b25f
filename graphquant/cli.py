"""The ``graphquant`` command line (also ``python -m graphquant``).

Verbs: ``quantize``, ``tune``, ``check``, ``compare``, ``explain``, ``bench``. A model is named by a
spec ``package.module:factory`` (an ``nn.Module`` or a function returning one), a
TorchScript file, or a ``.pt2`` file. Data is a spec ``package.module:function`` (an
iterable of batches, or a function returning one) or a ``.pt`` file holding a tensor or
a list of them; each batch is a tensor or a tuple of the model's inputs.

Exit codes:

- 0: done;
- 1: a check failed (``check``: the kernel is missing or differs from the reference by
  more than one step; ``compare``: some kernel differs from its reference by more than
  one step, a lowering bug);
- 2: usage error (bad arguments, a bad ``--qconfig`` file, a module path that is not in
  the model);
- 3: the model or the data could not be loaded, or the model could not be captured;
- 4: graphquant failed on a model it loaded (conversion or saving; the message says why).
"""

from __future__ import annotations

import argparse
import importlib
import json
import operator
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram

import graphquant
from graphquant import api
from graphquant import capture as capture_module
from graphquant.errors import GraphQuantError
from graphquant.graph import FLOAT_REASON, MATCH, module_path, node_qconfig
from graphquant.qconfig import (
    QConfig,
    check_qconfig_dict,
    default_dynamic_qconfig,
    embedding_4bit_qconfig,
    embedding_qconfig,
    float16_dynamic_qconfig,
    get_default_dynamic_qconfig,
    get_default_qconfig,
    per_channel_dynamic_qconfig,
    per_tensor_dynamic_qconfig,
    per_token_dynamic_qconfig,
)
from graphquant.quant_math import output_sqnr
from graphquant.tools import distributed

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_LOAD = 3
EXIT_FAILED = 4

Batch = tuple[Any, ...]
Model = nn.Module | ExportedProgram  # what load_model gives and the API takes

# qconfig presets a --qconfig file may name instead of spelling out a QConfig dict
PRESETS: dict[str, QConfig] = {
    "x86": get_default_qconfig("x86"),
    "onednn": get_default_qconfig("x86"),
    "portable": get_default_qconfig("portable"),
    "dynamic": default_dynamic_qconfig,  # per token
    "per_tensor_dynamic": per_tensor_dynamic_qconfig,  # torch.ao's default_dynamic_qconfig
    "per_channel_dynamic": per_channel_dynamic_qconfig,
    "per_token_dynamic": per_token_dynamic_qconfig,
    "float16_dynamic": float16_dynamic_qconfig,
    # 7-bit activations: one int8 call per layer on x86 CPUs without VNNI (docs/x86.md)
    "x86_reduce_range": get_default_qconfig("x86", reduce_range=True),
    "dynamic_reduce_range": get_default_dynamic_qconfig(reduce_range=True),
    "per_tensor_dynamic_reduce_range": get_default_dynamic_qconfig(per_token=False, reduce_range=True),
    "per_token_dynamic_reduce_range": get_default_dynamic_qconfig(per_token=True, reduce_range=True),
    "embedding": embedding_qconfig,  # weight-only: either --mode
    "embedding_4bit": embedding_4bit_qconfig,
}


class CliError(Exception):
    """A message for the user and the exit code that goes with it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------- progress


def progress_bar(enabled: bool) -> Callable[[Iterable[Any], str], Iterable[Any]]:
    """A progress wrapper writing to stderr: tqdm where installed, else a one-line counter."""

    def wrap(items: Iterable[Any], desc: str) -> Iterable[Any]:
        if not enabled:
            return items
        try:
            from tqdm import tqdm
        except ImportError:
            return _counter(items, desc)
        return tqdm(items, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)

    return wrap


def _counter(items: Iterable[Any], desc: str) -> Iterator[Any]:
    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    for i, item in enumerate(items, start=1):
        sys.stderr.write(f"\r{desc}: {i}" + (f"/{total}" if total else ""))
        sys.stderr.flush()
        yield item
    sys.stderr.write("\n")


# ---------------------------------------------------------------------------- loading


def _import_attr(spec: str, what: str) -> Any:
    """``package.module:attr`` -> the attribute; the working directory is importable."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(f"graphquant: {what} {spec!r} is not a file, and not a 'package.module:name' spec", EXIT_LOAD)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any import failure is the user's module's
        raise CliError(f"graphquant: cannot import {module_name!r} for {what} {spec!r}: {error}", EXIT_LOAD) from error
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"graphquant: {module_name!r} has no attribute {attr!r} ({what} {spec!r})", EXIT_LOAD)
        obj = getattr(obj, part)
    return obj


def load_model(spec: str) -> Model:
    """The model a spec names: an ``nn.Module`` in eval mode (post-training quantization), a
    TorchScript module, or a float ``ExportedProgram`` from a ``.pt2`` file."""
    path = Path(spec)
    if path.is_file():
        model: Model = _load_pt2(path) if path.suffix == ".pt2" else _load_torchscript(path)
    else:
        obj = _import_attr(spec, "model")
        if callable(obj) and not isinstance(obj, nn.Module):
            try:
                obj = obj()
            except Exception as error:  # noqa: BLE001
                raise CliError(f"graphquant: model factory {spec!r} failed: {error}", EXIT_LOAD) from error
        if not isinstance(obj, (nn.Module, ExportedProgram)):
            raise CliError(f"graphquant: model {spec!r} is a {type(obj).__name__}, not a torch.nn.Module", EXIT_LOAD)
        model = obj
    return model.eval() if isinstance(model, nn.Module) else model


def runnable(model: Model) -> nn.Module:
    """Something to call: the module itself, or a program's ``module()``."""
    return model.module() if isinstance(model, ExportedProgram) else model


def _load_pt2(path: Path) -> ExportedProgram:
    """A float program (``torch.export.save``); a program graphquant.save wrote is refused by
    ``capture.load_program`` with a message pointing at ``graphquant.load``."""
    load_program = getattr(capture_module, "load_program", None)
    if load_program is None:
        raise CliError(
            f"graphquant: cannot load {path}: .pt2 input needs graphquant.capture.load_program, which this "
            "installation does not have yet. Give the model as 'package.module:factory' instead",
            EXIT_LOAD,
        )
    try:
        program = load_program(path)
    except Exception as error:  # noqa: BLE001 - GraphQuantError with the reason, or torch's own
        raise CliError(str(error) if isinstance(error, GraphQuantError) else f"graphquant: cannot load {path}: {error}",
                       EXIT_LOAD) from error
    if not isinstance(program, ExportedProgram):
        raise CliError(f"graphquant: {path} loaded as a {type(program).__name__}, not a program", EXIT_LOAD)
    return program


def _load_torchscript(path: Path) -> nn.Module:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # noqa: BLE001
        raise CliError(
            f"graphquant: cannot load {path} as a TorchScript model ({str(error).splitlines()[0]}). A model file must "
            "be TorchScript (torch.jit.save) or a .pt2 program; or give 'package.module:factory'",
            EXIT_LOAD,
        ) from error


def load_batches(spec: str) -> list[Batch]:
    """Batches from a ``.pt`` file or a ``package.module:function`` spec; each a tuple of inputs."""
    path = Path(spec)
    if path.is_file():
        try:
            obj: Any = torch.load(str(path), map_location="cpu")
        except Exception as error:  # noqa: BLE001
            raise CliError(f"graphquant: cannot load data file {path}: {error}", EXIT_LOAD) from error
    else:
        obj = _import_attr(spec, "data")
        if callable(obj):
            try:
                obj = obj()
            except Exception as error:  # noqa: BLE001
                raise CliError(f"graphquant: data function {spec!r} failed: {error}", EXIT_LOAD) from error
    if isinstance(obj, torch.Tensor):
        obj = [obj]
    if not isinstance(obj, Iterable) or isinstance(obj, (str, bytes, dict)):
        raise CliError(
            f"graphquant: data {spec!r} is a {type(obj).__name__}; give an iterable of batches (tensors or tuples "
            "of model inputs)",
            EXIT_LOAD,
        )
    batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in obj]
    if not batches:
        raise CliError(f"graphquant: data {spec!r} holds no batches", EXIT_LOAD)
    if not all(isinstance(x, torch.Tensor) for b in batches for x in b):
        raise CliError(f"graphquant: data {spec!r}: every batch must be a tensor or a tuple of tensors", EXIT_LOAD)
    return batches


def _qconfig_value(key: str, value: Any, source: str) -> QConfig | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value not in PRESETS:
            raise CliError(f"graphquant: {source}: {key!r}: unknown preset {value!r}; use one of {sorted(PRESETS)}",
                           EXIT_USAGE)
        return PRESETS[value]
    if isinstance(value, dict):
        try:
            return QConfig.from_dict(value)
        except (GraphQuantError, KeyError, TypeError) as error:
            raise CliError(f"graphquant: {source}: {key!r} is not a QConfig dict: {error}", EXIT_USAGE) from error
    raise CliError(f"graphquant: {source}: {key!r} must be a QConfig dict, a preset name or null", EXIT_USAGE)


def build_qconfig_dict(args: argparse.Namespace, model: Model) -> dict[str, QConfig | None]:
    """``--qconfig FILE.json`` (or the mode's default for the whole model), then ``--skip`` keys,
    checked against the model's module paths."""
    dynamic = args.mode == "dynamic"
    if args.qconfig:
        try:
            raw = json.loads(Path(args.qconfig).read_text())
        except (OSError, ValueError) as error:
            raise CliError(f"graphquant: cannot read --qconfig {args.qconfig}: {error}", EXIT_USAGE) from error
        if not isinstance(raw, dict):
            raise CliError(f"graphquant: --qconfig {args.qconfig} must map module paths to qconfigs", EXIT_USAGE)
        qconfig_dict = {str(k): _qconfig_value(str(k), v, args.qconfig) for k, v in raw.items()}
    else:
        qconfig_dict = {"": default_dynamic_qconfig if dynamic else get_default_qconfig("x86")}
    for path in args.skip or []:
        qconfig_dict[path] = None
    try:
        module_tree = getattr(capture_module, "module_tree", None)  # a program's paths as modules
        checked = check_qconfig_dict(qconfig_dict, module_tree(model) if module_tree else runnable(model))
    except GraphQuantError as error:
        raise CliError(str(error), EXIT_USAGE) from error
    for key, qconfig in checked.items():
        if qconfig is not None and not qconfig.is_weight_only and qconfig.is_dynamic != dynamic:
            raise CliError(
                f"graphquant: qconfig {key!r} is {'dynamic' if qconfig.is_dynamic else 'static'} but --mode is "
                f"{args.mode}; pass --mode {'dynamic' if qconfig.is_dynamic else 'static'}",
                EXIT_USAGE,
            )
    return checked


def _captured(run: Callable[[], Any], model: Model, spec: str) -> Any:
    """Run a step that captures the model or runs it on the data: a failure is exit code 3
    (the qconfig was checked before, so what is left is the model or the data)."""
    try:
        return run()
    except GraphQuantError as error:
        if isinstance(model, torch.jit.ScriptModule):
            raise CliError(f"graphquant: cannot capture the TorchScript model {spec}: {error}", EXIT_LOAD) from error
        raise CliError(str(error), EXIT_LOAD) from error
    except Exception as error:  # noqa: BLE001 - export and the model's own forward raise anything
        what = "TorchScript model" if isinstance(model, torch.jit.ScriptModule) else "model"
        raise CliError(f"graphquant: cannot run the {what} {spec} on the data: {type(error).__name__}: "
                       f"{str(error).splitlines()[0] if str(error) else ''}", EXIT_LOAD) from error


def _quantize(args: argparse.Namespace, model: Model, batches: list[Batch], sharded: bool = False) -> fx.GraphModule:
    """prepare, calibrate, convert; ``sharded``: this process is one rank of a torch.distributed
    group, which calibrates on its round-robin share of ``batches`` and merges the observers."""
    qconfig_dict = build_qconfig_dict(args, model)
    bar = progress_bar(not args.quiet)
    if args.mode == "dynamic":
        prepared = _captured(lambda: api.prepare_dynamic(model, qconfig_dict, batches[0]), model, args.model)
    elif sharded:
        prepared = _captured(lambda: api.prepare(model, qconfig_dict, batches[0]), model, args.model)
        share = distributed.local_shard(batches)
        _captured(lambda: distributed.calibrate(prepared, bar(share, "calibrating")), model, args.model)
    else:
        prepared = _captured(lambda: api.prepare(model, qconfig_dict, batches[0]), model, args.model)
        _captured(lambda: api.calibrate(prepared, bar(batches, "calibrating")), model, args.model)
    # inplace: the prepared model is not used again, and convert's copy would drop what save needs
    return api.convert(prepared, inplace=True, backend=args.backend)


def _output_sqnr(model: Model, quantized: nn.Module, batch: Batch) -> float:
    """SQNR of all floating outputs of ``quantized`` against ``model`` on one batch."""
    with torch.no_grad():
        return output_sqnr(runnable(model)(*batch), quantized(*batch))


def _db(value: float) -> str:
    return "inf" if value == float("inf") else f"{value:.1f}"


# ---------------------------------------------------------------------------- verbs


def cmd_quantize(args: argparse.Namespace) -> int:
    from graphquant.deploy.archive import save
    from graphquant.deploy.program import check_writable

    if args.out:  # say so before the work, not after
        check_writable(args.out)
    # under torchrun: one rank of a group that shards the calibration batches; rank 0 reports and saves
    sharded = distributed.init_from_env(timeout_s=args.dist_timeout)
    try:
        rank = torch.distributed.get_rank() if sharded else 0
        model = load_model(args.model)
        batches = load_batches(args.data)
        quantized = _quantize(args, model, batches, sharded)
        if rank != 0:
            return EXIT_OK
        if sharded and args.mode != "dynamic":
            world = torch.distributed.get_world_size()
            print(f"calibrated on {world} processes (torch.distributed): {len(batches)} batches, about "
                  f"{-(-len(batches) // world)} per process, observers merged")
        print(graphquant.report(quantized))
        print(f"int8 vs float SQNR on the first batch: {_db(_output_sqnr(model, quantized, batches[0]))} dB")
        if args.out:
            try:
                save(quantized, args.out)
            except Exception as error:  # noqa: BLE001
                raise CliError(f"graphquant: cannot save to {args.out}: {error}", EXIT_FAILED) from error
            print(f"wrote {args.out}")
        return EXIT_OK
    finally:
        if sharded:
            torch.distributed.destroy_process_group()


def cmd_tune(args: argparse.Namespace) -> int:
    from graphquant.deploy.archive import save
    from graphquant.deploy.program import check_writable
    from graphquant.tools.accuracy import quantize_with_accuracy_control

    if args.mode == "dynamic":
        raise CliError("graphquant: tune quantizes statically (it calibrates); drop --mode dynamic", EXIT_USAGE)
    if args.out:
        check_writable(args.out)
    model = load_model(args.model)
    if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        raise CliError(f"graphquant: tune takes an nn.Module spec, not {args.model}", EXIT_USAGE)
    batches = load_batches(args.data)
    eval_fn = _import_attr(args.eval, "--eval function")
    if not callable(eval_fn):
        raise CliError(f"graphquant: --eval {args.eval!r} is not a function", EXIT_USAGE)
    qconfig_dict = build_qconfig_dict(args, model)
    quantized, report = _captured(
        lambda: quantize_with_accuracy_control(model, qconfig_dict, lambda m, bs: [m(*b) for b in bs], [batches],
                                               eval_fn, args.max_drop, example_inputs=batches[0],
                                               time_budget_s=args.budget, backend=args.backend,
                                               progress=not args.quiet),
        model, args.model,
    )
    print(report)
    if args.out:
        save(quantized, args.out)
        print(f"wrote {args.out}")
    return EXIT_OK if report.met else EXIT_CHECK_FAILED


def cmd_check(args: argparse.Namespace) -> int:
    from graphquant.testing import check_graph_mode_op

    model = load_model(args.model)
    batches = load_batches(args.data)
    dynamic = args.mode == "dynamic"
    result = _captured(
        lambda: check_graph_mode_op(runnable(model), batches, args.op or "", tracing=True, check=False, dynamic=dynamic,
                                    backend=args.backend),
        model, args.model,
    )
    kernels = sorted({n.meta[MATCH].pattern.kernel for n in result.quantized.graph.nodes if MATCH in n.meta})
    ops = str(result.quantized.graph)  # the ops (the forward calls kernels directly)
    failures = []
    if args.op and args.op.replace("::", ".") not in ops:
        failures.append(f"kernel {args.op} is not in the int8 graph (it has: {', '.join(kernels) or 'none'})")
    if not kernels:
        failures.append("nothing was quantized")
    if result.max_step_diff > 1.0 + 1e-4:
        failures.append(f"kernel and reference outputs differ by {result.max_step_diff:.3f} steps (more than one)")
    if args.min_sqnr is not None and result.sqnr < args.min_sqnr:
        failures.append(f"int8 vs float SQNR {_db(result.sqnr)} dB is below --min-sqnr {args.min_sqnr:g}")
    print(f"kernels: {', '.join(kernels) or 'none'}")
    print(f"kernel vs reference: {result.max_step_diff:.3f} steps of the output scale (at most 1 allowed)")
    print(f"SQNR against float: int8 {_db(result.sqnr)} dB, reference {_db(result.reference_sqnr)} dB")
    if failures:
        for failure in failures:
            print(f"FAIL: {failure}")
        return EXIT_CHECK_FAILED
    print("PASS")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from graphquant.tools.numerics import compare, qconfig_dict_to_json

    model = load_model(args.model)
    batches = load_batches(args.data)
    inputs = load_batches(args.inputs) if args.inputs else None
    eval_fn = _import_attr(args.eval, "--eval function") if args.eval else None
    if eval_fn is not None and not callable(eval_fn):
        raise CliError(f"graphquant: --eval {args.eval!r} is not a function", EXIT_USAGE)
    qconfig_dict = build_qconfig_dict(args, model)
    dynamic = args.mode == "dynamic"
    report = _captured(
        lambda: compare(model, qconfig_dict, None if dynamic else batches, inputs or batches, eval_fn=eval_fn,
                        dynamic=dynamic, backend=args.backend, min_sqnr_db=args.min_sqnr, max_layers=args.max_layers,
                        progress=progress_bar(not args.quiet)),
        model, args.model,
    )
    print(report)
    if args.report:
        report.to_html(args.report)
        print(f"wrote {args.report}")
    if args.suggest_out:
        Path(args.suggest_out).write_text(json.dumps(qconfig_dict_to_json(report.suggested_qconfig_dict), indent=2))
        print(f"wrote {args.suggest_out} (use it with --qconfig)")
    return EXIT_CHECK_FAILED if report.lowering_suspects else EXIT_OK


_BOOKKEEPING = {operator.getitem, torch.ops.aten.sym_size.int}


def cmd_explain(args: argparse.Namespace) -> int:
    from graphquant.kernels import x86
    from graphquant.passes.lower import activation_bits, depthwise_conv, float_reason

    model = load_model(args.model)
    batches = load_batches(args.data)
    qconfig_dict = build_qconfig_dict(args, model)
    prepare = api.prepare_dynamic if args.mode == "dynamic" else api.prepare
    prepared = _captured(lambda: prepare(model, qconfig_dict, batches[0]), model, args.model)
    gm = prepared.graph_module
    assert gm is not None
    rows = [["node", "op", "module", "key", "qconfig", "result"]]
    used: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target in _BOOKKEEPING:
            continue
        path = module_path(node)
        resolved = node_qconfig(node)
        if resolved.key is not None:
            used.add(resolved.key)
        match = node.meta.get(MATCH)
        if match is not None:
            result = f"int8: {match.pattern.name} -> {match.pattern.kernel}"
            bits = activation_bits(gm, match) if api.default_backend() == "onednn" else None
            if bits is not None:  # the x86 path it takes on this CPU (kernels/x86.py)
                result += f" [{x86.cpu_path(127 if bits <= 7 else 255, depthwise_conv(gm, node))}]"
        else:
            result = "float: " + (str(node.meta[FLOAT_REASON]) if FLOAT_REASON in node.meta
                                  else float_reason(node))
        key = "(none)" if resolved.key is None else repr(resolved.key)
        qconfig = resolved.qconfig
        kind = "None" if qconfig is None else (
            "weight-only" if qconfig.is_weight_only else "dynamic" if qconfig.is_dynamic else "static")
        rows.append([node.name, str(node.target), path or "<model>", key, kind, result])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    unused = [k for k in qconfig_dict if k not in used]
    if unused:
        print("keys that matched nothing: " + ", ".join(
            f"{k!r} (no node runs in {k or 'the model'}, or more specific keys cover all of its nodes)"
            for k in unused))
    else:
        print("keys that matched nothing: none")
    if args.time:
        _explain_speed(args, model, batches, qconfig_dict)
    return EXIT_OK


def _explain_speed(args: argparse.Namespace, model: Model, batches: list[Batch], qconfig_dict: dict[str, Any]) -> None:
    """``explain --time``: each int8 GEMM / conv kernel against float32 on this CPU, and the
    ``--skip`` options (or a ``--suggest-out`` file) that keep the losing layers float."""
    from graphquant.tools.kernel_timing import time_kernels
    from graphquant.tools.numerics import qconfig_dict_to_json

    quantized = _quantize(args, model, batches)
    timings = time_kernels(quantized, batches[0], rounds=args.rounds)
    slower = [t for t in timings if t.slower_than_float]
    print(f"int8 kernels against float32 on this CPU, {torch.get_num_threads()} threads, median of {args.rounds} "
          f"interleaved calls: {len(slower)} of {len(timings)} slower than float32")
    for timing in timings:
        print("  " + str(timing))
    paths = sorted({t.module_path for t in slower if t.module_path})
    if not paths:
        print("every int8 kernel beats float32 here" if not slower else
              "the slower kernels are called by the model itself (no submodule to keep float)")
        return
    print("keep them float on this CPU (each keeps its whole module float): " +
          " ".join(f"--skip {path}" for path in paths))
    if args.suggest_out:
        suggested = {**qconfig_dict, **{path: None for path in paths}}
        Path(args.suggest_out).write_text(json.dumps(qconfig_dict_to_json(suggested), indent=2))
        print(f"wrote {args.suggest_out} (use it with --qconfig)")


def _state_bytes(model: nn.Module) -> int:
    """Bytes of the saved state: parameters and buffers (packed oneDNN weights are rebuilt, not saved)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def _time(model: nn.Module, batch: Batch) -> float:
    start = time.perf_counter()
    model(*batch)
    return time.perf_counter() - start


def cmd_bench(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    batches = load_batches(args.data)
    quantized = _quantize(args, model, batches)
    batch = batches[0]
    times: dict[str, list[float]] = {"float": [], "int8": []}
    models = {"float": runnable(model), "int8": quantized}
    bar = progress_bar(not args.quiet)
    with torch.no_grad():
        for _ in range(args.warmup):
            _time(models["float"], batch), _time(quantized, batch)
        for i in bar(range(args.iters), "timing"):
            order = ("float", "int8") if i % 2 == 0 else ("int8", "float")  # interleaved, alternating who goes first
            for name in order:
                times[name].append(_time(models[name], batch))
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    size = {"float": _state_bytes(models["float"]), "int8": _state_bytes(quantized)}
    shape = "x".join(str(d) for d in batch[0].shape)
    print(f"bench: {args.model} ({args.mode}, batch {shape}, {torch.get_num_threads()} threads, "
          f"median of {args.iters} interleaved runs)")
    print(f"{'':12s}{'float':>12s}{'int8':>12s}")
    print(f"{'latency ms':12s}{ms['float']:12.3f}{ms['int8']:12.3f}   speedup {ms['float'] / ms['int8']:.2f}x")
    print(f"{'size MB':12s}{size['float'] / 1e6:12.3f}{size['int8'] / 1e6:12.3f}   "
          f"{size['float'] / max(size['int8'], 1):.2f}x smaller")
    return EXIT_OK


# ---------------------------------------------------------------------------- parser

_EPILOG = """\
examples:
  graphquant quantize mypkg.models:resnet18 --data mypkg.data:calibration --out resnet18_int8.pt2
  graphquant quantize model.ts --data calib.pt --skip fc --qconfig qconfig.json
  graphquant quantize mypkg.models:bert --data mypkg.data:sentences --mode dynamic
  graphquant check mypkg.models:block --data calib.pt --op qconv2d
  graphquant compare mypkg.models:resnet18 --data calib.pt --report numerics.html --suggest-out keep_float.json
  graphquant explain mypkg.models:resnet18 --data calib.pt --qconfig qconfig.json
  graphquant bench mypkg.models:resnet18 --data calib.pt --iters 50

model: 'package.module:factory' (an nn.Module or a function returning one; the current
directory is importable), a TorchScript file (torch.jit.save), or a .pt2 file.
data: 'package.module:function' returning an iterable of batches, or a .pt file holding a
tensor or a list of tensors (or of tuples of tensors); a batch is the model's inputs.
--qconfig FILE.json maps module paths to a QConfig dict (QConfig.to_dict()), a preset
name (x86, portable, dynamic, per_channel_dynamic, per_token_dynamic, float16_dynamic; for
x86 CPUs without VNNI x86_reduce_range, dynamic_reduce_range, per_token_dynamic_reduce_range)
or null (keep float); "" is the whole model, the most specific key wins.

exit codes: 0 ok; 1 check failed (kernel missing, or kernel vs reference > 1 step);
2 usage error; 3 model or data could not be loaded (or the model not captured);
4 graphquant failed on a loaded model (conversion or saving).
"""


def _common(data_help: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("model", help="package.module:factory, a TorchScript file, or a .pt2 file")
    p.add_argument("--data", "--calib", dest="data", required=True, metavar="DATA", help=data_help)
    p.add_argument("--mode", choices=("static", "dynamic"), default="static", help="static (default) or dynamic")
    p.add_argument("--backend", choices=api.BACKENDS, default=None,
                   help="int8 kernels (default: onednn where available)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="show PyTorch's warnings and full tracebacks")
    return p


def _qconfig_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--qconfig", metavar="FILE.json", help="module path -> QConfig dict, preset name, or null")
    p.add_argument("--skip", action="append", default=[], metavar="MODULE_PATH",
                   help="keep this module float (repeatable; the same as MODULE_PATH: null)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphquant",
        description="Graph-mode post-training int8 quantization for PyTorch (torch.export + oneDNN int8 kernels).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"graphquant {_version()}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    calib = "calibration data: package.module:function or a .pt file (dynamic mode: the first batch is the example)"
    fmt = argparse.RawDescriptionHelpFormatter

    def verb(name: str, help_: str, epilog: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return verbs.add_parser(name, help=help_, description=help_, epilog="example:\n  " + epilog,
                                parents=list(parents), formatter_class=fmt)

    p = verb("quantize", "quantize a model and report what became int8",
             "graphquant quantize mypkg.models:net --data mypkg.data:calibration --skip head --out net_int8.pt2",
             _common(calib), _qconfig_options())
    p.add_argument("--out", metavar="FILE", help="save the quantized model here (graphquant.save)")
    p.add_argument("--dist-timeout", type=float, default=600.0, metavar="S",
                   help="under torchrun: seconds a rank waits for the others before failing (default 600)")
    p.set_defaults(run=cmd_quantize)

    p = verb("tune", "quantize under an accuracy budget: layers back to float, most harmful first, until the "
             "--eval metric drops by at most --max-drop (exit 1 if it cannot)",
             "graphquant tune mypkg.models:net --data calib.pt --eval mypkg.evaluate:accuracy --max-drop 0.01 "
             "--out net_int8.pt2", _common(calib), _qconfig_options())
    p.add_argument("--eval", required=True, metavar="MODULE:FUNCTION", help="eval_fn(model) -> float, higher is better")
    p.add_argument("--max-drop", type=float, required=True, metavar="X", help="the largest drop of --eval allowed")
    p.add_argument("--budget", type=float, default=None, metavar="S", help="stop after this many seconds")
    p.add_argument("--out", metavar="FILE", help="save the chosen model here (graphquant.save)")
    p.set_defaults(run=cmd_tune)

    p = verb("check", "run the check_graph_mode_op harness on your module: int8 kernel vs reference within one step",
             "graphquant check mypkg.models:block --data calib.pt --op qconv2d", _common(calib))
    p.add_argument("--op", help="kernel that must be in the int8 graph, e.g. qconv2d or graphquant::qlinear")
    p.add_argument("--min-sqnr", type=float, default=None, metavar="DB", help="also fail below this SQNR")
    p.set_defaults(run=cmd_check)

    p = verb("compare", "layer-by-layer numerics: float vs reference vs int8 kernel, worst layer first",
             "graphquant compare mypkg.models:net --data calib.pt --report numerics.html --suggest-out keep.json",
             _common(calib), _qconfig_options())
    p.add_argument("--inputs", metavar="DATA", help="compare on these batches (default: the calibration data)")
    p.add_argument("--report", metavar="FILE.html", help="write the HTML report (table and SQNR plot)")
    p.add_argument("--suggest-out", metavar="FILE.json", help="write the suggested qconfig_dict (a --qconfig file)")
    p.add_argument("--eval", metavar="MODULE:FUNCTION", help="eval_fn(model) -> float, higher is better")
    p.add_argument("--min-sqnr", type=float, default=20.0, metavar="DB",
                   help="suggest keeping float the layers below this layer SQNR (default 20)")
    p.add_argument("--max-layers", type=int, default=5, metavar="N", help="suggest at most N layers (default 5)")
    p.set_defaults(run=cmd_compare)

    p = verb("explain", "which qconfig_dict key applies to each node, and the keys that matched nothing",
             "graphquant explain mypkg.models:net --data calib.pt --qconfig qconfig.json --skip head",
             _common(calib), _qconfig_options())
    p.add_argument("--time", action="store_true",
                   help="also quantize and time each int8 GEMM / conv kernel against float32 on this CPU, and "
                        "name the layers to keep float where int8 loses")
    p.add_argument("--rounds", type=int, default=20, help="timed calls of each kernel with --time (default 20)")
    p.add_argument("--suggest-out", metavar="FILE.json",
                   help="with --time: write the qconfig_dict that keeps the losing layers float")
    p.set_defaults(run=cmd_explain)

    p = verb("bench", "int8 vs float latency (interleaved runs) and size",
             "graphquant bench mypkg.models:net --data calib.pt --iters 50 --threads 2",
             _common(calib), _qconfig_options())
    p.add_argument("--iters", type=int, default=20, help="timed runs of each model (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.set_defaults(run=cmd_bench)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("graphquant")
    except Exception:  # noqa: BLE001 - not installed: running from a checkout
        return "dev"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``graphquant`` command; returns the exit code."""
    args = build_parser().parse_args(argv)  # usage errors exit 2 here
    if not args.verbose:
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
    try:
        return int(args.run(args))
    except CliError as error:
        if args.verbose:
            raise
        print(error, file=sys.stderr)
        return error.code
    except GraphQuantError as error:
        if args.verbose:
            raise
        print(error, file=sys.stderr)
        return EXIT_FAILED


__all__ = ["EXIT_CHECK_FAILED", "EXIT_FAILED", "EXIT_LOAD", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]
