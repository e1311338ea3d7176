"""The layout holds: the library never imports the apps or the command line, nothing imports in a circle,
files stay small, and the README's layout names every part of the package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "volumes"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every volumes module ``path`` imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("cli", "apps") else "library"


def test_the_library_never_imports_the_apps_or_the_command_line():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        if name == "volumes.__main__":
            continue  # `python -m volumes` is the command line
        for target in _imports(path, modules):
            if (_layer(name), _layer(target)) in {("library", "cli"), ("library", "apps"), ("apps", "cli")}:
                upward.append(f"{name} -> {target}")
    assert upward == []


def test_no_module_imports_in_a_circle():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    # a package's __init__ re-exporting its submodules is not a cycle with them
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_no_file_is_long():
    """The library, the scripts, the MONAI Label app and the bundles' code: no file over 600 lines."""
    files = [p for folder in ("volumes", "scripts", "monailabel_app", "bundles") for p in (ROOT / folder).rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_readme_layout_names_every_part_of_the_package():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```\nvolumes/ .*?```", readme, re.S)
    assert block, "README.md has no layout block starting with 'volumes/'"
    text = block.group(0)
    parts = sorted(p.name + ("/" if p.is_dir() else "") for p in PACKAGE.iterdir()
                   if not p.name.startswith(("_", ".")) and (p.is_dir() or p.suffix == ".py"))
    missing = [part for part in parts if part.removesuffix(".py") not in text]
    assert missing == [], f"README layout does not mention {missing}"
    named = set(re.findall(r"^  (\w+)/", text, re.M))
    assert named <= {p.name for p in PACKAGE.iterdir() if p.is_dir()}, "README names folders that do not exist"


def test_the_monai_label_app_and_the_bundles_use_only_the_library():
    """The MONAI Label app and the bundles' configs call the library, never ``volumes.apps`` or the command line."""
    offenders = []
    for path in sorted((ROOT / "monailabel_app").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.startswith(("volumes.apps", "volumes.cli"))]
    for path in sorted((ROOT / "bundles").glob("*/configs/*.json")):
        found = re.findall(r"volumes\.(?:apps|cli)\.[\w.]+", path.read_text())
        offenders += [f"{path.relative_to(ROOT)}: {name}" for name in found]
    assert offenders == []
