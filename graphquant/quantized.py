"""The one record of a quantized model: what graphquant knows about it beside its graph.

Every converted model — a ``GraphModule`` quantized whole, a model quantized region by region (the
user's module with :class:`graphquant.partial.Region` children), a dynamic model captured on its
first call, a model loaded from a file — carries one :class:`QuantizedRecord`, attached by
:func:`attach` and read by :func:`record_of`. Every output format and tool reads the record (and
:func:`regions`), never attributes of its own; what a model takes as input is not here but in its
input check (:func:`graphquant.inputs.input_specs`), the one place the graph reads it from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from graphquant.errors import GraphQuantError
from graphquant.report import ConversionReport

if TYPE_CHECKING:
    from graphquant.qconfig import QConfig

RECORD = "graphquant_record"
# the report under the name earlier releases set (`qmodel.graphquant_report`): the record's own report
REPORT = "graphquant_report"


@dataclass
class QuantizedRecord:
    """What convert did and with what: the conversion ``report`` (which names the backend and the
    mode: reference or kernel), the ``qconfig_dict``; ``packed`` lists each packed oneDNN weight
    attribute with what rebuilds it (its int8 buffer, the pack function and its arguments: packed
    weights cannot be saved, the int8 ones are)."""

    report: ConversionReport
    qconfig_dict: dict[str, QConfig | None]
    packed: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def backend(self) -> str:
        return self.report.backend

    @property
    def debug(self) -> bool:
        return self.report.mode == "reference"


def attach(model: nn.Module, record: QuantizedRecord) -> None:
    """Give ``model`` its record. A ``GraphModule`` keeps it through ``copy.deepcopy`` (which builds
    the copy from its graph and drops other attributes) by listing it among the attributes
    ``GraphModule`` preserves."""
    model.__dict__[RECORD] = record
    model.__dict__[REPORT] = record.report
    if isinstance(model, fx.GraphModule):
        preserved = model.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})
        preserved[RECORD], preserved[REPORT] = record, record.report


def set_report(model: nn.Module, report: ConversionReport) -> None:
    """Replace the report of ``model``'s record (convert's, or one with kernel timings added)."""
    record = record_of(model)
    record.report = report
    attach(model, record)


def find_record(model: object) -> QuantizedRecord | None:
    """``model``'s record, or None where it has none (not converted, or a dynamic model that has
    not run yet)."""
    record = getattr(model, RECORD, None)
    return record if isinstance(record, QuantizedRecord) else None


def record_of(model: object) -> QuantizedRecord:
    """``model``'s record; a ``GraphQuantError`` saying what to pass where it has none."""
    record = find_record(model)
    if record is None:
        raise GraphQuantError(
            f"graphquant: expected a model returned by graphquant.convert / quantize / load, got {type(model).__name__}"
        )
    return record


def packed_weights(gm: fx.GraphModule) -> dict[str, dict[str, Any]]:
    """The packed-weight table of the model being converted or loaded (its record's ``packed``)."""
    return record_of(gm).packed
