"""The one exception type graphquant raises for bad input, and how it is worded.

Every message says what is wrong, where (module path or node) and the way out.
"""

from __future__ import annotations


class GraphQuantError(RuntimeError, ValueError):
    """A problem with the user's model, config or data that graphquant can name.

    Subclasses ``RuntimeError`` so that callers who caught PyTorch's quantization
    errors keep working, and ``ValueError`` so that callers who caught the kernels'
    argument checks (``ValueError`` before they became graphquant errors) do too.
    """


class CaptureError(GraphQuantError):
    """``torch.export`` could not capture a model or submodule (data-dependent control flow, a
    ``.item()``, an untraceable call): what partial graph mode (:mod:`graphquant.partial`) works
    around by capturing smaller parts."""


def where(module_path: str, node_name: str | None = None) -> str:
    """Format a location: ``encoder.layer.0 (node linear_3)``; the root is ``<model>``."""
    place = module_path or "<model>"
    return f"{place} (node {node_name})" if node_name else place
