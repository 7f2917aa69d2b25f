"""What a user runs on a quantized model besides calling it: the layer-by-layer numerics
(:mod:`.numerics`), accuracy control (:mod:`.accuracy`), kernel timing (:mod:`.kernel_timing`) and
sharded calibration (:mod:`.distributed`)."""
