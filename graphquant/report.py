"""What convert did to each node: quantized by which pattern and kernel, or left float and why."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from graphquant.kernels import x86

_PATHS = {
    "vnni": "one int8 call (VNNI: exact)",
    "int8-dw": "one int8 call (a depthwise conv: oneDNN's depthwise kernel does not saturate here)",
    "7-bit": "one int8 call (7-bit activations: exact without VNNI)",
    "avx2-fp32": "float32 GEMM over the int8 values (8-bit activations, no VNNI here: exact)",
}


@dataclass(frozen=True)
class NodeReport:
    """One node of the float graph after conversion."""

    node: str
    op: str
    module_path: str
    quantized: bool
    reason: str = ""
    pattern: str = ""
    kernel: str = ""
    qconfig_key: str | None = None
    scale: float | None = None
    zero_point: int | None = None
    # oneDNN GEMM / conv only: 7 (reduce_range) or 8, the activation's calibrated grid
    activation_bits: int | None = None
    depthwise: bool = False  # a depthwise conv: oneDNN runs it with a kernel of its own
    # 7 bits chosen for this CPU (reduce_range="auto"): the SQNR its input lost against 8 bits, estimated
    # from the calibration histogram (None: not estimated, or not chosen so)
    bits_cost_db: float | None = None

    @property
    def cpu_path(self) -> str:
        """The path this layer takes on this process's CPU (kernels.x86.cpu_path), or "" where the
        CPU does not matter (portable kernels, ops other than oneDNN's GEMM and conv)."""
        if self.activation_bits is None or not self.quantized:
            return ""
        return x86.cpu_path(127 if self.activation_bits <= 7 else 255, self.depthwise)


@dataclass(frozen=True)
class KernelTiming:
    """One int8 GEMM / conv kernel call against its float32 op, on this CPU."""

    node: str  # the float graph's node the kernel replaced (the report's node), else the kernel node
    module_path: str
    kernel: str
    cpu_path: str  # kernels.x86.cpu_path for oneDNN kernels ("" for portable ones)
    int8_ms: float
    float_ms: float

    @property
    def speedup(self) -> float:
        """float32 time / int8 time: above 1 the int8 kernel is faster."""
        return self.float_ms / self.int8_ms if self.int8_ms > 0 else float("inf")

    @property
    def slower_than_float(self) -> bool:
        return self.int8_ms > self.float_ms

    def __str__(self) -> str:
        where = self.module_path or "<model>"
        path = f" [{self.cpu_path}]" if self.cpu_path else ""
        verdict = "  slower than float32 here: keep it float" if self.slower_than_float else ""
        return (f"{where:30s} {self.kernel:18s}{path:12s} int8 {self.int8_ms:7.3f} ms  float32 {self.float_ms:7.3f} ms"
                f"  {self.speedup:5.2f}x{verdict}")


@dataclass(frozen=True)
class EagerPart:
    """A module left to run eager: its path and why export could not capture it."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path or '<model>'}: {self.reason}"


@dataclass
class RegionReport:
    """A captured and quantized region: its path, its int8 kernels, its SQNR on the example."""

    path: str
    int8_nodes: int
    float_nodes: int
    sqnr_db: float | None = None

    def __str__(self) -> str:
        sqnr = "" if self.sqnr_db is None else f", SQNR {self.sqnr_db:.1f} dB on the example input"
        return f"{self.path}: {self.int8_nodes} int8, {self.float_nodes} float nodes{sqnr}"


@dataclass(frozen=True)
class Smoothing:
    """SmoothQuant on one value read by static linears (graphquant.passes.smooth): applied with
    ``alpha`` (factors from ``smallest`` to ``largest``; ``1 / s`` folded into the op ``folded``, or
    multiplied at run time where empty), or not (``alpha`` None) and why."""

    value: str
    linears: tuple[str, ...]
    alpha: float | None
    reason: str = ""
    smallest: float | None = None
    largest: float | None = None
    folded: str = ""

    def __str__(self) -> str:
        linears = ", ".join(p or "<model>" for p in self.linears)
        if self.alpha is None:
            return f"{self.value} -> {linears}: not smoothed: {self.reason}"
        where = f"folded into {self.folded}" if self.folded else "one multiply before the quantize"
        return (f"{self.value} -> {linears}: alpha {self.alpha:g}, factors "
                f"{self.smallest:.3g}..{self.largest:.3g}, {where}")


@dataclass(frozen=True)
class BiasCorrection:
    """Bias correction of one conv or linear (graphquant.passes.bias_correction): the largest shift
    taken off its bias, or not corrected (``shift`` None) and why."""

    layer: str
    shift: float | None
    reason: str = ""

    def __str__(self) -> str:
        if self.shift is None:
            return f"{self.layer or '<model>'}: not corrected: {self.reason}"
        return f"{self.layer or '<model>'}: bias shifted by up to {self.shift:.3g}"


def smoothing_lines(saved: list[dict[str, Any]]) -> list[Smoothing]:
    """:class:`Smoothing` lines from their saved dicts (JSON turns the linears into a list)."""
    return [Smoothing(**{**line, "linears": tuple(line["linears"])}) for line in saved]


def bias_lines(saved: list[dict[str, Any]]) -> list[BiasCorrection]:
    """:class:`BiasCorrection` lines from their saved dicts."""
    return [BiasCorrection(**line) for line in saved]


@dataclass
class ConversionReport:
    """Every compute node of the converted graph, quantized or float."""

    mode: str
    backend: str
    nodes: list[NodeReport] = field(default_factory=list)
    # filled by graphquant.time_kernels: each int8 GEMM / conv against its float32 op, on this CPU
    timings: list[KernelTiming] = field(default_factory=list)
    # partial graph mode (graphquant.partial): the quantized regions and the parts left eager
    regions: list[RegionReport] = field(default_factory=list)
    eager: list[EagerPart] = field(default_factory=list)
    # SmoothQuant: one line per value read by smoothed linears (graphquant.passes.smooth)
    smoothing: list[Smoothing] = field(default_factory=list)
    # bias correction: one line per conv or linear whose qconfig asks for it
    bias_correction: list[BiasCorrection] = field(default_factory=list)

    @property
    def quantized(self) -> list[NodeReport]:
        return [n for n in self.nodes if n.quantized]

    @property
    def float_nodes(self) -> list[NodeReport]:
        return [n for n in self.nodes if not n.quantized]

    def to_dict(self) -> dict[str, Any]:
        out = {"mode": self.mode, "backend": self.backend, "nodes": [asdict(n) for n in self.nodes]}
        if self.timings:
            out["timings"] = [asdict(t) for t in self.timings]
        if self.smoothing:
            out["smoothing"] = [asdict(s) for s in self.smoothing]
        if self.bias_correction:
            out["bias_correction"] = [asdict(b) for b in self.bias_correction]
        if self.regions or self.eager:
            out["regions"] = [asdict(r) for r in self.regions]
            out["eager"] = [asdict(p) for p in self.eager]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def __str__(self) -> str:
        lines = [f"graphquant conversion ({self.mode}, {self.backend}): "
                 f"{len(self.quantized)} quantized, {len(self.float_nodes)} float"]
        if self.regions or self.eager:
            lines.append(f"  partial graph mode: {len(self.regions)} regions quantized, {len(self.eager)} parts eager")
            lines.extend(f"  region {r}" for r in self.regions)
            lines.extend(f"  eager  {p}" for p in self.eager)
        if self.smoothing:
            lines.append(f"  SmoothQuant: {sum(s.alpha is not None for s in self.smoothing)} of "
                         f"{len(self.smoothing)} inputs smoothed")
            lines.extend(f"    {s}" for s in self.smoothing)
        if self.bias_correction:
            lines.append(f"  bias correction: {sum(b.shift is not None for b in self.bias_correction)} of "
                         f"{len(self.bias_correction)} layers corrected")
            lines.extend(f"    {b}" for b in self.bias_correction)
        kernels = self.mode == "kernel" and self.backend == "onednn"
        paths = sorted({n.cpu_path for n in self.nodes if n.cpu_path}) if kernels else []
        if paths:
            lines.append("  x86 CPU path: " + "; ".join(f"[{p}] {_PATHS[p]}" for p in paths))
        for n in self.nodes:
            where = n.module_path or "<model>"
            if n.quantized:
                path = f"  [{n.cpu_path}]" if kernels and n.cpu_path else ""
                if kernels and n.bits_cost_db is not None:
                    path += f" (7 bits on this CPU: its input {n.bits_cost_db:.1f} dB below 8 bits)"
                lines.append(f"  int8   {where:30s} {n.op:28s} {n.pattern} -> {n.kernel}{path}")
            else:
                lines.append(f"  float  {where:30s} {n.op:28s} {n.reason}")
        if self.timings:
            slower = [t for t in self.timings if t.slower_than_float]
            lines.append(f"  int8 kernels against float32 on this CPU (graphquant.time_kernels): {len(slower)} of "
                         f"{len(self.timings)} slower than float32")
            lines.extend("    " + str(t) for t in self.timings)
        return "\n".join(lines)
