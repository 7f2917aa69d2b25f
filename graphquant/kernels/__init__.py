"""The int8 ops the lowered graph calls: schemas in ``ops``, one backend per file."""
