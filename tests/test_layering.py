"""Dependencies point one way: commands → app → api → engine, and measurement stays outside
the product. Checked on the import statements of the source (AST), and on what a server
process really imports."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set[str]:
    """Every module named by an import statement of the file, relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def offenders(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in modules(folder):
        bad = sorted(n for n in imports(path) if n.startswith(forbidden))
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        (
            "server/engine",
            (
                "server.api",
                "server.app",
                "server.commands",
                "server.cli",
                "server.config",
                "drafts",
                "measure",
                "fastapi",
            ),
        ),
        ("server/api", ("server.app", "server.commands", "server.cli", "drafts", "measure")),
        ("server", ("server.commands", "server.cli", "drafts", "measure")),
    ],
)
def test_imports_point_one_way(folder, forbidden):
    if folder == "server":  # the app and everything below it; commands and cli sit on top
        found = {
            p: b
            for p, b in offenders(folder, forbidden).items()
            if not p.startswith(("server/commands/", "server/cli.py"))
        }
    else:
        found = offenders(folder, forbidden)
    assert not found, f"imports against the direction commands → app → api → engine: {found}"


def test_drafts_never_import_measurement():
    assert not offenders("drafts", ("measure",))


def test_the_server_runs_without_the_measure_extra():
    """Importing the app and the serve command pulls in no plotting, progress-bar or
    process-memory library, nor the measurement or training packages."""
    code = (
        "import sys, server.cli, server.app, server.commands.serve, server.commands.generate; "
        "print(' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    loaded = {m.split(".")[0] for m in out}
    assert not loaded & {"matplotlib", "measure", "drafts", "psutil"}, loaded & {
        "matplotlib",
        "measure",
        "drafts",
        "psutil",
    }


def packages() -> list[str]:
    """The project's packages, as pyproject.toml ships them (`include = ["server*", ...]`)."""
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    return sorted(pattern.rstrip("*") for pattern in found["include"])


def _module_graph(folders: list[str]) -> dict[str, set[str]]:
    """Module -> the modules of `folders` it imports (at the top or inside a function)."""

    def name(path: Path) -> str:
        parts = path.relative_to(ROOT).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    paths = [p for folder in folders for p in modules(folder)]
    known = {name(p) for p in paths}
    graph = {}
    for path in paths:
        named = imports(path)
        # `from a.b import c`: the module a.b.c where it is one, else a.b
        graph[name(path)] = {
            n for n in named if n in known and not any(m.startswith(n + ".") and m in named for m in known)
        }
    return graph


def test_every_package_is_checked():
    assert packages() == ["drafts", "measure", "server"]


def test_no_import_cycles_in_any_package():
    """One graph over every package, so a cycle across packages counts too."""
    graph = _module_graph(packages())
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    assert not cycles, f"import cycles: {cycles}"
