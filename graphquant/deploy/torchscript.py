"""A quantized model written out as TorchScript, for deployment with libtorch (no Python, no
graphquant): :func:`to_torchscript`.

Every ``graphquant::`` op becomes its record's TorchScript body (:mod:`graphquant.kernels.registry`, aten
and onednn ops only, bit-identical to the kernel), every packed weight a small module whose
``__getstate__`` saves the int8 weight and whose ``__setstate__`` packs it again, so
``torch.jit.save`` writes int8 weights and ``torch.jit.load`` runs the result without
graphquant. A :class:`graphquant.kernels.x86.SaturationProbe` asks the loading machine's CPU
whether oneDNN's int8 kernels saturate there.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, fx, nn

from graphquant.deploy.program import graph_module, input_records
from graphquant.errors import GraphQuantError, where
from graphquant.graph import get_attr_value, module_path
from graphquant.inputs import INPUT_CHECK, InputSpec, input_specs
from graphquant.kernels import x86
from graphquant.kernels.scripted import PackedConvWeight, PackedLinearWeight, check_input, is_packed
from graphquant.partial import regions
from graphquant.quantized import record_of
from graphquant.runtimes import KernelCall, kernel_call


def _input_checks(graph: fx.Graph, specs: tuple[InputSpec | None, ...], inputs: list[Any]) -> None:
    """One ``check_input`` call per tensor input, where ``_input_check`` was."""
    first = None
    for spec, x in zip(specs, inputs, strict=True):
        if spec is None:
            continue
        if spec.dynamic_batch and first is None:
            first = x
        cast = ".float()" if spec.dtype == torch.float32 else f".to({spec.dtype})"
        graph.call_function(check_input, (x, spec.position, spec.name, spec.dtype, str(spec.device),
                                              list(spec.sizes), spec.dynamic_batch, first if first is not None else x,
                                              spec.describe(), cast))


# runtime shape assertions export adds; TorchScript checks shapes in the kernels themselves
_ASSERTS = {
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch.ops.aten.sym_constrain_range.default,
}


def _packed_weight_module(gm: fx.GraphModule, packed_name: str, entry: dict[str, Any]) -> nn.Module:
    w_int8 = getattr(gm, str(entry["int8"]))
    packed = getattr(gm, packed_name)
    if entry["pack"] == "pack_linear":
        return PackedLinearWeight(w_int8, packed)
    x_shape = entry.get("x_shape")
    return PackedConvWeight(w_int8, entry["w_scale"].float(), float(entry["x_scale"]), int(entry["x_zero_point"]),
                            list(entry["stride"]), list(entry["padding"]), list(entry["dilation"]),
                            int(entry["groups"]), [int(n) for n in x_shape] if x_shape and w_int8.dim() == 4 else [],
                            packed)


def _script_target(node: fx.Node) -> Any:
    """What the TorchScript graph calls for ``node``: the TorchScript body of a graphquant op, the overload
    packet of an ATen op (TorchScript has no ``aten.add.Tensor`` spelling; it picks the
    overload by argument types), or the function itself."""
    target = node.target
    if target is torch.ops.higher_order.cond:
        raise GraphQuantError(
            f"graphquant: {where(module_path(node), node.name)}: an `if` on a tensor (torch.cond) has no TorchScript "
            "form here; save the model with graphquant.save, or trace the float model before quantizing it"
        )
    call = kernel_call(node)
    if call is not None:
        return call.kernel.torchscript
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket
    return target


def _flat_inputs(gm: fx.GraphModule) -> None:
    in_spec = getattr(gm, "_in_spec", None)
    if in_spec is None:
        return
    args_spec = in_spec.children()[0] if in_spec.num_children == 2 else in_spec
    if in_spec.num_children == 2 and in_spec.children()[1].num_leaves:
        raise GraphQuantError("graphquant: to_torchscript takes models called with positional tensors, not keywords")
    if any(not child.is_leaf() for child in args_spec.children()):
        raise GraphQuantError("graphquant: to_torchscript takes models whose inputs are tensors, not nested structures")


def _scriptable_graph(gm: fx.GraphModule) -> tuple[nn.Module, fx.Graph]:
    """A root module and a graph TorchScript compiles: plain positional inputs, no export guards,
    kernel bodies for graphquant ops, packed weights behind :class:`PackedConvWeight` / :class:`PackedLinearWeight`."""
    input_records(gm)
    _flat_inputs(gm)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            _script_target(node)  # refuses torch.cond, naming the node
    packed = record_of(gm).packed
    root, graph = nn.Module(), fx.Graph()
    env: dict[fx.Node, Any] = {}
    names: dict[str, str] = {}
    probes: dict[bool, fx.Node] = {}  # a SaturationProbe call per kind, made where the first body needs it

    def saturates(call: KernelCall) -> fx.Node | bool:
        if not packed:  # portable kernels only: nothing saturates
            return False
        depthwise = call.depthwise(gm)
        if depthwise not in probes:
            name = "x86_saturation_depthwise" if depthwise else "x86_saturation"
            root.add_module(name, x86.SaturationProbe(depthwise))
            probes[depthwise] = graph.call_module(name, ())
        return probes[depthwise]

    def attribute(target: str, make: Any) -> str:
        if target not in names:
            names[target] = target.replace(".", "_")
            while hasattr(root, names[target]):
                names[target] += "_"
            value = make()
            if isinstance(value, nn.Module):
                root.add_module(names[target], value)
            else:
                root.register_buffer(names[target], value.detach())
        return names[target]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
        elif node.op == "get_attr":
            target = str(node.target)
            if target in packed:
                name = attribute(target, lambda t=target: _packed_weight_module(gm, t, packed[t]))
                env[node] = graph.call_module(name, ())
                continue
            value = get_attr_value(gm, node)
            if not isinstance(value, Tensor):
                raise GraphQuantError(f"graphquant: {node.name} reads {type(value).__name__} {target}; "
                                      "to_torchscript handles tensors only")
            env[node] = graph.get_attr(attribute(target, lambda v=value: v))
        elif node.op == "call_module":
            specs = input_specs(gm) if node.target == INPUT_CHECK else None
            if specs is not None:
                _input_checks(graph, specs, [env[arg] for arg in node.args])
            elif node.target != "_guards_fn":  # export's input checks: TorchScript checks shapes in the kernels
                raise GraphQuantError(f"graphquant: {node.name} calls submodule {node.target}; to_torchscript "
                                      "handles flat graphs only")
        elif node.op == "call_function":
            if node.target in _ASSERTS:
                continue
            call = kernel_call(node)
            args, kwargs = (node.args, node.kwargs) if call is None else (call.args, {})  # bodies take every argument
            args, kwargs = fx.map_arg(args, lambda n: env[n]), fx.map_arg(kwargs, lambda n: env[n])
            if call is not None and call.kernel.gemm:  # packed: read from the weight on each call (never wrong)
                w = args[call.kernel.argument_names.index("w")]
                args = (*args, graph.call_function(is_packed, (w,)), saturates(call))
            env[node] = graph.call_function(_script_target(node), args, kwargs)
        elif node.op == "output":
            flat = fx.map_arg(node.args[0], lambda n: env[n])
            out_spec = getattr(gm, "_out_spec", None)
            graph.output(pytree.tree_unflatten(list(flat), out_spec) if out_spec is not None else flat)
    return root, graph


def _script_partial(qmodel: nn.Module) -> torch.jit.ScriptModule:
    """A partially quantized model scripted whole: each region swapped for its scripted graph for
    the time of ``torch.jit.script`` (which copies the module tree), then put back."""
    parts = regions(qmodel)
    for region in parts:
        qmodel.set_submodule(region.path, to_torchscript(region.inner))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.script(qmodel)
    except Exception as error:
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise GraphQuantError(
            f"graphquant: {type(qmodel).__name__} was quantized region by region (it does not export whole), and "
            f"TorchScript cannot compile its eager parts ({first}). Save it with graphquant.save (one .pt2 "
            "program per region), or make those parts scriptable"
        ) from error
    finally:
        for region in parts:
            qmodel.set_submodule(region.path, region)


def to_torchscript(qmodel: nn.Module) -> torch.jit.ScriptModule:
    """``qmodel`` as a ``torch.jit.ScriptModule`` of aten and onednn ops only.

    ``torch.jit.save`` writes it with int8 weights; ``torch.jit.load`` packs them again and
    runs it in a process that never imports graphquant (a libtorch deployment), with
    outputs bit-identical to ``qmodel``'s. Both backends are supported: the portable
    kernels are pure aten, like their originals. An ``if`` on a tensor (``torch.cond``,
    from a scripted input) is refused.

    A model quantized region by region (:mod:`graphquant.partial`) is scripted whole, each region
    as its scripted graph, when its eager parts are themselves TorchScript-compatible (an ``if``
    on a tensor is; ``list(self.blocks)[:n]`` is not); otherwise it is refused, naming what
    TorchScript could not compile.
    """
    if regions(qmodel):
        return _script_partial(qmodel)
    gm = graph_module(qmodel)
    root, graph = _scriptable_graph(gm)
    module = fx.GraphModule(root, graph, class_name="GraphQuantModule")
    module.graph.eliminate_dead_code()  # what only the dropped assertions read
    module.recompile()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.script(module)
    except Exception as error:
        raise GraphQuantError(f"graphquant: TorchScript could not compile the quantized graph: {error}") from error
