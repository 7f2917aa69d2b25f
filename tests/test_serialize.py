"""Deployment: save -> load in a fresh process, TorchScript out run without graphquant, the
manifest; TorchScript modules, ExportedPrograms and .pt2 files in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import calibration_batches, make_net, run_batches
from torch import nn
from torch.export import Dim
from torch.utils._pytree import tree_leaves

import graphquant as gq
from graphquant.capture import capture
from graphquant.graph import MODULE_PATH
from graphquant.patterns import PATTERNS
from graphquant.deploy.program import MANIFEST_FILE, manifest_path

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: each model loaded from disk, called on the saved inputs, compared bit for bit.
LOAD_PT2 = """
import json, sys, torch
import graphquant as gq
from torch.utils._pytree import tree_leaves
results = {}
for name in sys.argv[2:]:
    base = sys.argv[1] + "/" + name
    model = gq.load(base + ".pt2")
    same = []
    for inputs, outputs in torch.load(base + ".io"):
        with torch.no_grad():
            got = tree_leaves(model(*inputs))
        want = tree_leaves(outputs)
        same.append(len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want)))
    results[name] = {"equal": all(same), "packed": len(model.graphquant_record.packed),
                     "quantized": len(gq.report(model).quantized)}
print(json.dumps(results))
"""

# A libtorch-like deployment: torch only; graphquant must never be imported.
LOAD_TORCHSCRIPT = """
import json, sys, torch
from torch.utils._pytree import tree_leaves
results = {}
for name in sys.argv[2:]:
    base = sys.argv[1] + "/" + name
    model = torch.jit.load(base + ".ts")
    same = []
    for inputs, outputs in torch.load(base + ".io"):
        with torch.no_grad():
            got = tree_leaves(model(*inputs))
        want = tree_leaves(outputs)
        same.append(len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want)))
    results[name] = {"equal": all(same)}
print(json.dumps({"results": results, "graphquant_imported": "graphquant" in sys.modules}))
"""


def run_fresh(script: str, *args: str) -> Any:
    """Run ``script`` in a new Python process; its last stdout line is JSON."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=900,
                          env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


class ResidualNet(nn.Module):
    """conv-bn-relu, conv-bn, += identity, relu, flatten, linear: the residual join (qconv2d_add)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(identity))
        out += identity
        return self.fc(torch.flatten(self.relu2(out), 1))


def make_residual(seed: int = 0) -> ResidualNet:
    torch.manual_seed(seed)
    net = ResidualNet()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    return net.eval()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def make_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


def _images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _tokens(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 5, 32, generator=torch.Generator().manual_seed(seed))


def _static(make: Any, backend: str | None = None, debug: bool = False) -> nn.Module:
    return gq.quantize(make(), {"": gq.default_qconfig}, run_batches, [calibration_batches()], debug=debug,
                       backend=backend)


def _models() -> dict[str, tuple[nn.Module, Any]]:
    """Name -> (quantized model, input maker): static and dynamic, both backends, reference too."""
    lazy = gq.quantize_dynamic_jit(make_mlp())
    lazy(_tokens(2, 0))  # captured and converted on its first call
    linears = gq.qconfig_dict_by_type(make_mlp(), {nn.Linear: gq.default_qconfig})
    return {
        "static_onednn": (_static(make_net), _images),
        "static_portable": (_static(make_net, backend="portable"), _images),
        "residual": (_static(make_residual), _images),
        "static_reference": (_static(make_net, debug=True), _images),
        # linears int8, the ReLU float in the recipe and folded into fc1's kernel (uint8 out)
        "static_linears_folded_relu": (
            gq.quantize(make_mlp(), linears, run_batches, [[_tokens(2, s) for s in range(3)]]), _tokens
        ),
        "dynamic": (gq.quantize_dynamic(make_mlp(), example_inputs=(_tokens(1, 0),)), _tokens),
        "dynamic_per_token": (gq.quantize_dynamic(make_mlp(), {"": gq.per_token_dynamic_qconfig},
                                                  example_inputs=(_tokens(1, 0),)), _tokens),
        "dynamic_per_token_7bit": (gq.quantize_dynamic(make_mlp(), {"": gq.get_default_dynamic_qconfig(True, True)},
                                                       example_inputs=(_tokens(1, 0),)), _tokens),
        "dynamic_fp16": (gq.quantize_dynamic(make_mlp(), {"": gq.float16_dynamic_qconfig},
                                             example_inputs=(_tokens(1, 0),)), _tokens),
        "dynamic_lazy": (lazy, _tokens),
    }


def _write(directory: Path, name: str, model: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> bool:
    """Save ``model`` as .pt2 and TorchScript with its outputs on ``batches``; whether the
    in-process TorchScript module matches it bit for bit."""
    with torch.no_grad():
        outputs = [model(*inputs) for inputs in batches]
    gq.save(model, directory / f"{name}.pt2")
    scripted = gq.to_torchscript(model)
    torch.jit.save(scripted, str(directory / f"{name}.ts"))
    leaves = [tree_leaves(out) for out in outputs]  # torch.load(weights_only) refuses torch.return_types
    torch.save(list(zip(batches, leaves, strict=True)), directory / f"{name}.io")
    with torch.no_grad():
        return all(_same_leaves(scripted(*inputs), out) for inputs, out in zip(batches, outputs, strict=True))


def _same_leaves(got: Any, want: Any) -> bool:
    """Bit-identical outputs, tensors or tuples of them (a model may return values and indices)."""
    got, want = tree_leaves(got), tree_leaves(want)
    return len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every model of ``_models`` saved, then loaded in two fresh processes (.pt2 and TorchScript)."""
    directory = tmp_path_factory.mktemp("deployed")
    models = _models()
    in_process = {}
    for name, (model, make_input) in models.items():
        in_process[name] = _write(directory, name, model, [(make_input(3, 7),), (make_input(1, 8),)])
    names = sorted(models)
    return {
        "dir": directory,
        "models": models,
        "in_process": in_process,
        "pt2": run_fresh(LOAD_PT2, str(directory), *names),
        "torchscript": run_fresh(LOAD_TORCHSCRIPT, str(directory), *names),
    }


# ---------------------------------------------------------------------------------------------- out


def test_save_load_in_a_fresh_process_is_bit_identical(deployed):  # type: ignore[no-untyped-def]
    for name, result in deployed["pt2"].items():
        assert result["equal"], name
        model = deployed["models"][name][0]
        assert result["quantized"] == len(gq.report(model).quantized), name
    # oneDNN weights are packed again at load; portable and fp16 ones stay plain
    assert deployed["pt2"]["static_onednn"]["packed"] == 4
    assert deployed["pt2"]["residual"]["packed"] == 3
    assert deployed["pt2"]["dynamic"]["packed"] == 2
    assert deployed["pt2"]["static_portable"]["packed"] == 0
    assert deployed["pt2"]["dynamic_fp16"]["packed"] == 0


def test_torchscript_runs_bit_identical_without_graphquant(deployed):  # type: ignore[no-untyped-def]
    assert deployed["torchscript"]["graphquant_imported"] is False
    for name, result in deployed["torchscript"]["results"].items():
        assert result["equal"], name
        assert deployed["in_process"][name], name


def test_saved_program_holds_int8_weights_only(deployed):  # type: ignore[no-untyped-def]
    """No float conv / linear weight is saved; the packed copies are rebuilt, not stored."""
    program = torch.export.load(str(deployed["dir"] / "static_onednn.pt2"))
    weights = {name: t for name, t in program.state_dict.items() if t.dim() >= 2}
    assert weights and all(t.dtype == torch.int8 for t in weights.values()), {k: t.dtype for k, t in weights.items()}
    kernels = [n for n in program.graph.nodes if str(n.target).startswith("graphquant.q")]
    assert kernels


def test_manifest_beside_and_inside_the_program(deployed):  # type: ignore[no-untyped-def]
    path = deployed["dir"] / "static_onednn.pt2"
    beside = Path(manifest_path(path))
    assert beside.name == "static_onednn.manifest.json"
    text = beside.read_text()
    extra = {MANIFEST_FILE: ""}
    torch.export.load(str(path), extra_files=extra)
    assert extra[MANIFEST_FILE] == text
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"  # keys sorted: two runs diff cleanly
    assert data["backend"] == "onednn" and data["inputs"] == [{"dtype": "float32", "shape": ["batch", 3, 16, 16]}]
    quantized = [node for node in data["nodes"] if node["quantized"]]
    assert len(quantized) == data["summary"]["quantized"] == 8
    for node in quantized:
        assert node["pattern"] and node["kernel"] and node["qconfig_key"] == ""
        if node["module_path"] == "fc2":  # the last linear writes float32: no output qparams
            assert node["scale"] is None and node["zero_point"] is None
        else:
            assert isinstance(node["scale"], float) and isinstance(node["zero_point"], int)
    assert {node["module_path"] for node in quantized} >= {"conv1", "conv2", "fc1", "fc2"}
    assert sorted(data["packed_weights"].values()) == ["pack_conv", "pack_conv", "pack_linear", "pack_linear"]


def test_manifest_is_identical_across_runs(tmp_path):  # type: ignore[no-untyped-def]
    for run in ("a", "b"):
        gq.save(_static(make_net), tmp_path / f"{run}.pt2")
    assert (tmp_path / "a.manifest.json").read_text() == (tmp_path / "b.manifest.json").read_text()


def test_loaded_model_saves_again(deployed, tmp_path):  # type: ignore[no-untyped-def]
    """load repacks and keeps the int8 buffers, so a loaded model is saved and scripted like a fresh one."""
    model = gq.load(deployed["dir"] / "residual.pt2")
    gq.save(model, tmp_path / "again.pt2")
    again = gq.load(tmp_path / "again.pt2")
    x = _images(2, 11)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
        assert torch.equal(gq.to_torchscript(again)(x), model(x))
    first = Path(manifest_path(deployed["dir"] / "residual.pt2"))
    assert (tmp_path / "again.manifest.json").read_text() == first.read_text()


def test_deployment_refusals(deployed, tmp_path):  # type: ignore[no-untyped-def]
    with pytest.raises(gq.GraphQuantError, match="not run yet"):
        gq.save(gq.quantize_dynamic_jit(make_mlp()), tmp_path / "lazy.pt2")
    with pytest.raises(gq.GraphQuantError, match="graphquant.convert"):
        gq.to_torchscript(make_mlp())
    torch.export.save(torch.export.export(make_mlp(), (_tokens(2, 0),)), tmp_path / "float.pt2")
    with pytest.raises(gq.GraphQuantError, match="not written by graphquant.save"):
        gq.load(tmp_path / "float.pt2")
    with pytest.raises(gq.GraphQuantError, match="no such"):
        gq.load(tmp_path / "missing.pt2")
    with pytest.raises(gq.GraphQuantError, match="load it with graphquant.load"):
        gq.prepare_jit(str(deployed["dir"] / "static_onednn.pt2"), {"": gq.default_qconfig})
    model = gq.load(deployed["dir"] / "static_onednn.pt2")
    missing = tmp_path / "no" / "such" / "model.pt2"
    with pytest.raises(gq.GraphQuantError, match=f"directory {missing.parent} does not exist; create it first"):
        gq.save(model, missing)
    with pytest.raises(gq.GraphQuantError, match="it is a directory; give a file name"):
        gq.save(model, tmp_path)
    assert not missing.parent.exists()


PATTERN_CASES = [(pattern, backend) for pattern in PATTERNS for backend in ("onednn", "portable")]


@pytest.mark.slow
def test_every_pattern_deploys_bit_identical(tmp_path):  # type: ignore[no-untyped-def]
    """Each registered pattern's first example, both backends: TorchScript in process, .pt2 and
    TorchScript in fresh processes. A kernel change that its TorchScript twin misses fails here."""
    names, mismatched = [], []
    for pattern, backend in PATTERN_CASES:
        torch.manual_seed(0)
        module, inputs = pattern.examples()[0]
        # batch 2, not the capture's 1; indices (embeddings) reversed rather than scaled
        batch = tuple(torch.cat([x, 0.5 * x + 0.1 if x.is_floating_point() else x.flip(-1)]) for x in inputs)
        if pattern.kind == "dynamic":
            model = gq.quantize_dynamic(module.eval(), example_inputs=inputs, backend=backend)
        else:
            qconfig = gq.embedding_qconfig if pattern.kind == "weight_only" else gq.default_qconfig
            model = gq.quantize(module.eval(), {"": qconfig}, lambda m, b: m(*b), [batch],
                                example_inputs=inputs, backend=backend)
        name = f"{pattern.name}-{backend}"
        if not _write(tmp_path, name, model, [batch]):
            mismatched.append(name)
        names.append(name)
    assert not mismatched
    loaded = run_fresh(LOAD_PT2, str(tmp_path), *names)
    assert [n for n, r in loaded.items() if not r["equal"]] == []
    scripted = run_fresh(LOAD_TORCHSCRIPT, str(tmp_path), *names)
    assert scripted["graphquant_imported"] is False
    assert [n for n, r in scripted["results"].items() if not r["equal"]] == []


# ----------------------------------------------------------------------------------------------- in


def _quantized_paths(model: nn.Module) -> list[tuple[str, str, bool]]:
    return [(n.module_path, n.op, n.quantized) for n in gq.report(model).nodes]


@pytest.mark.parametrize("make", [make_net, make_residual], ids=["ConvBnReluNet", "ResidualNet"])
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_in_gives_the_nn_module_numbers(make, how):  # type: ignore[no-untyped-def]
    batches = calibration_batches()
    qconfig_dict = {"": gq.default_qconfig, "fc": None, "fc2": None}
    qconfig_dict = {k: v for k, v in qconfig_dict.items() if k == "" or hasattr(make(), k)}
    expected = gq.quantize_jit(make(), qconfig_dict, run_batches, [batches])
    ts = torch.jit.script(make()) if how == "script" else torch.jit.trace(make(), (batches[0],))
    got = gq.quantize_jit(ts, qconfig_dict, run_batches, [batches])
    assert _quantized_paths(got) == _quantized_paths(expected)
    assert any(not quantized for _, _, quantized in _quantized_paths(got))  # the None key kept its linear float
    for batch in (1, 5):
        x = _images(batch, 20 + batch)
        with torch.no_grad():
            assert torch.equal(got(x), expected(x))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_in_dynamic(how):  # type: ignore[no-untyped-def]
    x = _tokens(3, 5)
    expected = gq.quantize_dynamic_jit(make_mlp())
    ts = torch.jit.script(make_mlp()) if how == "script" else torch.jit.trace(make_mlp(), (x,))
    got = gq.quantize_dynamic_jit(ts, {"": gq.default_dynamic_qconfig, "fc2": None})
    with torch.no_grad():
        expected(x), got(x)
    assert [p for p, _, q in _quantized_paths(got) if q] == ["fc1"]
    partial = gq.quantize_dynamic_jit(make_mlp(), {"": gq.default_dynamic_qconfig, "fc2": None})
    with torch.no_grad():
        assert torch.equal(got(x), partial(x))
        assert not torch.equal(got(x), expected(x))


def test_capture_of_torchscript_keeps_module_paths():  # type: ignore[no-untyped-def]
    """torch._export.converter is private API: its graph must reach the passes as an nn.Module's does."""
    x = _images(2, 0)
    want = capture(make_residual(), (x,))
    for ts in (torch.jit.script(make_residual()), torch.jit.trace(make_residual(), (x,))):
        for _ in range(2):  # converting twice: the user's module must not be changed by the first time
            got = capture(ts, (x,))
            ops = [(str(n.target), n.meta[MODULE_PATH]) for n in got.graph.nodes if n.op == "call_function"]
            assert ops == [(str(n.target), n.meta[MODULE_PATH]) for n in want.graph.nodes if n.op == "call_function"]
            with torch.no_grad():
                assert torch.equal(got(_images(4, 1)), want(_images(4, 1)))


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 0):
            return self.a(x)
        return self.b(x)


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.gate = Gate()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gate(torch.relu(self.conv(x))).mean((2, 3)))


def test_if_on_a_tensor_in_a_scripted_module(tmp_path):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = Gated().eval()
    batches = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    scripted = torch.jit.script(model)
    way_out = r"gate \(Gate, node cond\).*torch.jit.trace.*qconfig_dict=\{'gate': None\}"
    with pytest.raises(gq.GraphQuantError, match=way_out):
        gq.quantize_jit(scripted, {"": gq.default_qconfig}, run_batches, [batches])
    # the way out 1: keep it float; the if stays in the graph and takes both branches
    q = gq.quantize_jit(scripted, {"": gq.default_qconfig, "gate": None}, run_batches, [batches])
    assert [p for p, _, quantized in _quantized_paths(q) if quantized] == ["conv", "", "fc"]
    x, negative = torch.randn(3, 3, 8, 8), -torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        for inputs in (x, negative):
            torch.testing.assert_close(q(inputs), model(inputs), atol=0.05, rtol=0)
        gq.save(q, tmp_path / "gated.pt2")
        loaded = gq.load(tmp_path / "gated.pt2")
        assert torch.equal(loaded(negative), q(negative)) and torch.equal(loaded(x), q(x))
    with pytest.raises(gq.GraphQuantError, match=r"gate \(node cond\).*graphquant.save"):
        gq.to_torchscript(q)
    # the way out 2: trace it (the branch taken for the example is recorded) and quantize all of it
    traced = gq.quantize_jit(torch.jit.trace(model, (batches[0].abs(),)), {"": gq.default_qconfig}, run_batches,
                             [batches])
    assert "gate.a" in [p for p, _, quantized in _quantized_paths(traced) if quantized]


def test_torchscript_in_refusals():  # type: ignore[no-untyped-def]
    net = make_net().train()
    with pytest.raises(gq.GraphQuantError, match=r"bn1 \(BatchNorm2d\) is in training mode"):
        gq.prepare_jit(torch.jit.script(net), {"": gq.default_qconfig})
    scripted = torch.jit.script(make_net())
    with pytest.raises(gq.GraphQuantError, match="inplace=True"):
        gq.prepare_jit(scripted, {"": gq.default_qconfig}, inplace=True)
    with pytest.raises(gq.GraphQuantError, match="'conv9' matches no module.*'conv1'"):
        gq.prepare_jit(scripted, {"": gq.default_qconfig, "conv9": None})


def test_exported_program_and_pt2_in(tmp_path):  # type: ignore[no-untyped-def]
    batches = calibration_batches()
    qconfig_dict = {"": gq.default_qconfig, "fc2": None}
    expected = gq.quantize_jit(make_net(), qconfig_dict, run_batches, [batches])
    program = torch.export.export(make_net(), (batches[0],), dynamic_shapes=({0: Dim("batch")},))
    torch.export.save(program, tmp_path / "float.pt2")
    x = _images(5, 3)
    for model in (program, tmp_path / "float.pt2", str(tmp_path / "float.pt2")):
        got = gq.quantize_jit(model, qconfig_dict, run_batches, [batches])  # type: ignore[arg-type]
        assert _quantized_paths(got) == _quantized_paths(expected)
        with torch.no_grad():
            assert torch.equal(got(x), expected(x))
    with pytest.raises(gq.GraphQuantError, match="'fc3' matches no module"):
        gq.prepare_jit(program, {"": gq.default_qconfig, "fc3": None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynamic = gq.quantize_dynamic(program, example_inputs=(batches[0],))
    assert [p for p, _, q in _quantized_paths(dynamic) if q] == ["fc1", "fc2"]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN packing")
def test_conv_packing_keeps_its_input_shape_hint_through_save_and_torchscript(tmp_path: Path) -> None:
    """oneDNN lays a conv weight out for the input shape it is packed for (packed blind, ResNet-50's
    1x1 convs reordered their weight on every call: 72 ms a call instead of 16). The hint, the
    captured input shape with batch 1, is recorded at convert and rebuilt on load and in TorchScript."""
    from graphquant.kernels import onednn
    from graphquant.quantized import packed_weights

    model = make_net()
    batches = calibration_batches()
    q = gq.quantize(model, {"": gq.default_qconfig}, run_batches, [batches], example_inputs=(batches[0],),
                    backend="onednn")
    convs = [e for e in packed_weights(q).values() if e["pack"] == "pack_conv"]
    assert convs[0]["x_shape"] == [1, *batches[0].shape[1:]]
    assert all(len(e["x_shape"]) == 4 and e["x_shape"][0] == 1 for e in convs), convs
    gq.save(q, tmp_path / "m.pt2")
    loaded = gq.load(tmp_path / "m.pt2")
    want = sorted(e["x_shape"] for e in convs)
    assert sorted(e["x_shape"] for e in packed_weights(loaded).values() if e["pack"] == "pack_conv") == want
    scripted = gq.to_torchscript(q)
    hints = sorted(m.x_shape for m in scripted.modules() if hasattr(m, "x_shape"))
    assert hints == want
    path = tmp_path / "m.ts"
    torch.jit.save(scripted, path)
    again = torch.jit.load(path)
    assert sorted(m.x_shape for m in again.modules() if hasattr(m, "x_shape")) == hints
    with torch.no_grad():
        torch.testing.assert_close(again(batches[0]), q(batches[0]), rtol=0, atol=0)
        torch.testing.assert_close(loaded(batches[0]), q(batches[0]), rtol=0, atol=0)
    # a hint that cannot be the input (wrong rank, empty size) is dropped, not passed to oneDNN
    w = torch.randint(-127, 128, (4, 3, 3, 3), dtype=torch.int8)
    for bad in ([1, 3, 8], [1, 3, 0, 8]):
        packed = onednn.pack_conv(w, torch.full((4,), 0.01), 0.1, 3, [1, 1], [0, 0], [1, 1], 1, bad)
        assert packed.is_mkldnn
