"""What a captured model takes as input, and the check every call of it makes.

A graph captured by ``torch.export`` is specialised to its example inputs: their rank,
dtype, device and every size but a dynamic batch. Called with anything else it either
fails deep inside (``IndexError``, export's ``Guard failed: x.size()[1] == 3``) or, worse,
runs: a float64 or half input is cast by the first quantize node, a batch of 0 gives an
empty answer. So every graphquant graph starts with one ``call_module`` node,
``_input_check``, that compares each input with the :class:`InputSpec` recorded at capture
and raises a :class:`~graphquant.errors.GraphQuantError` naming the input, what was
captured, what came and the way out::

    x -> _guards_fn(x) -> quantize(x) -> ...   becomes   x -> _input_check(x) -> quantize(x) -> ...

It replaces export's ``_guards_fn`` (which checks the same sizes and batch range, more
slowly, with an ``AssertionError``) and its per-call pytree re-check of the inputs
(``validate_inputs``) when every input is a tensor: together about 45 µs a call on this
machine. The check reads a few attributes per input: about 2.6 µs (models run at batch 1).

It is a module of the graph, not a hook, so ``copy.deepcopy`` and ``convert`` keep it;
``graphquant.save`` drops it from the exported program and ``graphquant.load`` installs it
again from the manifest's inputs; ``to_torchscript`` calls its TorchScript form
(``kernels.scripted.check_input``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, fx, nn

from graphquant.errors import GraphQuantError

INPUT_CHECK = "_input_check"
_EXPORT_GUARDS = "_guards_fn"


class InputSpec(NamedTuple):
    """One tensor input of a captured model.

    ``sizes`` are the captured sizes; with ``dynamic_batch`` dimension 0 may be any size >= 1
    (the same for every input with a dynamic batch), else every size is fixed.
    """

    position: int
    name: str
    dtype: torch.dtype
    device: torch.device
    sizes: tuple[int, ...]
    dynamic_batch: bool

    @property
    def rank(self) -> int:
        return len(self.sizes)

    def describe(self) -> str:
        """``(batch, 3, 16, 16) torch.float32 on cpu``."""
        sizes = ["batch", *map(str, self.sizes[1:])] if self.dynamic_batch else [str(s) for s in self.sizes]
        shape = "(" + ", ".join(sizes) + ("," if len(sizes) == 1 else "") + ")"
        return f"{self.rank}-d {shape} {self.dtype} on {self.device}"


def specs_from_examples(
    example_inputs: Sequence[Any], names: Sequence[str], dynamic_batch: bool
) -> tuple[InputSpec | None, ...]:
    """The spec of each example input (``None`` for a non-tensor), refusing inputs that no
    int8 graph should be captured with: a batch of 0, or a floating dtype other than float32."""
    specs: list[InputSpec | None] = []
    for position, x in enumerate(example_inputs):
        name = names[position] if position < len(names) else f"arg{position}"
        if not isinstance(x, Tensor):
            specs.append(None)
            continue
        where = f"example input {position} ({name})"
        if x.dim() > 0 and x.shape[0] == 0:
            raise GraphQuantError(
                f"graphquant: <model> {where} has batch size 0 (shape {tuple(x.shape)}); capture needs at least one "
                "sample: pass an example batch with data"
            )
        if x.is_floating_point() and x.dtype != torch.float32:
            raise GraphQuantError(
                f"graphquant: <model> {where} is {x.dtype}; graphquant quantizes float32 models: cast the model and "
                "its inputs with .float() before quantizing"
            )
        dynamic = dynamic_batch and x.dim() > 0
        specs.append(InputSpec(position, name, x.dtype, x.device, tuple(x.shape), dynamic))
    return tuple(specs)


def _mismatch(spec: InputSpec, x: Any, batch: int | None) -> str:
    """What is wrong with ``x`` against ``spec`` and the way out (the slow path: only on failure)."""
    where = f"graphquant: <model> input {spec.position} ({spec.name})"
    captured = f"the model was captured with {spec.describe()}"
    if not isinstance(x, Tensor):
        return f"{where} is a {type(x).__name__}, not a tensor; {captured}"
    got = tuple(x.shape)
    if x.dtype != spec.dtype:
        cast = ".float()" if spec.dtype == torch.float32 else f".to({spec.dtype})"
        return f"{where} is {x.dtype}; {captured}. Cast it with {spec.name}{cast}"
    if x.device != spec.device:
        return f"{where} is on {x.device}; {captured}. Move it with {spec.name}.to('{spec.device}')"
    if x.dim() != spec.rank:
        hint = " (is the batch dimension missing?)" if x.dim() == spec.rank - 1 and spec.dynamic_batch else ""
        return (f"{where} is {x.dim()}-d with shape {got}{hint}; {captured}. Pass inputs of that rank, or "
                f"re-quantize with example inputs of shape {got}")
    if spec.rank > 0 and got[0] == 0:
        return f"{where} has batch size 0 (shape {got}); {captured}. Skip empty batches: there is nothing to compute"
    for dim, (size, want) in enumerate(zip(got, spec.sizes, strict=True)):
        if dim == 0 and spec.dynamic_batch:
            if batch is not None and size != batch:
                return (f"{where} has batch size {size}, but an earlier input has {batch}; {captured}. "
                        "Give every input the same batch size")
            continue
        if size != want:
            what = f"the batch size is fixed at {want}" if dim == 0 else f"dimension {dim} must be {want}"
            return (f"{where} has shape {got}: {what}, got {size}; {captured}. Pass inputs of that shape, or "
                    f"re-quantize with example inputs of shape {got}")
    return f"{where}: shape {got} does not match; {captured}"


class InputCheck(nn.Module):
    """The graph's first node: checks every input against its :class:`InputSpec`."""

    _is_impure = True  # no users: keep it through dead-code elimination (as export's _guards_fn)

    def __init__(self, specs: Sequence[InputSpec | None]) -> None:
        super().__init__()
        self.specs = tuple(specs)

    def forward(self, *inputs: Any) -> None:
        batch = None
        for spec, x in zip(self.specs, inputs, strict=False):
            if spec is None:
                continue
            # plain attribute reads, fastest first; a message is built only on failure
            if not isinstance(x, Tensor) or x.dtype != spec.dtype or x.device != spec.device:
                raise GraphQuantError(_mismatch(spec, x, batch))
            shape = x.shape
            if spec.dynamic_batch:
                if len(shape) != len(spec.sizes) or shape[1:] != spec.sizes[1:] or shape[0] < 1 or (
                    batch is not None and shape[0] != batch
                ):
                    raise GraphQuantError(_mismatch(spec, x, batch))
                batch = shape[0]
            elif shape != spec.sizes:
                raise GraphQuantError(_mismatch(spec, x, batch))

    # called on every model call: straight to forward, past nn.Module's hook dispatch (a few µs at batch 1)
    __call__ = forward  # type: ignore[assignment]

    def extra_repr(self) -> str:
        return "; ".join(f"{s.name}: {s.describe()}" for s in self.specs if s is not None)


def install_input_check(gm: fx.GraphModule, specs: Sequence[InputSpec | None] | None = None) -> None:
    """Put ``_input_check`` right after the placeholders of ``gm`` (moving it there if a pass
    inserted nodes before it), with ``specs`` or the ones it already holds.

    Export's ``_guards_fn`` goes when every input is a tensor: the check covers its sizes and
    batch range. With a non-tensor input it stays (it also pins those values).
    """
    if specs is None:
        existing = getattr(gm, INPUT_CHECK, None)
        if not isinstance(existing, InputCheck):
            return
        specs = existing.specs
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    if len(specs) != len(placeholders):
        return  # inputs that are not flat tensors (kwargs, nested): export's guards stay the check
    drop = {INPUT_CHECK} | ({_EXPORT_GUARDS} if all(spec is not None for spec in specs) else set())
    for node in list(graph.find_nodes(op="call_module")):
        if node.target in drop and not node.users:
            graph.erase_node(node)
    for name in drop:
        if hasattr(gm, name):
            delattr(gm, name)
    if not placeholders or all(spec is None for spec in specs):
        gm.recompile()
        return
    gm.add_module(INPUT_CHECK, InputCheck(specs))
    with graph.inserting_after(placeholders[-1]):
        graph.call_module(INPUT_CHECK, tuple(placeholders))
    if _EXPORT_GUARDS in drop:
        # export's forward pre-hook re-checks every call by pytree (tens of µs); the check does it
        gm.validate_inputs = False  # type: ignore[assignment]
    gm.recompile()


def input_specs(gm: nn.Module) -> tuple[InputSpec | None, ...] | None:
    """The specs ``gm`` checks its inputs against, if it has an input check."""
    check = getattr(gm, INPUT_CHECK, None)
    return check.specs if isinstance(check, InputCheck) else None
