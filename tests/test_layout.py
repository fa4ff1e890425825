"""The package layout keeps its layers: read from the source's own imports (AST), nothing is run.

pipeline/ never imports tools/ or train/; kernels/ imports neither; train/ never imports tools/; and
no two project modules import each other, directly or round a longer loop (imports inside functions
count too: a lazy import still ties the modules together)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "kernels", "train", "tools")


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "results" not in p.parts}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports (resolved to the longest known module name)."""
    out = set()
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


@pytest.mark.parametrize("low, high", [("pipeline", "tools"), ("pipeline", "train"), ("kernels", "pipeline"),
                                       ("kernels", "train"), ("kernels", "tools"), ("train", "tools")])
def test_lower_layers_do_not_import_higher_ones(graph, low, high):
    bad = sorted((m, t) for m, ts in graph.items() if m.split(".")[0] == low for t in ts if t.split(".")[0] == high)
    assert not bad, f"{low} -> {high} imports: {bad}"


def test_no_import_cycle(graph):
    """Tarjan's strongly connected components over the import graph, ignoring a package's __init__
    re-exporting its own sub-modules (that edge runs one way by construction)."""
    edges = {m: {t for t in ts if not (m and t.startswith(m + "."))} for m, ts in graph.items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_graph_sees_imports(graph):
    """The check can fail: the known edges are in the graph."""
    assert "pipeline.convert.engine" in graph["pipeline.convert.images"]
    assert "pipeline.format.jpeg" in graph["pipeline.convert.image_codec"]
    assert "train.models.norm" in graph["train.models.resnet"]
