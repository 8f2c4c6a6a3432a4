"""The tree shows the pipeline: the import graph and file sizes keep the stage rules.

Read from the source with ``ast`` (function-level imports count), so a change that
breaks a rule fails here before anyone has to notice it in review.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "converter"
MAX_LINES = 400
RUNTIME_BUDGET = 2500


def _module_name(path: Path, base: Path = ROOT) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(folder: Path, base: Path = ROOT) -> dict[str, Path]:
    """Our own modules under ``folder`` (not benchmarks/_work, where the benchmarks unpack llama.cpp)."""
    return {_module_name(p, base): p for p in sorted(folder.rglob("*.py"))
            if "_work" not in p.relative_to(folder).parts}


MODULES = _modules(PACKAGE)


def _imports(path: Path, name: str, known: dict[str, Path], top_level_only: bool = False) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement, at any depth."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out: list[tuple[str, list[str]]] = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [a.name for a in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            out += [(m, []) for m in submodules]
            out.append((base, [n for n in names if f"{base}.{n}" not in known]))
    return out


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: {m for m, _ in _imports(path, name, modules) if m in modules and m != name}
            for name, path in modules.items()}


GRAPH = _graph(MODULES)
# What merely importing a package runs: its __init__'s module-level imports (a PEP 562
# __getattr__ imports only when the attribute is asked for).
ON_IMPORT = {name: {m for m, _ in _imports(path, name, MODULES, top_level_only=True) if m in MODULES and m != name}
             for name, path in MODULES.items() if path.name == "__init__.py"}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _closure(start: str, graph: dict[str, set[str]]) -> set[str]:
    """Everything ``start`` may import (function-level imports included), parent packages' __init__ too."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += graph.get(m, ()) if m not in ON_IMPORT or m == start else ON_IMPORT[m]
        parent = m.rpartition(".")[0]
        if parent in MODULES:
            todo.append(parent)
    return seen


def test_no_import_cycles_in_the_package():
    assert _cycles(GRAPH) == []


def test_no_import_cycles_in_the_benchmarks():
    bench = _modules(ROOT / "benchmarks", ROOT / "benchmarks")
    assert _cycles(_graph(bench)) == []


def test_runtime_loader_stays_small_and_away_from_the_exporter():
    reach = _closure("converter.runtime", GRAPH)
    banned = [m for m in reach if m in ("converter.cli", "converter.card", "converter.pipeline")
              or m.startswith(("converter.export", "converter.hub", "converter.strategy", "converter.source.resolve",
                               "converter.source.run_dir", "converter.source.peft_adapter"))]
    assert banned == []
    lines = sum(len(MODULES[m].read_text(encoding="utf-8").splitlines()) for m in reach)
    assert lines < RUNTIME_BUDGET, sorted(reach)


@pytest.mark.parametrize("stage,banned", [
    ("converter.source", ("converter.strategy", "converter.sinks", "converter.export", "converter.hub", "converter.cli",
                          "converter.pipeline")),
    ("converter.strategy", ("converter.sinks", "converter.export", "converter.hub", "converter.cli")),
    ("converter.sinks", ("converter.export", "converter.hub", "converter.cli", "converter.card")),
])
def test_stages_import_only_earlier_stages(stage, banned):
    bad = [(m, dep) for m, deps in GRAPH.items() if m == stage or m.startswith(stage + ".")
           for dep in deps if dep.startswith(banned)]
    assert bad == []


def test_no_module_over_400_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def _private_imports(files: dict[str, Path], known: dict[str, Path]) -> list[str]:
    bad = []
    for name, path in files.items():
        for module, names in _imports(path, name, known):
            if not (module == "converter" or module.startswith("converter.")):
                continue
            bad += [f"{name}: from {module} import {n}" for n in names if n.startswith("_") and n != "__version__"]
            if module.rpartition(".")[2].startswith("_") and not module.endswith("__init__"):
                bad.append(f"{name}: import {module}")
    return bad


def test_no_private_name_imported_across_modules():
    tests = {f"tests.{p.stem}": p for p in (ROOT / "tests").rglob("*.py")}
    assert _private_imports(MODULES, MODULES) + _private_imports(tests, MODULES) == []


def test_one_house_style():
    """Relative imports inside the package, one error helper, See lines that point at what the user has."""
    problems = []
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("converter"):
                problems.append(f"{name}: absolute import of {node.module}")
            if isinstance(node, ast.Import) and any(a.name.startswith("converter") for a in node.names):
                problems.append(f"{name}: absolute import")
            if isinstance(node, ast.FunctionDef) and any(a.arg.startswith("_") for a in node.args.kwonlyargs + node.args.args
                                                         if a.arg not in ("self", "cls")):
                problems.append(f"{name}: {node.name}() takes a hidden parameter (a test hook?)")
        if re.search(r"https?://github\.com/efexport", text):
            problems.append(f"{name}: See line points at a repository that does not exist")
        if re.search(r"def _err\(|class \w+\(ValueError\)", text) and name != "converter.errors":
            problems.append(f"{name}: its own error helper")
        if "EFEXPORT_TEST" in text:
            problems.append(f"{name}: reads a test-only environment variable")
        if re.search(r"seed 000|run-format\.md|artifact-format\.md", text) and not re.search(
                r"docs/(run|artifact)-format\.md", text):
            problems.append(f"{name}: cites a document outside the repository")
    assert problems == []


def test_cited_documents_are_in_the_repository():
    cited = set()
    for path in MODULES.values():
        cited |= set(re.findall(r"docs/[\w-]+\.md", path.read_text(encoding="utf-8")))
    assert cited and all((ROOT / c).is_file() for c in cited), cited


def test_the_checker_sees_a_cycle_and_a_hidden_import():
    """The graph reader itself: a two-module cycle through a function-level import is found."""
    graph = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert _cycles(graph) == [["a", "b"]]
    assert "converter.loader" in GRAPH["converter"] or "converter.loaded" in GRAPH["converter"]


def test_see_lines_point_at_readme_sections_that_exist():
    """Every `See: docs: README.md#anchor` in the package names a heading README.md has."""
    headings = re.findall(r"^#+ (.+)$", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.M)
    anchors = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
    cited = set()
    for path in MODULES.values():
        cited |= set(re.findall(r"README\.md#([\w-]+)", path.read_text(encoding="utf-8")))
    assert cited and cited <= anchors, sorted(cited - anchors)
