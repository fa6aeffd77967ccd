"""The shape of the library: no import cycle (lazy and type-only imports counted), and the layer the Slicer panel and
`--help` use stays light (no torch, no MONAI)."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

LIBRARY = REPO / "RubikSSLLib"
LIGHT = ("config", "options", "taskspec", "cli", "jobs", "progress", "slicergeometry", "errors", "files", "rundir")


def import_graph() -> dict[str, set[str]]:
    """module -> the library modules it imports anywhere in its file."""
    modules = {}
    for path in LIBRARY.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("RubikSSLLib"):
                edges |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names}
        graph[name] = {e for e in edges if e in modules and e not in (name, "RubikSSLLib")}
    return graph


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for target in graph[todo.pop()] - seen:
                seen.add(target)
                todo.append(target)
        return seen

    assert len(graph) > 30
    assert [name for name in graph if name in reachable(name)] == []


def test_configs_and_the_command_line_parser_import_neither_torch_nor_monai() -> None:
    probe = ("import sys\n" + "".join(f"import RubikSSLLib.{name}\n" for name in LIGHT) +
             "from RubikSSLLib import cli\ncli.build_parser()\n"
             "from RubikSSLLib.config import PretrainConfig\nPretrainConfig.from_values({'data': ['x'], 'out': 'y', 'task': 'rpl'})\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'monai')))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert loaded.strip() == "[]"
