"""Imports go one way: jobs -> kava_dist -> cache_store (docs/ARCHITECTURE.md), kava_dist has no import cycle, and
the teacher-target contract (kava_dist/targets.py) stands below the student side (student, fused, step).

Every import statement counts, at module level or inside a function (parsed with `ast`, nothing is imported).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Known violations, as (importing file, imported module). This list must shrink to empty: fix the import, then
# delete its line here.
ALLOWED: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Absolute module names `path` imports; `from pkg import sub` counts as pkg.sub when that is a module."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:      # relative: resolve against the file's package
                base = _module_name(path).split(".")
                base = base[:len(base) - node.level + (path.name == "__init__.py")]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            subs = {f"{module}.{a.name}" for a in node.names} & known
            out.update(subs or {module})
    return out


def _violations(packages: tuple[str, ...], forbidden: tuple[str, ...]) -> set[tuple[str, str]]:
    out = set()
    for package in packages:
        for path in _modules(package).values():
            for name in _imports(path, set()):
                if name.split(".")[0] in forbidden:
                    out.add((str(path.relative_to(ROOT)), name))
    return out


def test_no_jobs_import_below_jobs():
    found = _violations(("kava_dist", "cache_store", "bench"), ("jobs",))
    assert found - ALLOWED == set(), "import the helper from kava_dist/cache_store instead of a job"


def test_store_knows_nothing_about_models():
    assert _violations(("cache_store",), ("kava_dist",)) - ALLOWED == set()


def test_allow_list_is_current():
    """A fixed violation leaves the allow-list: delete its line."""
    found = _violations(("kava_dist", "cache_store", "bench"), ("jobs",))
    found |= _violations(("cache_store",), ("kava_dist",))
    assert ALLOWED - found == set()


def test_targets_do_not_import_the_student_side():
    """The store's contract is read by the build and the loader; it never pulls in the student's passes."""
    found = _imports(ROOT / "kava_dist" / "targets.py", set(_modules("kava_dist")))
    assert found & {"kava_dist.student", "kava_dist.fused", "kava_dist.step", "kava_dist.passes"} == set()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_kava_dist():
    mods = _modules("kava_dist")
    known = set(mods)
    graph = {m: {d for d in _imports(p, known) if d in known and d != m} for m, p in mods.items()}
    assert _cycles(graph) == []


def test_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
