"""graphquant's int8 kernels: one :class:`~graphquant.kernels.registry.Kernel` record per
``graphquant::`` op, beside its code, registered when this package is imported. Never imports
graph code (a test holds the import direction)."""

from graphquant.kernels import conv, dynamic, elementwise, embedding, linear, quantize  # noqa: F401  (the records)
