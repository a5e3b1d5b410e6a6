"""The package's shape, read from its source: three parts over a shared base, arrows only downward.

    5  lrinfer.cli, lrinfer.cli_kernels         command line: maps flags onto the pipeline
    4  lrinfer.pipeline                         compress -> evaluate -> save, as one call
    3  lrinfer.offline.*                        calibration, stages, compression loop, recipes
    2  lrinfer.evaluation.*                     perplexity, zero-shot, chat, benchmarks
    1  lrinfer.runtime.*                        LowRankLinear, checkpoint, loading, kernels, HF/vLLM
    0  lrinfer.errors / registry / factors / data / version

A module imports only from its own layer or below (imports inside functions count too), the
module graph has no cycles, no private name is imported from another module, and no module is
over 600 lines. The package root `lrinfer/__init__.py` is the public facade and may import any part.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lrinfer"
MAX_LINES = 600
BASE = {"lrinfer.errors", "lrinfer.registry", "lrinfer.factors", "lrinfer.data", "lrinfer.version"}
LAYERS = [("lrinfer.runtime", 1), ("lrinfer.evaluation", 2), ("lrinfer.offline", 3), ("lrinfer.pipeline", 4),
          ("lrinfer.cli", 5), ("lrinfer.cli_kernels", 5)]


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def layer(mod: str) -> int | None:
    """The layer of a module; None for the facade (the package root)."""
    if mod == "lrinfer":
        return None
    if mod in BASE:
        return 0
    for prefix, n in LAYERS:
        if mod == prefix or mod.startswith(prefix + "."):
            return n
    raise AssertionError(f"{mod} is in no layer: add it to BASE or LAYERS in {__file__}")


def _imports(mod: str) -> list[tuple[str, str | None, int]]:
    """(imported lrinfer module, imported name or None, line) for every import in `mod`, at any depth."""
    path = MODULES[mod]
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "lrinfer"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.split(".")[0] != "lrinfer":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, None, node.lineno) if sub in MODULES else (base, a.name, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}


def test_every_module_has_a_layer():
    for mod in MODULES:
        layer(mod)


def test_imports_point_down():
    upward = [f"{m}:{line} imports {t} (layer {layer(t)} > {layer(m)})"
              for m in MODULES if layer(m) is not None
              for t, _, line in _imports(m) if t in MODULES and (layer(t) is None or layer(t) > layer(m))]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):                     # Tarjan: strongly connected components of more than one module
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_cross_modules():
    crossing = [f"{m}:{line} imports {name} from {t}" for m in MODULES for t, name, line in _imports(m)
                if name and name.startswith("_") and not name.startswith("__") and t != m]
    assert not crossing, "\n".join(crossing)


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_module_size(mod):
    n = len(MODULES[mod].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[mod]} has {n} lines (> {MAX_LINES}): split it where its concepts part"


def test_checker_sees_a_planted_upward_import(tmp_path, monkeypatch):
    """The checker itself: an offline import inside a runtime function is found."""
    fake = tmp_path / "lrinfer" / "runtime" / "fake.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from lrinfer.offline import compress\n    from ..offline.plan import _gib\n")
    monkeypatch.setitem(MODULES, "lrinfer.runtime.fake", fake)
    found = _imports("lrinfer.runtime.fake")
    assert ("lrinfer.offline.compress", None, 2) in found and ("lrinfer.offline.plan", "_gib", 3) in found
    with pytest.raises(AssertionError, match="upward imports"):
        test_imports_point_down()
    with pytest.raises(AssertionError, match="_gib"):
        test_no_private_names_cross_modules()
