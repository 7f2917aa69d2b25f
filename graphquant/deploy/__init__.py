"""Output formats of a quantized model, each reading its one metadata record: the ``.pt2`` program
(:mod:`.program`), TorchScript (:mod:`.torchscript`), the AOTInductor package (:mod:`.compiled`) and
the archive of a model quantized region by region (:mod:`.archive`, which also chooses between them
for ``graphquant.save`` / ``graphquant.load``)."""
