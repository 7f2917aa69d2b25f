"""The package's shape: imports point one way (docs/architecture.md), with no circles; every kernel
record is complete; the layout docs/architecture.md describes is the one on disk."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch

from graphquant.kernels.registry import GEMM_RUNTIME_ARGS, KERNELS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "graphquant"

# The layers, lowest first: a module may import its own layer and those below it, never above.
# kernels is a leaf beside the core: it may import errors and quant_math, never graph code.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("graphquant.errors",)),
    ("arithmetic", ("graphquant.quant_math",)),
    ("kernels", ("graphquant.kernels",)),
    ("core", ("graphquant.graph", "graphquant.qconfig", "graphquant.observers", "graphquant.inputs",
              "graphquant.capture", "graphquant.report", "graphquant.runtimes", "graphquant.quantized")),
    ("patterns", ("graphquant.patterns",)),
    ("passes", ("graphquant.passes",)),
    ("api", ("graphquant.api", "graphquant.partial")),
    ("deploy and tools", ("graphquant.deploy", "graphquant.tools", "graphquant.testing")),
    ("front", ("graphquant.cli", "graphquant.__main__", "graphquant")),
]


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _layer(module: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank >= 0, f"{module} belongs to no layer of tests/test_layout.py"
    return rank


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The graphquant modules ``path`` imports (at any depth, a function's too; not under TYPE_CHECKING)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("graphquant"):
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(modules)
            found.update(submodules or {node.module})
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_imports_follow_the_layers() -> None:
    modules = _modules()
    wrong = []
    for name, path in sorted(modules.items()):
        for target in sorted(_imports(path, modules) - {name}):
            if _layer(target) > _layer(name):
                wrong.append(f"{name} ({LAYERS[_layer(name)][0]}) imports {target} ({LAYERS[_layer(target)][0]})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_circles() -> None:
    modules = _modules()
    edges = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    packages = {name for name, path in modules.items() if path.name == "__init__.py"}
    for name in edges:  # a package's __init__ importing its own submodules is how it registers them
        if name in packages:
            edges[name] = {t for t in edges[name] if not t.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(edges.get(name, ())):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if target not in state:
                walk(target)
        stack.pop()
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            walk(name)


def test_the_layer_check_sees_a_wrong_import(tmp_path: Path) -> None:
    """The check above can fail: a kernel module reading graph code is against the order."""
    kernel = tmp_path / "kernel.py"
    kernel.write_text("from graphquant.graph import MATCH\n")
    imported = _imports(kernel, _modules())
    assert imported == {"graphquant.graph"} and _layer("graphquant.graph") > _layer("graphquant.kernels.conv")


# ---------------------------------------------------------------------------------------------- records


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_every_kernel_record_is_complete(name: str) -> None:
    """Schema, fake, eager kernel and a TorchScript body that compiles and takes the schema's arguments
    (a gemm kernel's then ``packed`` and ``saturates``)."""
    kernel = KERNELS[name]
    op = getattr(torch.ops.graphquant, name).default
    assert tuple(a.name for a in op._schema.arguments) == kernel.argument_names
    assert callable(kernel.fake) and callable(kernel.eager)
    parameters = tuple(inspect.signature(kernel.torchscript).parameters)
    assert parameters[: len(kernel.argument_names)] == kernel.argument_names, (parameters, kernel.argument_names)
    assert kernel.runtime_args == (GEMM_RUNTIME_ARGS if kernel.gemm else ())
    torch.jit.script(kernel.torchscript)  # TorchScript compiles it (what to_torchscript writes)
    if kernel.planner is not None:
        assert kernel.gemm, "plans are for oneDNN's calls"


def test_the_tables_are_derived_from_the_records() -> None:
    from graphquant.kernels import registry

    gemm = set(registry.names(gemm=True))
    assert gemm == {"qconv1d", "qconv2d", "qconv3d", "qconv1d_add", "qconv2d_add", "qlinear", "qlinear_dynamic"}
    assert set(registry.names(bias_corrected=True)) == gemm - {"qlinear_dynamic"}
    assert set(registry.names(timed=True)) == gemm | {"qconv_transpose1d", "qconv_transpose2d", "qconv_transpose3d"}
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py") if p.name != "registry.py")
    # no hand-kept list of op names outside the records: a quoted "qconv2d" beside another op name
    assert not re.search(r'["\']q(conv|linear)\w*["\'], ["\']q(conv|linear)', source)


def test_the_worked_example_of_adding_an_int8_op_holds(tmp_path: Path) -> None:
    """docs/architecture.md's "How to add an int8 op": its three code blocks (a kernel record, a pattern
    row, the one-line test), run in a fresh process, quantize |x| to the new kernel within one step of
    the reference and write it out as TorchScript, with nothing else changed."""
    import subprocess
    import sys

    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## How to add an int8 op", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3, "the worked example is three blocks: kernel record, pattern row, test"
    script = tmp_path / "add_an_op.py"  # a file: TorchScript reads the kernel body's source
    script.write_text("import warnings\nwarnings.simplefilter('ignore')\n" + "\n".join(blocks))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1].startswith("qabs ")
