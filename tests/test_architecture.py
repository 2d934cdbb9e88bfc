"""The project's shape: no import cycle across its packages, a library that imports none of the tools or
tests, benchmarks and tests that share code only through `testing/`, a small root in `epalm/`, short files
(with an explicit, reasoned list of exceptions), and each shared fact defined in one module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "epalm"
# every package whose imports are checked; tests/ is a package too (test modules import its fixtures)
PACKAGES = ("epalm", "data_shards", "eval", "launch", "bench", "testing", "tests")
MAX_LINES = 300
MAX_ROOT_MODULES = 10
# Files allowed over MAX_LINES, each with why splitting it would not help a reader.
LONG_FILES = {
    "epalm/config.py": "the schema (a comment on every field) and the one pass that checks it read best together",
    "epalm/data/resumable.py": "the split, the mixing schedule, skip accounting and the DataLoader wrapper share "
    "one state and one resume contract",
    "epalm/data/stream.py": "opening, retrying, resuming and refusing members are one reader's rules",
    "testing/slurm_cluster.py": "one private SLURM's configuration, start, stop and demo job, in start-up order",
}


def _module_name(path: Path, root: Path | None = None) -> str:
    parts = path.relative_to(root or ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path | None = None) -> set[str]:
    """Every module `path` imports, at the top or inside a function (lazy imports count too)."""
    tree = ast.parse(path.read_text())
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
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


def _files(top: str, root: Path | None = None) -> list[Path]:
    return sorted(p for p in ((root or ROOT) / top).rglob("*.py") if "fault_hook" not in p.parts)


def _graph(root: Path | None = None, packages=PACKAGES) -> dict[str, set[str]]:
    modules = {_module_name(p, root): p for top in packages for p in _files(top, root)}
    return {
        name: {m for m in _imports(path, root) if m in modules and m != name}
        for name, path in modules.items()
    }


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_across_the_packages():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle(tmp_path):
    """The walk itself: two modules importing each other (one lazily) are reported."""
    pkg = tmp_path / "epalm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from epalm import b\n")
    (pkg / "b.py").write_text("def f():\n    from epalm.a import x\n")
    cycle = _find_cycle(_graph(tmp_path, ("epalm",)))
    assert cycle == ["epalm.a", "epalm.b", "epalm.a"]


def _importers(top: str, banned: tuple[str, ...]) -> list[str]:
    return [
        f"{p.relative_to(ROOT)} imports {sorted(bad)}"
        for p in _files(top)
        if (bad := {m for m in _imports(p) if m.split(".")[0] in banned})
    ]


def test_library_imports_none_of_the_tools_or_tests():
    assert not _importers("epalm", ("data_shards", "eval", "launch", "bench", "testing", "tests"))


def test_bench_and_tests_share_code_only_through_testing():
    """Arrows run one way: tests may run benchmarks (smoke tests), benchmarks never import tests, and the
    shared fixtures import neither."""
    assert not _importers("bench", ("tests",))
    assert not _importers("testing", ("tests", "bench"))
    assert not _importers("data_shards", ("tests", "bench", "testing", "eval", "launch"))


def test_config_is_a_leaf():
    assert not {m for m in _imports(LIB / "config.py") if m.startswith("epalm")}


def test_the_library_root_is_small():
    modules = sorted(p.name for p in LIB.glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= MAX_ROOT_MODULES, modules


def test_no_main_among_library_modules():
    """Runnables are thin `main(argv)`s in epalm/cli/ (or outside the library)."""
    for path in _files("epalm"):
        if "cli" in path.relative_to(LIB).parts:
            continue
        tree = ast.parse(path.read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert "main" not in names, f"{path.relative_to(ROOT)} defines main(); move it to epalm/cli/"


def test_files_are_short_or_listed():
    long = {}
    for top in ("epalm", "data_shards", "eval", "launch", "bench", "testing"):
        for path in _files(top):
            rel = str(path.relative_to(ROOT))
            if path.read_text().count("\n") > MAX_LINES and rel not in LONG_FILES:
                long[rel] = path.read_text().count("\n")
    assert not long, f"over {MAX_LINES} lines and not in LONG_FILES: {long}"
    stale = [f for f in LONG_FILES if (ROOT / f).read_text().count("\n") <= MAX_LINES]
    assert not stale, f"in LONG_FILES but short now: {stale}"


def _code(top_dirs=("epalm", "data_shards", "eval", "launch", "bench")) -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for top in top_dirs for p in _files(top)}


def _defined_in(pattern: str) -> list[str]:
    return sorted(f for f, text in _code().items() if re.search(pattern, text, re.M))


def test_each_shared_fact_is_defined_once():
    assert _defined_in(r"^\s*\w+\s*=\s*75\b") == ["epalm/exit_codes.py"]
    assert _defined_in(r"^\s*STOP_SIGNALS\s*=") == ["epalm/exit_codes.py"]
    assert _defined_in(r"=\s*-100\b") == ["epalm/data/text.py"]
    assert _defined_in(r"def broadcast_from_rank0|broadcast_object_list") == ["epalm/distributed.py"]
    assert _defined_in(r"^def (is_remote|shard_location)\b") == ["epalm/locations.py"]
    # the run directory's names: one module says them, everything else imports them
    names = ("metrics.jsonl", "summary.json", "best.json", "report.md", "ds_config.json", "run.lock")
    names += ("stopped_by_signal.json", "trainer_state.json", "checkpoint_manifest.json", "scores.json")
    names += ("trainable_state.pt",)
    for name in names:
        assert _defined_in(rf"[\"']{re.escape(name)}[\"']") == ["epalm/run/layout.py"], name
    quoted_dirs = r"/ [\"'](checkpoints|adapter|best|eval|tb)[\"']"
    assert not _defined_in(quoted_dirs), "run-dir folder names spelled out; use epalm.run.layout"
    # the loader's options read from a config in one place (training, the eval hook and eval.run call it)
    loader_options = (
        r"(answer_only|unsafe_members|max_skip_fraction|verify_checksums)=(cfg\.)?(data|model|[dm])\."
    )
    assert _defined_in(loader_options) == ["epalm/data/settings.py"]


def test_no_file_imports_conftest_as_a_module():
    """conftest.py holds pytest fixtures and hooks only; what tests import lives in testing/ or tests/."""
    for top in PACKAGES:
        for path in _files(top):
            bad = {m for m in _imports(path) if m.split(".")[-1] == "conftest" or ".conftest." in m}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
