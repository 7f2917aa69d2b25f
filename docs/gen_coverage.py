"""Regenerate docs/coverage.md from the pattern registry ``graphquant.patterns.PATTERNS``.

    python docs/gen_coverage.py            # rewrite docs/coverage.md
    python docs/gen_coverage.py --check    # exit 1 if docs/coverage.md is out of date

Every row comes from the registry: adding a pattern file and rerunning this script is all
the coverage table needs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import graphquant  # noqa: F401  (registers the kernels the patterns lower to)
from graphquant.patterns import PATTERNS, Pattern

OUT = Path(__file__).resolve().parent / "coverage.md"
KIND_ORDER = ("weighted", "shares_qparams", "general", "fixed_qparams", "dynamic", "weight_only")
KIND_TEXT = {
    "weighted": "conv / linear and what fuses into them: input and output observed, weight quantized per channel",
    "shares_qparams": "runs on its input's uint8 values and scale (quantized only when its input is)",
    "general": "each activation input observed, own output observer (quantized when an input is)",
    "fixed_qparams": "output scale and zero point fixed by the op's range (quantized when its input is)",
    "dynamic": "`quantize_dynamic` only: int8 weight, activation quantized per batch inside the kernel, float output "
    "(with `float16_dynamic_qconfig` the weight is float16 and the kernel `linear_fp16`)",
    "weight_only": "embedding tables under `embedding_qconfig` (8 bits) or `embedding_4bit_qconfig` (4 bits, two a "
    "byte), in `quantize` and `quantize_dynamic` alike: per-row scale and float offset, indices in, float out "
    "(quantized by the next op's input observer where that op is quantized). The other presets leave tables float",
}

HEADER = """# Coverage: what graphquant quantizes

Generated from the pattern registry (`graphquant.patterns.PATTERNS`) by
`python docs/gen_coverage.py`; do not edit by hand. {count} patterns.

A pattern is a chain of ATen ops (`a -> b` means `b` is the only user of `a`; `x | y`
means either op at that position). `nn.Conv2d`, `F.conv2d` and `torch.conv2d` all reach the
graph as `aten.conv2d.default`, `flatten` mostly as `aten.view`, `matmul` with a constant
2-d weight as `aten.linear` (capture normalises them), so one row covers every spelling.
The kernel is the op the int8 graph shows, the name `check_graph_mode_op(..., quantized_op)`
looks for; "reference form" means the int8 graph keeps `dequantize -> op -> quantize` for it
(uint8 in and out, computed in float).
"""

RULES = """
## What stays float

A node runs in float, and `graphquant.report(model)` / `graphquant explain` say why, when:

1. **No pattern matches it.** Any op not in the table above (softmax, `aten.mean`, indexing,
   ...) stays float: a `dequantize` goes before it and, if a quantized op reads its output,
   a `quantize` after it.
2. **Its module's qconfig is `None`.** `qconfig_dict` keys are module paths; the most specific
   key wins and a submodule inherits its parent's entry. A chain is matched only if *every*
   node in it has a qconfig, so `{"block.relu": None}` also stops `conv -> relu` fusing.
3. **Its input is not quantized** (kinds `shares_qparams`, `general`, `fixed_qparams`): such
   ops join a quantized region but never start one, so `x + y` of two model inputs stays float,
   as in PyTorch.
4. **It does not carry float32 tensors.** Only float32 activations become uint8: index
   tensors, masks, integer and float64 values, and tuples pass through untouched. An op
   returning several tensors (`split`, `max` with indices, `sort`) is quantized item by item
   through its `getitem` nodes; with only its indices used it stays float.
5. **The chain is broken.** Every node of a chain but the last must have exactly one user:
   `y = conv(x); z = relu(y); return y, z` matches `conv` alone and `relu` separately.
6. **It is dynamic-only or static-only.** Rows of kind `dynamic` apply under
   `quantize_dynamic` / `prepare_dynamic` only; rows of kind `weight_only` under both, but only
   where the module's qconfig is weight-only (`embedding_qconfig`), which quantizes nothing else;
   all others under `quantize` / `prepare` only.
7. **A fused join does not fit.** `conv -> add` fuses only when the other addend has the
   conv output's shape (no broadcasting) and `alpha == 1` (otherwise the kernel graph keeps
   `conv`, `add` and a `quantize`); `conv3d -> add` has no oneDNN form and stays `conv3d`, `add`.

Batch-norm right after a convolution is folded into it at capture time (`fold_bn`), so it is
never a node of its own; a batch-norm elsewhere stays float (rule 1).
"""


def _op(op: object) -> str:
    return str(op).removeprefix("aten.")


def _chain(pattern: Pattern) -> str:
    text = " -> ".join(" \\| ".join(_op(op) for op in alternatives) for alternatives in pattern.ops)
    if pattern.value_outputs == "all":
        return text + " -> getitem (each item)"
    if pattern.value_outputs is not None:
        items = ", ".join(str(i) for i in pattern.value_outputs)
        return text + f" -> getitem {items} (the other items, indices, pass through)"
    return text


def _source(pattern: Pattern) -> str:
    # the examples are made in the file that registers the pattern; a lowering may be shared from another
    fn: Callable[..., object] | None = pattern.examples or pattern.lower_kernel
    module = getattr(fn, "__module__", "") or ""
    return module.removeprefix("graphquant.").replace(".", "/") + ".py" if module else ""


def render() -> str:
    patterns = sorted(PATTERNS, key=lambda p: (KIND_ORDER.index(p.kind) if p.kind in KIND_ORDER else 99, p.name))
    lines = [HEADER.format(count=len(patterns))]
    for kind in [k for k in KIND_ORDER if any(p.kind == k for p in patterns)] + sorted(
        {p.kind for p in patterns} - set(KIND_ORDER)
    ):
        rows = [p for p in patterns if p.kind == kind]
        lines.append(f"## {kind}\n")
        lines.append(KIND_TEXT.get(kind, "") + "\n")
        lines.append("| pattern | ATen ops matched | kernel | defined in |")
        lines.append("| --- | --- | --- | --- |")
        for p in rows:
            kernel = f"`{p.kernel}`" if p.lower_kernel is not None else f"`{p.kernel}` (reference form)"
            lines.append(f"| `{p.name}` | `{_chain(p)}` | {kernel} | `graphquant/{_source(p)}` |")
        lines.append("")
    lines.append(RULES)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run python docs/gen_coverage.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(PATTERNS)} patterns)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
