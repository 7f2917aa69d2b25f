#!/usr/bin/env python
"""Saved size and load memory of a quantized ResNet-50, against the float model.

ResNet-50 is ``transformers.ResNetModel(transformers.ResNetConfig())`` with random weights
(seeded), its batch-norm statistics set by a few training-mode forward passes, then eval;
the model returns the pooled features. It is quantized statically (x86 qconfig, oneDNN
kernels) on random calibration images, then written three ways: the float model as a
``.pt2`` (``torch.export.save``) and as a ``state_dict`` (``torch.save``), the int8 model as
a ``.pt2`` (``graphquant.save``) and as TorchScript (``graphquant.to_torchscript`` +
``torch.jit.save``).

Each file is then loaded in a fresh Python process that measures its peak resident set
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) right after the imports and right after
the load, and checks the loaded model's output against the in-process quantized model's,
bit for bit. The TorchScript process never imports graphquant.

    .venv/bin/python benchmarks/serialize_size.py            # markdown to stdout
    .venv/bin/python benchmarks/serialize_size.py --write    # also update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
START_MARKER = "<!-- serialize:start -->"
END_MARKER = "<!-- serialize:end -->"
MIB = 1024 * 1024

# Run in a fresh process: peak RSS after imports and after the load, load time, bit-identity.
LOAD_SCRIPT = r"""
import json, resource, sys, time
kind, path, io_path = sys.argv[1:4]
def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
import torch
if kind == "int8_pt2":
    import graphquant as gq
before = peak_mib()
start = time.perf_counter()
if kind == "int8_pt2":
    model = gq.load(path)
elif kind == "int8_torchscript":
    model = torch.jit.load(path)
else:
    model = torch.export.load(path).module()
seconds = time.perf_counter() - start
after = peak_mib()
x, want = torch.load(io_path)
with torch.no_grad():
    got = model(x)
print(json.dumps({"before": before, "after": after, "seconds": seconds,
                  "bit_identical": bool(torch.equal(got, want)) if kind != "float_pt2" else None,
                  "graphquant_imported": "graphquant" in sys.modules}))
"""

# ru_maxrss of a process forked from this one starts at this process's resident size (Linux
# carries the parent's pages' high-water mark over fork and exec), so the measuring process is
# started by a small launcher process instead, whose own size is what it inherits.
LAUNCHER = r"""
import subprocess, sys
proc = subprocess.run([sys.executable, *sys.argv[1:]], capture_output=True, text=True)
sys.stdout.write(proc.stdout)
sys.stderr.write(proc.stderr)
sys.exit(proc.returncode)
"""


class ResNet50Features(nn.Module):
    """transformers' ResNet-50 backbone, returning the pooled features as one tensor."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        self.resnet = transformers.ResNetModel(transformers.ResNetConfig())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.resnet(pixel_values=pixel_values).pooler_output


def make_resnet50(seed: int = 0) -> ResNet50Features:
    """Random weights; batch-norm statistics from four training-mode passes on random images."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ResNet50Features().train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, 64, 64, generator=generator))
    return model.eval()


def _run_load(kind: str, path: Path, io_path: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-c", LAUNCHER, "-c", LOAD_SCRIPT, kind, str(path), str(io_path)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(REPO_ROOT), check=False)
    if proc.returncode != 0:
        raise SystemExit(f"loading {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _resident_weights(model: nn.Module) -> int:
    """Bytes of every tensor a loaded graphquant model holds: buffers, parameters, packed weights."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for name in model.graphquant_record.packed:
        packed = getattr(model, name)
        tensors[id(packed)] = packed
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure(image_size: int, calibration_batches: int, batch: int, workdir: Path) -> dict[str, Any]:
    import graphquant as gq

    model = make_resnet50()
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(batch, 3, image_size, image_size, generator=generator)
                   for _ in range(calibration_batches)]
    x = torch.randn(batch, 3, image_size, image_size, generator=generator)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = gq.quantize(model, {"": gq.get_default_qconfig("x86")}, lambda m, data: [m(b) for b in data],
                                [calibration], example_inputs=(calibration[0],))
    quantize_seconds = time.perf_counter() - start
    with torch.no_grad():
        y_float, y_int8 = model(x), quantized(x)

    files = {
        "float_pt2": workdir / "resnet50_float.pt2",
        "float_state_dict": workdir / "resnet50_float_state_dict.pt",
        "int8_pt2": workdir / "resnet50_int8.pt2",
        "int8_torchscript": workdir / "resnet50_int8.torchscript.pt",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(model, (x,)), files["float_pt2"])
        torch.save(model.state_dict(), files["float_state_dict"])
        gq.save(quantized, files["int8_pt2"])
        torch.jit.save(gq.to_torchscript(quantized), str(files["int8_torchscript"]))
    io_path = workdir / "io.pt"
    torch.save((x, y_int8), io_path)
    # the fixed cost of graphquant.load (torch.export's deserializer and graph): a one-conv program
    tiny = nn.Sequential(nn.Conv2d(3, 8, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_q = gq.quantize(tiny, {"": gq.get_default_qconfig("x86")}, lambda m, data: [m(b) for b in data],
                             [calibration[:1]], example_inputs=(calibration[0],))
    gq.save(tiny_q, workdir / "tiny_int8.pt2")
    with torch.no_grad():
        torch.save((x, tiny_q(x)), workdir / "tiny_io.pt")

    loads = {kind: _run_load(kind, files[kind], io_path) for kind in ("float_pt2", "int8_pt2", "int8_torchscript")}
    loads["tiny_int8_pt2"] = _run_load("int8_pt2", workdir / "tiny_int8.pt2", workdir / "tiny_io.pt")
    report = gq.report(quantized)
    float_weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "sizes": {name: path.stat().st_size for name, path in files.items()},
        "manifest": Path(gq.program.manifest_path(files["int8_pt2"])).stat().st_size,
        "loads": loads,
        "float_weight_bytes": float_weights,
        "int8_resident_bytes": _resident_weights(gq.load(files["int8_pt2"])),
        "quantized_nodes": len(report.quantized),
        "float_nodes": Counter((n.op, n.reason) for n in report.float_nodes),
        "quantize_seconds": quantize_seconds,
        "sqnr": gq.quant_math.sqnr(y_float, y_int8),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def render(result: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    sizes, loads = result["sizes"], result["loads"]
    float_pt2 = sizes["float_pt2"]
    cpu = platform.processor() or platform.machine()
    lines = [
        START_MARKER,
        "## Serialization (`benchmarks/serialize_size.py`)",
        "",
        f"Command: `{command}`",
        "",
        f"Run {datetime.date.today().isoformat()}: torch {torch.__version__}, {cpu}, "
        f"{torch.get_num_threads()} threads. "
        f"ResNet-50 = `transformers.ResNetModel(ResNetConfig())`, random weights ({result['parameters'] / 1e6:.1f} M "
        "parameters), batch-norm statistics from 4 training-mode passes, then eval; returns the pooled features. "
        f"Quantized with `graphquant.quantize` (x86 qconfig, oneDNN kernels) on {args.calibration_batches} random "
        f"batches of {args.batch}x3x{args.image_size}x{args.image_size} in {result['quantize_seconds']:.0f} s; "
        f"SQNR of the int8 features vs float: {result['sqnr']:.1f} dB.",
        "",
        "| file | how | bytes | MiB | vs float `.pt2` |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    rows = [
        ("float `.pt2`", "`torch.export.save`", sizes["float_pt2"]),
        ("float `state_dict`", "`torch.save(model.state_dict())`", sizes["float_state_dict"]),
        ("int8 `.pt2`", "`graphquant.save`", sizes["int8_pt2"]),
        ("int8 TorchScript", "`torch.jit.save(graphquant.to_torchscript(q))`", sizes["int8_torchscript"]),
        ("manifest", "`graphquant.save` (beside the `.pt2`; a copy is inside it)", result["manifest"]),
    ]
    for name, how, size in rows:
        lines.append(f"| {name} | {how} | {size} | {size / MIB:.1f} | {100 * size / float_pt2:.1f}% |")
    lines += [
        "",
        "Loading, each in a fresh process started by a small launcher process (peak RSS from "
        "`resource.getrusage(RUSAGE_SELF).ru_maxrss`, MiB; a process forked straight from the benchmark would "
        "inherit the benchmark's own peak):",
        "",
        "| load | call | peak RSS after imports | peak RSS after load | added by the load | load s | output |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    calls = {
        "float_pt2": ("float `.pt2`", "`torch.export.load(p).module()`"),
        "int8_pt2": ("int8 `.pt2`", "`graphquant.load(p)` (packs for oneDNN)"),
        "int8_torchscript": ("int8 TorchScript", "`torch.jit.load(p)`, graphquant not imported"),
        "tiny_int8_pt2": ("one-conv int8 `.pt2` (fixed cost)", "`graphquant.load(p)`"),
    }
    for kind, (name, call) in calls.items():
        load = loads[kind]
        if load["bit_identical"] is None:
            output = "—"
        else:
            output = "bit-identical to the quantized model" if load["bit_identical"] else "**differs**"
        if kind == "int8_torchscript" and load["graphquant_imported"]:
            output += " (**graphquant was imported**)"
        lines.append(f"| {name} | {call} | {load['before']:.0f} | {load['after']:.0f} | "
                     f"{load['after'] - load['before']:.0f} | {load['seconds']:.1f} | {output} |")
    float_counts = sorted(result["float_nodes"].items())
    float_nodes = ", ".join(f"{op} x{count} ({reason})" for (op, reason), count in float_counts)
    lines += [
        "",
        f"- The int8 `.pt2` is {100 * sizes['int8_pt2'] / float_pt2:.1f}% of the float `.pt2` (target: at most 30%). "
        "It holds int8 conv / linear weights, float32 per-channel scales and biases, no float weights and no "
        "packed oneDNN weights (opaque tensors cannot be saved); `graphquant.load` packs them once.",
        f"- After `graphquant.load` the model holds {result['int8_resident_bytes'] / MIB:.1f} MiB of tensors: the int8 "
        "weights (kept as the state a later `graphquant.save` writes) and their packed copies; the float weights "
        f"({result['float_weight_bytes'] / MIB:.1f} MiB) are never in memory. The load's RSS growth also counts "
        f"torch.export's own deserialization machinery, paid by the float load too: "
        f"{loads['tiny_int8_pt2']['after'] - loads['tiny_int8_pt2']['before']:.0f} MiB for a one-conv program.",
        f"- ResNet-50 quantizes: {result['quantized_nodes']} nodes on int8 kernels; float: {float_nodes or 'none'}.",
        END_MARKER,
    ]
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    """Replace the text between the serialize markers; append the section if they are missing."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start >= 0 and end > start:
        text = text[:start] + body + text[end + len(END_MARKER):]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Saved size and load memory of a quantized ResNet-50.")
    parser.add_argument("--image-size", type=int, default=224, help="calibration / test image side (default 224)")
    parser.add_argument("--calibration-batches", type=int, default=4, help="calibration batches (default 4)")
    parser.add_argument("--batch", type=int, default=2, help="images per batch (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--write", action="store_true", help="replace the serialize section of BENCHMARKS.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = ".venv/bin/python " + " ".join(shlex.quote(a) for a in ["benchmarks/serialize_size.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as workdir:
        result = measure(args.image_size, args.calibration_batches, args.batch, Path(workdir))
    body = render(result, args, command)
    print(body)
    if args.write:
        write_section(REPO_ROOT / "BENCHMARKS.md", body)


if __name__ == "__main__":
    main()
