"""The package's import structure: no cycles between workbench modules, and a transport that
does not depend on what runs over it.

Read statically with `ast`, so every import counts whether or not a test happens to execute it:
module-level ones and those inside functions (imports deferred into a function hide a cycle
rather than remove it). Imports under `if TYPE_CHECKING:` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "workbench"

# What an RPC server registers (probes, the time evaluator, the NNPACK bridge) lives beside the
# server entry point; the transport (devices, sessions, the local cluster) must not need it.
NOT_IN_TRANSPORT = ("workbench.ceilings", "workbench.measure", "workbench.nnpack")


# ---------------------------------------------------------------- the import graph

def package_modules(package_dir: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module and subpackage under package_dir."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([package, *parts])] = path
    return modules


def _is_package(modules: dict[str, Path], name: str) -> bool:
    return modules[name].name == "__init__.py"


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, modules: dict[str, Path]) -> dict[str, int]:
    """Package modules `name` imports -> line of the first such import.

    Importing a.b.c runs a, a.b and a.b.c; the packages enclosing `name` itself were already
    running before it started, so they add no edge unless a name is taken from one of them.
    """
    path = modules[name]
    here = name if _is_package(modules, name) else name.rpartition(".")[0]  # what `.` means
    own = _ancestors(name)
    found: dict[str, int] = {}

    def add(target: str, line: int, explicit: bool = False) -> None:
        for prefix in _prefixes(target):
            if prefix in modules and prefix != name and (prefix not in own or (explicit and prefix == target)):
                found.setdefault(prefix, line)

    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                if node.level - 1 >= len(base):
                    raise ValueError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source not in modules and not any(p in modules for p in _prefixes(source)):
                continue  # not ours
            submodules = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules]
            takes_names = len(submodules) < len(node.names)  # a name defined in `source` itself (or *)
            add(source, node.lineno, explicit=takes_names)
            for sub in submodules:
                add(sub, node.lineno)
    return found


def import_graph(package_dir: Path = PACKAGE_DIR, package: str = "workbench") -> dict[str, dict[str, int]]:
    modules = package_modules(package_dir, package)
    return {name: imports_of(name, modules) for name in modules}


def cyclic_groups(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """The groups of modules that import each other, directly or through others (Tarjan's SCCs)."""
    index, low, on_stack, stack, groups = {}, {}, set(), [], []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, {}):
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(groups, key=min)


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (as a closed path a -> ... -> a) for each group of modules that import each other."""
    return [_cycle_in(graph, group) for group in cyclic_groups(graph)]


def _cycle_in(graph: dict[str, dict[str, int]], group: set[str]) -> list[str]:
    """A shortest cycle through the group's first module (breadth-first within the group)."""
    start = min(group)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if nxt in group and nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


def chain(graph: dict[str, dict[str, int]], source: str, target: str) -> list[str] | None:
    """The shortest import chain source -> ... -> target, or None."""
    parents, frontier = {source: None}, [source]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph.get(node, {})):
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    if target not in parents:
        return None
    path = [target]
    while parents[path[-1]] is not None:
        path.append(parents[path[-1]])
    return path[::-1]


def _describe(graph, path: list[str]) -> str:
    steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(path, path[1:])]
    return "; ".join(steps)


# ---------------------------------------------------------------- the package

def test_workbench_modules_import_each_other_without_cycles():
    graph = import_graph()
    assert "workbench.rpc" in graph and "workbench.measure" in graph["workbench.compare"]  # the graph is real
    groups = cyclic_groups(graph)
    report = []
    for group in groups:
        cycle = _cycle_in(graph, group)
        report.append(f"  {' -> '.join(cycle)}   [{_describe(graph, cycle)}]")
        if len(group) > len(cycle) - 1:
            report.append(f"    (one of several cycles among: {', '.join(sorted(group))})")
    assert not groups, "import cycles between workbench modules:\n" + "\n".join(report)


def test_the_rpc_transport_does_not_import_what_servers_register():
    graph = import_graph()
    found = {target: path for target in NOT_IN_TRANSPORT if (path := chain(graph, "workbench.rpc", target))}
    assert not found, "workbench.rpc depends on modules a server registers:\n" + "\n".join(
        f"  {' -> '.join(path)}   [{_describe(graph, path)}]" for path in found.values())


# ---------------------------------------------------------------- the graph builder itself

FAKE_PACKAGE = {
    "__init__.py": "def lazy():\n    from .b import thing\n",
    "a.py": "import os\nfrom . import b\nfrom .kernels import fast\n",
    "b.py": "from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from .a import never\n"
            "def f():\n    from pkg import c\n    import pkg.kernels.fast\n",
    "c.py": "from pkg import lazy\n",
    "kernels/__init__.py": "from ..b import f\n",
    "kernels/fast.py": "from . import slow\nfrom .. import c\n",
    "kernels/slow.py": "import numpy\n",
}


@pytest.fixture
def fake_package(tmp_path):
    for rel, text in FAKE_PACKAGE.items():
        (tmp_path / "pkg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / rel).write_text(text)
    return import_graph(tmp_path / "pkg", "pkg")


def test_the_graph_resolves_relative_absolute_function_level_and_package_imports(fake_package):
    assert set(fake_package) == {"pkg", "pkg.a", "pkg.b", "pkg.c",
                                 "pkg.kernels", "pkg.kernels.fast", "pkg.kernels.slow"}
    assert set(fake_package["pkg"]) == {"pkg.b"}  # function-level
    assert set(fake_package["pkg.a"]) == {"pkg.b", "pkg.kernels", "pkg.kernels.fast"}  # a package runs first
    assert set(fake_package["pkg.b"]) == {"pkg.c", "pkg.kernels", "pkg.kernels.fast"}  # TYPE_CHECKING left out
    assert set(fake_package["pkg.c"]) == {"pkg"}  # a name taken from the top package
    assert set(fake_package["pkg.kernels"]) == {"pkg.b"}
    assert set(fake_package["pkg.kernels.fast"]) == {"pkg.kernels.slow", "pkg.c"}  # no edge to its own package
    assert fake_package["pkg.a"]["pkg.kernels.fast"] == 3


def test_cycles_and_chains_are_found_and_reported_as_paths(fake_package):
    cycles = find_cycles(fake_package)
    # pkg -> b -> c -> pkg, and b -> kernels -> b; one strongly connected group, reported once.
    assert len(cycles) == 1
    cycle = cycles[0]
    assert cycle[0] == cycle[-1] and len(cycle) >= 3
    assert all(b in fake_package[a] for a, b in zip(cycle, cycle[1:]))
    assert chain(fake_package, "pkg.kernels.slow", "pkg") is None
    assert chain(fake_package, "pkg.a", "pkg") == ["pkg.a", "pkg.b", "pkg.c", "pkg"]
    assert find_cycles({"x": {"y": 1}, "y": {}}) == []
    assert find_cycles({"x": {"x": 1}}) == [["x", "x"]]


def test_every_error_class_of_the_package_is_a_workbench_error():
    """The error contract: the command line prints a WorkbenchError as one line, so every error
    class the package defines for its users must be one."""
    import importlib
    import inspect

    from workbench.errors import WorkbenchError

    package = Path(__file__).resolve().parents[1] / "workbench"
    strays = []
    for path in sorted(package.rglob("*.py")):
        name = ".".join(("workbench", *path.relative_to(package).with_suffix("").parts)).removesuffix(".__init__")
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name and issubclass(cls, Exception) and not issubclass(cls, WorkbenchError):
                strays.append(f"{name}.{cls_name}")
    assert strays == []
