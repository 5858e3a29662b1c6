"""Architecture rules of the ffnx package, read from the source (no import is executed).

* every import of every module (top-level and deferred ones inside functions) is read with
  ``ast``; the module graph of ``ffnx`` must have no cycle;
* no package module is over 400 lines;
* ``ffnx/runtime`` imports nothing from ``ffnx`` outside ``ffnx/runtime`` (it sits at the
  bottom: numpy + onnxruntime / TensorRT only).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ffnx"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted ``name`` that is a module of the package."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts = parts[:-1]
    return None


def imports_of(mod: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every ffnx module that ``mod`` imports, deferred and TYPE_CHECKING imports included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")
                if not is_pkg:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import sub` imports the submodule when there is one
            names = [
                f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix
                for a in node.names
            ]
        for n in names:
            if n.split(".")[0] != "ffnx":
                continue
            r = _resolve(n, modules)
            if r is not None and r != mod:
                out.add(r)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def edges(v: str) -> set[str]:
        return graph.get(v, set())

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges(v):
            if w not in index:
                strong(w)
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
                out.append(sorted(comp))

    import sys

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10000))
    try:
        for v in sorted(graph):
            if v not in index:
                strong(v)
    finally:
        sys.setrecursionlimit(old)
    return sorted(out)


def _in_runtime(mod: str) -> bool:
    return mod == "ffnx.runtime" or mod.startswith("ffnx.runtime.")


# leaf modules at the very bottom, beside the runtime: they import nothing from ffnx but each
# other (checked below), so the runtime may use them
BOTTOM = {"ffnx", "ffnx.errors", "ffnx.artifact"}


def test_reader_sees_deferred_and_relative_imports(tmp_path):
    """The reader itself: a deferred relative import inside a function is an edge."""
    modules = {m: tmp_path / f"{m}.py" for m in ("ffnx", "ffnx.a", "ffnx.b")}
    modules["ffnx.a"].write_text("def f():\n    from .b import g\n    return g\n")
    assert imports_of("ffnx.a", modules["ffnx.a"], modules) == {"ffnx.b"}
    assert find_cycles({"ffnx.a": {"ffnx.b"}, "ffnx.b": {"ffnx.a"}}) == [["ffnx.a", "ffnx.b"]]
    assert find_cycles({"ffnx.a": {"ffnx.b"}, "ffnx.b": set()}) == []


def test_no_import_cycle_between_modules():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_package_module_over_400_lines():
    lines = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    long = {m: n for m, n in lines.items() if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_runtime_imports_nothing_above_it():
    graph = import_graph()
    bad = {m: sorted(d for d in deps if not _in_runtime(d) and d not in BOTTOM)
           for m, deps in graph.items() if _in_runtime(m)}  # fmt: skip
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"ffnx.runtime imports from above it: {bad}"
    leaky = {m: sorted(graph[m] - BOTTOM) for m in BOTTOM if graph[m] - BOTTOM}
    assert not leaky, f"bottom modules import from above them: {leaky}"


def _folder(mod: str) -> str:
    """The layer a module belongs to: its first sub-package (`ffnx.passes.cleanup` ->
    `ffnx.passes`); top-level modules (`ffnx.cli`, `ffnx.artifact`) are their own unit."""
    parts = mod.split(".")
    return ".".join(parts[:2])


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m, deps in graph.items():
        out.setdefault(_folder(m), set()).update(
            _folder(d) for d in deps if _folder(d) != _folder(m)
        )
    return out


def test_no_import_cycle_between_folders():
    cycles = find_cycles(folder_graph(import_graph()))
    assert not cycles, "cycles between folders:\n" + "\n".join(" <-> ".join(c) for c in cycles)


# The layers, top to bottom: a folder imports only folders after it (README "Layout").
LAYERS = ["ffnx.cli", "ffnx.commands", "ffnx.bench", "ffnx.export", "ffnx.models", "ffnx.passes",
          "ffnx.compress", "ffnx.lowering", "ffnx.build", "ffnx.graph", "ffnx.plugins",
          "ffnx.runtime", "ffnx.artifact", "ffnx.errors", "ffnx"]  # fmt: skip


def test_folders_import_downwards_only():
    folders = folder_graph(import_graph())
    assert set(folders) <= set(LAYERS), f"folders not in LAYERS: {set(folders) - set(LAYERS)}"
    up = {f: sorted(d for d in deps if LAYERS.index(d) < LAYERS.index(f))
          for f, deps in folders.items()}  # fmt: skip
    up = {f: d for f, d in up.items() if d}
    assert not up, f"folders importing a layer above them: {up}"


def test_folder_reader_finds_a_folder_cycle():
    g = {"ffnx.a.x": {"ffnx.b.y"}, "ffnx.b.y": set(), "ffnx.b.z": {"ffnx.a.w"}, "ffnx.a.w": set()}
    assert find_cycles(g) == []
    assert find_cycles(folder_graph(g)) == [["ffnx.a", "ffnx.b"]]
