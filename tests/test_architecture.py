"""The library's shape: no import cycle among epalm/ modules, no dependency on the shard-builder tool or on
test code, and files of at most ~300 lines unless their docstring says why."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "epalm"
MAX_LINES = 300


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function (lazy imports count too)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from epalm import checkpoint`
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in LIB.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_cycle_in_the_library():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_library_imports_neither_the_builder_nor_tests():
    for path in LIB.rglob("*.py"):
        bad = {m for m in _imports(path) if m.split(".")[0] in ("data_shards", "tests", "bench")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_config_is_a_leaf():
    assert not {m for m in _imports(LIB / "config.py") if m.startswith("epalm")}


def test_library_files_are_short_or_say_why():
    for path in LIB.rglob("*.py"):
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert lines <= MAX_LINES or "lines" in doc, (
            f"{path.relative_to(ROOT)}: {lines} lines, no reason given"
        )


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The walk itself: two modules importing each other (one lazily) are reported."""
    pkg = tmp_path / "epalm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from epalm import b\n")
    (pkg / "b.py").write_text("def f():\n    from epalm.a import x\n")
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "ROOT", tmp_path)
    monkeypatch.setattr(this, "LIB", pkg)
    try:
        test_no_import_cycle_in_the_library()
    except AssertionError as e:
        assert "epalm.a -> epalm.b -> epalm.a" in str(e)
    else:
        raise AssertionError("cycle not found")


def test_no_file_imports_conftest_as_a_module():
    """conftest.py holds pytest fixtures and hooks only; what test modules import lives in testing/support.py."""
    for top in ("tests", "bench", "eval", "launch", "data_shards", "epalm"):
        for path in (ROOT / top).rglob("*.py"):
            bad = {m for m in _imports(path) if m.split(".")[-1] == "conftest" or ".conftest." in m}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
