"""What convert did to each node: quantized by which pattern and kernel, or left float and why."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


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


@dataclass
class ConversionReport:
    """Every compute node of the converted graph, quantized or float."""

    mode: str
    backend: str
    nodes: list[NodeReport] = field(default_factory=list)

    @property
    def quantized(self) -> list[NodeReport]:
        return [n for n in self.nodes if n.quantized]

    @property
    def float_nodes(self) -> list[NodeReport]:
        return [n for n in self.nodes if not n.quantized]

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "backend": self.backend, "nodes": [asdict(n) for n in self.nodes]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def __str__(self) -> str:
        lines = [f"graphquant conversion ({self.mode}, {self.backend}): "
                 f"{len(self.quantized)} quantized, {len(self.float_nodes)} float"]  # fmt: skip
        for n in self.nodes:
            where = n.module_path or "<model>"
            if n.quantized:
                lines.append(f"  int8   {where:30s} {n.op:28s} {n.pattern} -> {n.kernel}")
            else:
                lines.append(f"  float  {where:30s} {n.op:28s} {n.reason}")
        return "\n".join(lines)
