"""Layer-by-layer numerics: float vs reference vs int8 kernel, node by node.

Three graphs of one model run on the same inputs: the float graph (capture + fold_bn),
the reference graph (``convert(debug=True)``: float weights, every rounding simulated)
and the int8 kernel graph. They line up by node name: a match's output node keeps its
name from capture through prepare and convert, and the kernel that replaces it carries
the match in ``meta[MATCH]``.

For every quantized node the report gives

- **layer SQNR**: the error this layer adds on its own. The reference graph runs with
  every quantized value that a match produced replaced by its float value, so each
  layer sees exact inputs; what is left is its weight and output rounding. Measured per
  output channel and summarised by the median channel, so that an outlier channel that
  owns the per-tensor range (and crushes every other channel to a few levels) shows up
  instead of hiding behind its own large power. The ranking and the suggestion use it.
- **reference vs float** and **kernel vs float** SQNR, end to end: each graph runs on its
  own and errors accumulate, as they will in deployment.
- **steps**: the largest kernel-vs-reference difference in steps of the output scale,
  with the kernel fed exactly the reference's integer inputs. A correct lowering stays
  within one step (rounding ties); more is a lowering bug, not quantization error.

``compare`` also suggests a ``qconfig_dict`` that keeps the worst layers float and, given
``eval_fn``, measures what that suggestion gives back.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.utils._pytree import tree_flatten

from graphquant.api import _convert, calibrate, convert, default_backend, prepare, prepare_dynamic
from graphquant.capture import capture
from graphquant.errors import CaptureError, GraphQuantError
from graphquant.graph import MATCH, QPARAMS, Match, matches_of
from graphquant.partial import export_reason
from graphquant.passes.fold_bn import fold_bn
from graphquant.qconfig import QConfig, default_dynamic_qconfig, get_default_qconfig
from graphquant.quant_math import QParams, dequantize
from graphquant.quantized import record_of
from graphquant.report import NodeReport

# A layer whose median output channel keeps less than this is worth keeping float: 8-bit
# per-tensor activations with per-channel weights usually give 30-45 dB per channel.
DEFAULT_MIN_SQNR_DB = 20.0
DEFAULT_MAX_LAYERS = 5
STEP_TOLERANCE = 1.0 + 1e-4  # one step: kernel and reference may round a tie differently

Progress = Callable[[Iterable[Any], str], Iterable[Any]]
EvalFn = Callable[[nn.Module], float]

_Q = torch.ops.graphquant.quantize_per_tensor.default
_DQ = torch.ops.graphquant.dequantize_per_tensor.default


def _no_progress(items: Iterable[Any], desc: str) -> Iterable[Any]:
    return items


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True)
class NodeNumerics:
    """The numbers of one quantized node (one pattern match).

    ``layer_sqnr`` is ``None`` for ops that share their input's scale and zero point
    (reshape, max_pool): they run on the integers unchanged and add no error of their own.
    """

    node: str  # the match's output node: one name in the float, reference and kernel graphs
    module_path: str
    pattern: str
    kind: str
    kernel: str  # the op in the kernel graph; "" where the kernel graph keeps the reference form
    layer_sqnr: float | None  # dB, this layer alone on float inputs, median output channel
    weight_sqnr: float | None  # dB, the same before the output is rounded: the weights' share
    reference_sqnr: float  # dB, reference vs float, end to end, whole tensor
    kernel_sqnr: float  # dB, kernel vs float, end to end, whole tensor
    max_step_diff: float  # kernel vs reference on the same integer inputs, in output steps
    channel_range_ratio: float  # largest / median per-channel max |float output|
    scale: float | None = None  # output qparams (None for dynamic matches: float output)
    zero_point: int | None = None
    index: int = 0  # position in graph order
    cpu_path: str = ""  # oneDNN GEMM / conv: the x86 path it takes on this CPU (report.NodeReport.cpu_path)

    @property
    def lowering_suspect(self) -> bool:
        """Whether kernel and reference disagree by more than one step: a lowering bug."""
        return self.max_step_diff > STEP_TOLERANCE


@dataclass(frozen=True)
class Suggestion:
    """A ``qconfig_dict`` that keeps the worst layers float.

    ``qconfig_dict`` lists the keep-float keys first, worst layer first, then the caller's
    own keys. ``reasons`` says why each key is there. ``unreachable`` names bad nodes that
    run in the root module, which no key can keep float on its own.
    """

    qconfig_dict: dict[str, QConfig | None]
    keep_float: tuple[str, ...]
    reasons: dict[str, str]
    unreachable: tuple[str, ...] = ()


@dataclass(frozen=True)
class Accuracy:
    """``eval_fn`` of the float model, the quantized model and the suggested one."""

    float_model: float
    quantized: float
    suggested: float | None  # None when the suggestion keeps nothing float

    @property
    def recovered(self) -> float | None:
        """How much of the float-to-int8 drop the suggestion gives back, as a fraction."""
        gap = self.float_model - self.quantized
        if self.suggested is None or gap == 0 or not math.isfinite(gap):
            return None  # nothing lost, or a metric such as SQNR that is infinite for the float model
        return (self.suggested - self.quantized) / gap


NO_PATTERN = "no quantized pattern for"  # the float reason of an op the pattern table does not cover (passes/lower)


@dataclass(frozen=True)
class KeptFloat:
    """Ops of one kind left float for one reason (the conversion report's float lines, grouped)."""

    op: str
    why: str  # the reason's head: "kept float (qconfig ops='chains')", "no quantized pattern for ..."
    count: int
    example: str  # the whole reason of the first such node
    paths: tuple[str, ...]  # their module paths, in graph order

    @classmethod
    def group(cls, nodes: Sequence[NodeReport]) -> list[KeptFloat]:
        """The float nodes of a conversion report, grouped by op and the head of their reason, most first;
        the ops no pattern quantizes (views of indices, masks, shape arithmetic) as one group at the end."""
        groups: dict[tuple[str, str], list[NodeReport]] = {}
        other: list[NodeReport] = []
        for n in nodes:
            if n.reason.startswith(NO_PATTERN):
                other.append(n)
                continue
            groups.setdefault((n.op, re.split("[:;]", n.reason)[0]), []).append(n)
        kept = [cls(op, why, len(ns), ns[0].reason, tuple(dict.fromkeys(n.module_path or "<model>" for n in ns)))
                for (op, why), ns in groups.items()]
        kept.sort(key=lambda k: -k.count)
        if other:
            ops = ", ".join(dict.fromkeys(n.op.removeprefix("aten.").split(".")[0] for n in other))
            kept.append(cls("other ops", NO_PATTERN, len(other), f"{NO_PATTERN} them ({ops})",
                            tuple(dict.fromkeys(n.module_path or "<model>" for n in other))))
        return kept

    def __str__(self) -> str:
        paths = ", ".join(self.paths[:3]) + (f" and {len(self.paths) - 3} more" if len(self.paths) > 3 else "")
        return f"{self.count} x {self.op} ({paths}): {self.example}"


@dataclass
class NumericsReport:
    """What ``compare`` measured: nodes worst first, the suggestion, and accuracy; ``kept_float``, what
    the conversion left float and why."""

    mode: str  # "static" or "dynamic"
    backend: str
    nodes: list[NodeNumerics]  # ranked worst first
    output_reference_sqnr: float  # model output, reference vs float, dB
    output_kernel_sqnr: float  # model output, kernel vs float, dB
    suggestion: Suggestion
    accuracy: Accuracy | None = None
    min_sqnr_db: float = DEFAULT_MIN_SQNR_DB
    batches: int = 0
    kept_float: list[KeptFloat] = field(default_factory=list)

    @property
    def suggested_qconfig_dict(self) -> dict[str, QConfig | None]:
        return self.suggestion.qconfig_dict

    @property
    def lowering_suspects(self) -> list[NodeNumerics]:
        """Nodes whose kernel differs from the reference by more than one step."""
        return [n for n in self.nodes if n.lowering_suspect]

    def worst(self, n: int = 5) -> list[NodeNumerics]:
        return self.nodes[:n]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-safe except for infinities, written as ``Infinity`` by ``json``)."""
        return {
            "mode": self.mode,
            "backend": self.backend,
            "batches": self.batches,
            "min_sqnr_db": self.min_sqnr_db,
            "output_reference_sqnr": self.output_reference_sqnr,
            "output_kernel_sqnr": self.output_kernel_sqnr,
            "nodes": [{**n.__dict__, "lowering_suspect": n.lowering_suspect} for n in self.nodes],
            "suggested_qconfig_dict": qconfig_dict_to_json(self.suggestion.qconfig_dict),
            "keep_float": list(self.suggestion.keep_float),
            "reasons": dict(self.suggestion.reasons),
            "accuracy": None if self.accuracy is None else self.accuracy.__dict__,
        }

    def table(self) -> list[list[str]]:
        """Header and rows of the ranked table, as the terminal and the HTML show them."""
        rows = [list(_COLUMNS)]
        for rank, n in enumerate(self.nodes, start=1):
            steps = f"{n.max_step_diff:.2f}" + (" !" if n.lowering_suspect else "")
            kernel = (n.kernel or "(reference form)") + (f" [{n.cpu_path}]" if n.cpu_path else "")
            rows.append([str(rank), n.node, n.module_path or "<model>", n.pattern, kernel,
                         _db(n.layer_sqnr), _db(n.reference_sqnr), _db(n.kernel_sqnr), steps])
        return rows

    def __str__(self) -> str:
        batches = f"{self.batches} batch" + ("" if self.batches == 1 else "es")
        lines = [f"graphquant numerics ({self.mode}, {self.backend}, {batches}): {self.verdict()}"]
        lines += [f"kept float: {k}" for k in self.kept_float]
        lines.append(f"{len(self.nodes)} quantized node{'' if len(self.nodes) == 1 else 's'}, worst first:")
        lines += _format_table(self.table())
        lines.append(f"model output: reference {_db(self.output_reference_sqnr)} dB, "
                     f"kernel {_db(self.output_kernel_sqnr)} dB SQNR against float")
        lines.append("layer dB: this layer alone on float inputs (median output channel); ref/kernel dB: "
                     "end to end; steps: kernel vs reference on the same integer inputs (> 1 marks a lowering bug)")
        for n in self.lowering_suspects:
            lines.append(f"LOWERING: {n.node} ({n.module_path or '<model>'}, {n.kernel}) differs from the "
                         f"reference by {n.max_step_diff:.2f} steps of the output scale")
        lines += self._suggestion_lines()
        return "\n".join(lines)

    def _suggestion_lines(self) -> list[str]:
        s = self.suggestion
        if not s.keep_float:
            lines = [f"suggestion: no layer is below {self.min_sqnr_db:g} dB; nothing to keep float"]
        else:
            lines = ["suggested qconfig_dict (keeps the worst layers float):"]
            lines += [f"  {key!r}: None   # {s.reasons.get(key, '')}" for key in s.keep_float]
            rest = [k for k in s.qconfig_dict if k not in s.keep_float]
            lines += [f"  {key!r}: {_qconfig_name(s.qconfig_dict[key])}" for key in rest]
        for node in s.unreachable:
            lines.append(f"  note: {node} runs in the root module; no qconfig_dict key keeps it float alone "
                         "(move it into a submodule)")
        if self.accuracy is not None:
            a = self.accuracy
            line = f"accuracy: float {a.float_model:.4g}, int8 {a.quantized:.4g}"
            if a.suggested is not None:
                line += f", suggested {a.suggested:.4g}"
                if a.recovered is not None:
                    line += f" ({100 * a.recovered:.0f}% of the drop recovered)"
            lines.append(line)
        return lines

    def verdict(self) -> str:
        """One paragraph: the model's SQNR, what is int8 and what float, the worst layer, lowering bugs."""
        floats = sum(k.count for k in self.kept_float)
        worst = next((n for n in self.nodes if n.layer_sqnr is not None), None)
        text = (f"Model output: {_db(self.output_kernel_sqnr)} dB SQNR against float (int8 kernels; the reference "
                f"graph {_db(self.output_reference_sqnr)} dB), over {self.batches} batch"
                f"{'' if self.batches == 1 else 'es'}. {len(self.nodes)} ops int8, {floats} kept float.")
        if worst is not None:
            text += (f" Worst layer: {worst.module_path or worst.node} ({worst.pattern}), {_db(worst.layer_sqnr)} dB "
                     "on its own.")
        suspects = self.lowering_suspects
        if suspects:
            text += f" {len(suspects)} kernels differ from the reference by more than one step: a lowering bug."
        return text

    def plot_png(self) -> bytes:
        """SQNR per layer, in graph order, grouped by block (one tick a block: ``encoder.layer.3``), as PNG
        bytes sized for a screen (1000 x 400 px; matplotlib, Agg canvas)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        nodes = sorted(self.nodes, key=lambda n: n.index)
        finite = [v for n in nodes for v in (n.layer_sqnr, n.reference_sqnr, n.kernel_sqnr)
                  if v is not None and math.isfinite(v)]
        cap = max(finite + [self.min_sqnr_db]) + 10  # where "inf" (exact) is drawn

        def clip(v: float | None) -> float:
            return float("nan") if v is None else min(max(v, -10.0), cap)

        fig = Figure(figsize=(10.0, 4.0), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        xs = list(range(len(nodes)))
        marker = 4 if len(nodes) > 40 else 6
        ax.plot(xs, [clip(n.layer_sqnr) for n in nodes], "o-", markersize=marker, label="layer (alone, median channel)")
        ax.plot(xs, [clip(n.reference_sqnr) for n in nodes], "s--", markersize=marker,
                label="reference vs float (end to end)")
        ax.plot(xs, [clip(n.kernel_sqnr) for n in nodes], "x:", markersize=marker, label="kernel vs float (end to end)")
        ax.axhline(self.min_sqnr_db, color="grey", linewidth=0.8, label=f"suggestion threshold {self.min_sqnr_db:g} dB")
        starts = _block_starts([n.module_path or n.node for n in nodes])
        every = max(1, math.ceil(len(starts) / 16))  # at most 16 labels across 1000 px
        for i, (x, _) in enumerate(starts):
            if i:
                ax.axvline(x - 0.5, color="#ddd", linewidth=0.6)
        ax.set_xticks([x for x, _ in starts[::every]])
        ax.set_xticklabels([_short(name) for _, name in starts[::every]], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("SQNR (dB)")
        ax.set_title(f"SQNR per layer, graph order, grouped by block ({len(nodes)} layers)")
        ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()

    def to_html(self, path: str | None = None) -> str:
        """A self-contained HTML report leading with the verdict: the model's SQNR, what was kept float
        and why, the suggestion, the SQNR plot (an embedded PNG sized for a screen), then the table of
        every int8 layer; written to ``path`` when given. Without matplotlib the plot is a note."""
        table = self.table()
        head = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
        body = "\n".join(
            "<tr" + (' class="suspect"' if r[-1].endswith("!") else "") + ">"
            + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
            for r in table[1:]
        )
        try:
            png = base64.b64encode(self.plot_png()).decode("ascii")
            plot = f'<img alt="SQNR per layer" width="1000" src="data:image/png;base64,{png}">'
        except ImportError:
            plot = "<p>(install matplotlib for the SQNR plot)</p>"
        kept = "\n".join(f"<li>{html.escape(str(k))}</li>" for k in self.kept_float) or (
            "<li>nothing: every op with a pattern runs in int8</li>")
        text = _HTML.format(
            title=f"graphquant numerics ({self.mode}, {self.backend})",
            verdict=html.escape(self.verdict()),
            kept=kept,
            suggestion=html.escape("\n".join(self._suggestion_lines())),
            plot=plot,
            head=head,
            body=body,
        )
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text


_COLUMNS = ("rank", "node", "module", "pattern", "kernel", "layer dB", "ref dB", "kernel dB", "steps")

# the parts, in the order a user reads them: the verdict first, the table of every layer last
_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; }}
#verdict {{ font-size: 1.15em; background: #eef4fb; padding: 0.8em 1em; border-left: 4px solid #4a7ab8; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
td:nth-child(2), td:nth-child(3), td:nth-child(4), td:nth-child(5) {{ text-align: left; }}
tr.suspect {{ background: #fdd; }}
pre {{ background: #f6f6f6; padding: 1em; white-space: pre-wrap; }}
img {{ max-width: 100%; height: auto; }}
</style></head>
<body>
<h1>{title}</h1>
<p id="verdict">{verdict}</p>
<h2>Kept float, and why</h2>
<ul id="kept-float">
{kept}
</ul>
<h2>Suggestion</h2>
<pre id="suggestion">{suggestion}</pre>
<h2>SQNR per layer</h2>
<div id="plot">{plot}</div>
<h2>Every int8 layer, worst first</h2>
<p>layer dB: the error this layer adds on float inputs (median output channel); ref dB and kernel dB:
SQNR against float, end to end; steps: largest kernel-vs-reference difference in steps of the output
scale on the same integer inputs (more than 1 is a lowering bug).</p>
<table id="numerics">
<thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody>
</table>
</body></html>
"""


def _block_starts(paths: Sequence[str]) -> list[tuple[int, str]]:
    """Where each block begins in a graph-ordered list of module paths, and its name: a path up to its
    first numeric part (``encoder.layer.3``), else its first part (``stem``)."""
    starts: list[tuple[int, str]] = []
    for i, path in enumerate(paths):
        parts = path.split(".")
        cut = next((j + 1 for j, part in enumerate(parts) if part.isdigit()), 1)
        block = ".".join(parts[:cut])
        if not starts or starts[-1][1] != block:
            starts.append((i, block))
    return starts


def _short(name: str, width: int = 24) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def _db(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if value == float("inf") else f"{value:.1f}"


def _format_table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _qconfig_name(qconfig: QConfig | None) -> str:
    if qconfig is None:
        return "None"
    return "QConfig(dynamic)" if qconfig.is_dynamic else "QConfig(static)"


def qconfig_dict_to_json(qconfig_dict: Mapping[str, QConfig | None]) -> dict[str, Any]:
    """``{module path: QConfig.to_dict() or None}``: the ``--qconfig FILE.json`` format."""
    return {key: None if q is None else q.to_dict() for key, q in qconfig_dict.items()}


# ---------------------------------------------------------------------------- the graphs


@dataclass
class _Graphs:
    """The three graphs and, per match (by output node name), where its value lives in each."""

    float_gm: fx.GraphModule
    reference: fx.GraphModule
    kernel: fx.GraphModule
    matches: list[Match]  # reference graph's matches, graph order
    ref_q: dict[str, fx.Node]  # match output -> its quantize node in the reference graph
    kernel_at: dict[str, fx.Node]  # match output -> node producing its value in the kernel graph


def _quantize_both(
    model: nn.Module | ExportedProgram, qconfig_dict: Mapping[str, QConfig | None], batches: list[tuple[Any, ...]],
    dynamic: bool, backend: str | None, progress: Progress,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Reference and kernel graphs of one prepared (and, if static, calibrated) model."""
    # node by node needs one graph: a model that does not export whole is refused, not split
    if dynamic:
        prepared = prepare_dynamic(model, qconfig_dict, batches[0], partial=False)
    else:
        prepared = prepare(model, qconfig_dict, batches[0], partial=False)
        calibrate(prepared, progress(batches, "calibrating"))
    # activations stay unfolded in the kernel graph: each linear's own output is compared (folded,
    # the kernel computes the same single rounding of linear -> activation); no residual accum is
    # donated, so every recorded value stays as its node wrote it
    return (_convert(prepared, True, False, backend),
            _convert(prepared, False, False, backend, fuse=False))


def _quantize_node(node: fx.Node) -> fx.Node | None:
    """The ``quantize_per_tensor`` that reads ``node`` (its output observer's), if any."""
    return next((u for u in node.users if u.target is _Q), None)


def _line_up(float_gm: fx.GraphModule, reference: fx.GraphModule, kernel: fx.GraphModule) -> _Graphs:
    """Find each match's value in the three graphs; an error if a name has no counterpart."""
    float_nodes = {n.name: n for n in float_gm.graph.nodes}
    matches = matches_of(reference)
    ref_q: dict[str, fx.Node] = {}
    for m in matches:
        twin = float_nodes.get(m.output.name)
        if twin is None or twin.target != m.output.target:
            raise GraphQuantError(
                f"graphquant: numerics cannot line up node {m.output.name} ({m.module_path or '<model>'}): the float "
                "capture has no node of that name and op. The model captured differently twice; make its forward "
                "deterministic (no data-dependent Python branches)"
            )
        q = _quantize_node(m.output)
        # an embedding's output is float: a quantize after it belongs to the op reading it
        if q is not None and m.pattern.kind != "weight_only":
            ref_q[m.output.name] = q
    kernel_at: dict[str, fx.Node] = {}
    for n in kernel.graph.nodes:
        m = n.meta.get(MATCH)
        if m is not None and n.name not in {x.name for x in m.nodes}:
            users = list(n.users)
            if len(users) == 1 and users[0].target is torch.ops.aten.clamp_max.default and QPARAMS in users[0].meta:
                n = users[0]  # the clamp of a 7-bit grid after the kernel (passes/lower): the value the graph carries
            kernel_at[m.output.name] = n  # the kernel that replaced the match
    by_name = {n.name: n for n in kernel.graph.nodes}
    for m in matches:  # no kernel: the kernel graph keeps dq -> op -> q, read its q
        if m.output.name not in kernel_at and m.output.name in by_name:
            q = _quantize_node(by_name[m.output.name])
            kernel_at[m.output.name] = q if q is not None else by_name[m.output.name]
    missing = [m.output.name for m in matches if m.output.name not in kernel_at]
    if missing:
        raise GraphQuantError(f"graphquant: numerics found no kernel-graph node for {', '.join(missing)}")
    return _Graphs(float_gm, reference, kernel, matches, ref_q, kernel_at)


# ---------------------------------------------------------------------------- running


class _Recorder(fx.Interpreter):
    """Runs a graph, keeping the values of the nodes named in ``keep``.

    ``force[name]`` replaces that node's value for everything downstream, after it was
    recorded: the way one graph is fed another's values (teacher forcing).
    """

    def __init__(
        self, gm: fx.GraphModule, keep: Iterable[str], force: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        super().__init__(gm)
        self.keep = set(keep)
        self.force = force or {}
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.keep:
            self.values[n.name] = value
        forced = self.force.get(n.name)
        if forced is None:
            return value
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not forced.is_floating_point():
            forced = dequantize(forced, n.meta[QPARAMS])  # a kernel that writes float reads the reference's dq
        return forced


def _as_float(value: torch.Tensor, qparams: QParams | None) -> torch.Tensor:
    if value.is_floating_point() or qparams is None:
        return value.float()
    return dequantize(value, qparams)


@dataclass
class _Values:
    """One batch: each match's value in each run (float tensors, by match output name)."""

    float_: dict[str, torch.Tensor] = field(default_factory=dict)
    reference: dict[str, torch.Tensor] = field(default_factory=dict)
    kernel: dict[str, torch.Tensor] = field(default_factory=dict)
    layer: dict[str, torch.Tensor] = field(default_factory=dict)  # reference, float inputs
    layer_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # same, before the output rounding
    steps: dict[str, float] = field(default_factory=dict)
    outputs: tuple[Any, Any, Any] = (None, None, None)  # model outputs: float, reference, kernel


def _run_batch(g: _Graphs, batch: tuple[Any, ...]) -> _Values:
    """Five runs: float; reference and kernel end to end; reference on float inputs; kernel on
    the reference's integer inputs."""
    out = _Values()
    names = [m.output.name for m in g.matches]
    run = _Recorder(g.float_gm, names)
    float_out = run.run(*batch)
    out.float_ = run.values

    qs = [n.name for n in g.reference.graph.nodes if n.target is _Q]
    run = _Recorder(g.reference, qs + names)
    ref_out = run.run(*batch)
    ref_values = run.values
    for m in g.matches:
        q = g.ref_q.get(m.output.name)
        out.reference[m.output.name] = (
            dequantize(ref_values[q.name], q.meta[QPARAMS]) if q is not None else ref_values[m.output.name].float()
        )
    _run_layers_alone(g, batch, out)
    run = _Recorder(g.kernel, [n.name for n in g.kernel_at.values()])
    kernel_out = run.run(*batch)
    for m in g.matches:
        node = g.kernel_at[m.output.name]
        out.kernel[m.output.name] = _as_float(run.values[node.name], node.meta.get(QPARAMS))
    _run_kernels_on_reference_inputs(g, batch, ref_values, out)
    out.outputs = (float_out, ref_out, kernel_out)
    return out


def _run_layers_alone(g: _Graphs, batch: tuple[Any, ...], out: _Values) -> None:
    """The reference graph with each match's quantized output replaced, downstream, by the
    float value: ``conv -> q -> dq -> next`` feeds ``next`` the float conv output. Inputs that
    come from float ops stay quantized: their rounding belongs to the layer reading them."""
    force: dict[str, torch.Tensor] = {}
    keep: list[str] = []
    for m in g.matches:
        name = m.output.name
        keep.append(name)
        q = g.ref_q.get(name)
        if q is None:  # dynamic: float output
            force[name] = out.float_[name]
            continue
        dq = next(u for u in q.users if u.target is _DQ)
        keep.append(dq.name)
        force[dq.name] = out.float_[name]
    run = _Recorder(g.reference, keep, force)
    run.run(*batch)
    for m in g.matches:
        name = m.output.name
        q = g.ref_q.get(name)
        computed = run.values[name].float()
        out.layer_weights[name] = computed
        out.layer[name] = computed if q is None else run.values[next(u for u in q.users if u.target is _DQ).name]


def _run_kernels_on_reference_inputs(
    g: _Graphs, batch: tuple[Any, ...], ref_values: dict[str, Any], out: _Values
) -> None:
    """The kernel graph with every quantized value replaced, downstream, by the reference's:
    each kernel reads exactly the integers its reference twin read."""
    ref_names = {n.name: n for n in g.reference.graph.nodes}
    force: dict[str, torch.Tensor] = {}
    for n in g.kernel.graph.nodes:  # quantize nodes common to both graphs
        twin = ref_names.get(n.name)
        if n.target is _Q and twin is not None and twin.target is _Q and n.name in ref_values:
            force[n.name] = ref_values[n.name]
    for m in g.matches:
        node, q = g.kernel_at[m.output.name], g.ref_q.get(m.output.name)
        force[node.name] = ref_values[q.name] if q is not None else ref_values[m.output.name]
    run = _Recorder(g.kernel, [n.name for n in g.kernel_at.values()], force)
    run.run(*batch)
    for m in g.matches:
        name = m.output.name
        node, q = g.kernel_at[name], g.ref_q.get(name)
        got = run.values[node.name]
        if q is not None:
            qparams = q.meta[QPARAMS]
            diff = (_as_float(got, node.meta.get(QPARAMS) or qparams) - out.reference[name]).abs()
            step = float(qparams.scale)
        else:  # dynamic: float output; a step is what a uint8 per-tensor quantization of it would take
            ref = out.reference[name]
            diff = (got.float() - ref).abs()
            step = float(ref.max() - ref.min()) / 255 if ref.numel() else 0.0
        worst = float(diff.max()) if diff.numel() else 0.0
        out.steps[name] = worst / step if step > 0 else (0.0 if worst == 0 else float("inf"))


# ---------------------------------------------------------------------------- statistics


def _channel_axis(match: Match, value: torch.Tensor) -> int | None:
    """Output channels: dim 1 of a conv's (or any >= 4-d) output, the last dim otherwise."""
    if value.dim() < 2:
        return None
    anchor = str(match.anchor.target)
    return 1 if "conv" in anchor or value.dim() >= 4 else value.dim() - 1


def _per_channel(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``x`` as ``(channels, everything else)``."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


@dataclass
class _Stats:
    """Running sums for one match over all batches (float64)."""

    axis: int | None
    signal: torch.Tensor | None = None  # per channel sum of float^2
    layer_noise: torch.Tensor | None = None  # per channel
    weight_noise: torch.Tensor | None = None  # per channel
    absmax: torch.Tensor | None = None  # per channel max |float|
    reference_noise: float = 0.0
    kernel_noise: float = 0.0
    steps: float = 0.0

    def add(self, f: torch.Tensor, v: _Values, name: str) -> None:
        f = f.detach().double()

        def channels(x: torch.Tensor) -> torch.Tensor:
            return _per_channel(x, self.axis)

        fc = channels(f)
        sums = (fc.pow(2).sum(1), channels(f - v.layer[name].double()).pow(2).sum(1),
                channels(f - v.layer_weights[name].double()).pow(2).sum(1), fc.abs().amax(1))
        if self.signal is None:
            self.signal, self.layer_noise, self.weight_noise, self.absmax = sums
        else:
            assert self.layer_noise is not None and self.weight_noise is not None and self.absmax is not None
            self.signal = self.signal + sums[0]
            self.layer_noise = self.layer_noise + sums[1]
            self.weight_noise = self.weight_noise + sums[2]
            self.absmax = torch.maximum(self.absmax, sums[3])
        self.reference_noise += float((f - v.reference[name].double()).pow(2).sum())
        self.kernel_noise += float((f - v.kernel[name].double()).pow(2).sum())
        self.steps = max(self.steps, v.steps[name])


def _db_ratio(signal: float, noise: float) -> float:
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10 * math.log10(signal / noise)


def _median_channel_sqnr(signal: torch.Tensor, noise: torch.Tensor) -> float:
    """Median over channels that carry signal (a dead ReLU channel says nothing); lower median."""
    values = sorted(_db_ratio(float(s), float(n)) for s, n in zip(signal, noise, strict=True) if s > 0)
    if not values:
        return float("inf") if float(noise.sum()) == 0 else float("-inf")
    return values[(len(values) - 1) // 2]


def _range_ratio(absmax: torch.Tensor) -> float:
    live = sorted(float(a) for a in absmax if a > 0)
    return live[-1] / live[(len(live) - 1) // 2] if live else 1.0


def _node_numerics(index: int, m: Match, s: _Stats, kernel_node: fx.Node) -> NodeNumerics:
    assert s.signal is not None and s.layer_noise is not None and s.weight_noise is not None and s.absmax is not None
    total = float(s.signal.sum())
    shares = m.pattern.kind == "shares_qparams"
    dynamic = m.pattern.kind == "dynamic"  # activation and weight rounding happen together: no split
    qp = kernel_node.meta.get(QPARAMS)
    scale, zero_point = qp.scalar() if qp is not None and qp.axis is None else (None, None)
    return NodeNumerics(
        node=m.output.name,
        module_path=m.module_path,
        pattern=m.pattern.name,
        kind=m.pattern.kind,
        kernel=m.pattern.kernel if m.pattern.lower_kernel is not None else "",
        layer_sqnr=None if shares else _median_channel_sqnr(s.signal, s.layer_noise),
        weight_sqnr=None if shares or dynamic else _median_channel_sqnr(s.signal, s.weight_noise),
        reference_sqnr=_db_ratio(total, s.reference_noise),
        kernel_sqnr=_db_ratio(total, s.kernel_noise),
        max_step_diff=s.steps,
        channel_range_ratio=_range_ratio(s.absmax),
        scale=scale,
        zero_point=zero_point,
        index=index,
    )


def _output_sqnr(pairs: list[tuple[Any, Any]]) -> float:
    """SQNR of all floating outputs of all batches together."""
    signal = noise = 0.0
    for expected, got in pairs:
        e_flat, _ = tree_flatten(expected)
        g_flat, _ = tree_flatten(got)
        for e, o in zip(e_flat, g_flat, strict=False):
            if isinstance(e, torch.Tensor) and e.is_floating_point():
                signal += float(e.double().pow(2).sum())
                noise += float((e.double() - o.double()).pow(2).sum())
    return _db_ratio(signal, noise)


def _measure(g: _Graphs, batches: list[tuple[Any, ...]], progress: Progress) -> tuple[list[NodeNumerics], float, float]:
    stats: dict[str, _Stats] = {}
    outputs: list[tuple[Any, Any, Any]] = []
    with torch.no_grad():
        for batch in progress(batches, "comparing"):
            values = _run_batch(g, batch)
            for m in g.matches:
                name = m.output.name
                f = values.float_[name]
                if name not in stats:
                    stats[name] = _Stats(_channel_axis(m, f))
                stats[name].add(f, values, name)
            outputs.append(values.outputs)
    nodes = [_node_numerics(i, m, stats[m.output.name], g.kernel_at[m.output.name]) for i, m in enumerate(g.matches)]
    ref_sqnr = _output_sqnr([(f, r) for f, r, _ in outputs])
    kernel_sqnr = _output_sqnr([(f, k) for f, _, k in outputs])
    return nodes, ref_sqnr, kernel_sqnr


def _rank(nodes: list[NodeNumerics]) -> list[NodeNumerics]:
    """Worst layer SQNR first; ops sharing their input's qparams last; ties in graph order."""
    return sorted(nodes, key=lambda n: (n.layer_sqnr is None, n.layer_sqnr or 0.0, n.index))


# ---------------------------------------------------------------------------- suggestion


def _consumers(match: Match, matches: Sequence[Match]) -> list[Match]:
    """Matches that read ``match``'s quantized output (through any ops sharing its qparams)."""
    if match.output_observer is None:
        return []
    return [m for m in matches if m is not match and match.output_observer in m.input_observers.values()]


def _why(n: NodeNumerics, min_sqnr_db: float) -> str:
    reason = f"layer SQNR {_db(n.layer_sqnr)} dB < {min_sqnr_db:g}"
    if n.weight_sqnr is not None and n.weight_sqnr < min_sqnr_db:
        return reason + f"; weights alone {_db(n.weight_sqnr)} dB"
    if n.kind == "dynamic":
        return reason + "; activation and weight rounding (dynamic)"
    if n.channel_range_ratio >= 10:
        return reason + f"; output range: one channel spans {n.channel_range_ratio:.0f}x the median channel"
    return reason + "; output rounding"


def suggest(
    report_nodes: Sequence[NodeNumerics], matches: Sequence[Match], qconfig_dict: Mapping[str, QConfig | None],
    min_sqnr_db: float = DEFAULT_MIN_SQNR_DB, max_layers: int = DEFAULT_MAX_LAYERS,
) -> Suggestion:
    """Keep float the (at most ``max_layers``) layers whose layer SQNR is below ``min_sqnr_db``.

    Where the output rounding is the cause (the weights alone are fine), the layers that
    read that output are kept float too: they would quantize the same value with the same
    per-tensor range again.
    """
    by_name = {m.output.name: m for m in matches}
    bad = [n for n in report_nodes if n.layer_sqnr is not None and n.layer_sqnr < min_sqnr_db][:max_layers]
    keep: list[str] = []
    reasons: dict[str, str] = {}
    unreachable: list[str] = []
    for n in bad:
        if not n.module_path:
            unreachable.append(n.node)
            continue
        if n.module_path not in keep:
            keep.append(n.module_path)
            reasons[n.module_path] = _why(n, min_sqnr_db)
        if n.weight_sqnr is not None and n.weight_sqnr < min_sqnr_db:
            continue  # the weights are the cause: the output's readers can stay int8
        for c in _consumers(by_name[n.node], matches):
            if c.module_path and c.module_path not in keep:
                keep.append(c.module_path)
                reasons[c.module_path] = f"reads the output of {n.module_path} (same per-tensor range)"
    suggested: dict[str, QConfig | None] = {key: None for key in keep}
    suggested.update({k: v for k, v in qconfig_dict.items() if k not in suggested})
    return Suggestion(suggested, tuple(keep), reasons, tuple(unreachable))


# ---------------------------------------------------------------------------- entry


def _batches(data: Iterable[Any] | None, what: str) -> list[tuple[Any, ...]]:
    if data is None:
        return []
    if isinstance(data, torch.Tensor):
        raise GraphQuantError(
            f"graphquant: {what} must be an iterable of batches (a list of tensors or of input tuples), "
            "not one tensor; wrap it: [x]"
        )
    return [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in data]


def _quantized_model(
    model: nn.Module | ExportedProgram, qconfig_dict: Mapping[str, QConfig | None], batches: list[tuple[Any, ...]],
    dynamic: bool, backend: str | None, progress: Progress,
) -> fx.GraphModule:
    if dynamic:
        return convert(prepare_dynamic(model, qconfig_dict, batches[0]), backend=backend)
    prepared = prepare(model, qconfig_dict, batches[0])
    calibrate(prepared, progress(batches, "calibrating (suggestion)"))
    return convert(prepared, backend=backend)


def compare(
    model: nn.Module | ExportedProgram,
    qconfig_dict: Mapping[str, QConfig | None] | None,
    calibration_data: Iterable[Any] | None,
    inputs: Iterable[Any] | None = None,
    eval_fn: EvalFn | None = None,
    dynamic: bool = False,
    *,
    backend: str | None = None,
    min_sqnr_db: float = DEFAULT_MIN_SQNR_DB,
    max_layers: int = DEFAULT_MAX_LAYERS,
    progress: Progress | None = None,
) -> NumericsReport:
    """Quantize ``model`` and compare float, reference and int8 kernel graphs node by node.

    ``qconfig_dict`` as for ``graphquant.quantize`` (``None``: the default static or dynamic
    qconfig for the whole model). ``calibration_data`` and ``inputs`` are iterables of
    batches, each a tensor or a tuple of model inputs; ``inputs`` (default: the
    calibration data) are what the graphs are compared on. Dynamic quantization needs no
    calibration data. ``eval_fn(model) -> float`` (higher is better), if given, is run on
    the float model, the int8 model and the model the suggestion gives, so the report says
    how much accuracy keeping the worst layers float gives back. Layers whose layer SQNR
    is below ``min_sqnr_db`` (at most ``max_layers`` of them) are suggested for float.
    ``progress(iterable, description)`` wraps the calibration and comparison loops (a
    progress bar); the model itself is never changed. ``model`` may be anything
    ``graphquant.prepare`` takes: an ``nn.Module``, a TorchScript module, an ``ExportedProgram``.
    """
    progress = progress or _no_progress
    if qconfig_dict is None:
        qconfig_dict = {"": default_dynamic_qconfig if dynamic else get_default_qconfig("x86")}
    calibration = _batches(calibration_data, "calibration_data")
    compared = _batches(inputs, "inputs") if inputs is not None else calibration
    if not compared:
        raise GraphQuantError("graphquant: compare needs at least one batch of inputs (or of calibration data)")
    if not dynamic and not calibration:
        raise GraphQuantError(
            "graphquant: static quantization needs calibration data: pass calibration_data, or dynamic=True"
        )
    backend = backend or default_backend()
    examples = calibration or compared
    try:
        reference, kernel = _quantize_both(model, qconfig_dict, examples, dynamic, backend, progress)
    except CaptureError as error:
        name = type(model).__name__
        raise CaptureError(
            f"graphquant: compare lines up one graph of the whole model, and {name} does not export whole "
            f"({export_reason(error)}); graphquant.quantize takes it region by region (graphquant.partial): "
            f"compare one of its submodules that exports, e.g. compare(model.<submodule>, ...)"
        ) from error
    float_gm = fold_bn(capture(model, examples[0]))
    graphs = _line_up(float_gm, reference, kernel)
    nodes, out_ref, out_kernel = _measure(graphs, compared, progress)
    paths = {n.node: n.cpu_path for n in record_of(kernel).report.nodes}
    nodes = [dataclasses.replace(n, cpu_path=paths.get(n.node, "")) for n in nodes]
    ranked = _rank(nodes)
    suggestion = suggest(ranked, graphs.matches, qconfig_dict, min_sqnr_db, max_layers)
    accuracy = None
    if eval_fn is not None:
        suggested = None
        if suggestion.keep_float:
            suggested = eval_fn(_quantized_model(model, suggestion.qconfig_dict, examples, dynamic, backend, progress))
        float_model = model.module() if isinstance(model, ExportedProgram) else model
        accuracy = Accuracy(float(eval_fn(float_model)), float(eval_fn(kernel)),
                            None if suggested is None else float(suggested))
    return NumericsReport("dynamic" if dynamic else "static", backend, ranked, out_ref, out_kernel, suggestion,
                          accuracy, min_sqnr_db, len(compared), KeptFloat.group(record_of(kernel).report.float_nodes))
