"""The architecture, checked: imports run downward only (README, Layout).

    common  <-  client | coordinator (Flower side) | coordinator/serving  <-  coordinator/cli, simulations

Every import statement of every module counts, also those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"common": "common", "client": "client", "coordinator": "coordinator", "simulations": "simulations"}


def room(module: str) -> str:
    """The room a dotted module name (without 'fedprefix.') lives in."""
    if module.startswith("coordinator.serving"):
        return "serving"
    if module.startswith("coordinator.cli"):
        return "cli"
    return module.split(".")[0]  # common, client, coordinator (the Flower side), simulations


ALLOWED = {
    "common": {"common"},
    "client": {"common", "client"},
    "coordinator": {"common", "coordinator"},
    "serving": {"common", "serving"},
    "cli": {"common", "client", "coordinator", "serving", "cli", "simulations"},
    "simulations": {"common", "client", "coordinator", "serving", "cli", "simulations"},
}


def modules() -> dict[str, Path]:
    """Dotted name (without 'fedprefix.') -> file, for every module of the package."""
    found = {}
    for folder in FOLDERS.values():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def project_imports(module: str, path: Path) -> set[str]:
    """The fedprefix modules `module` imports (relative imports resolved), without 'fedprefix.'."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add("fedprefix." + ".".join([*base, node.module] if node.module else base))
            elif node.module:
                names.add(node.module)
    return {n.removeprefix("fedprefix.") for n in names if n.startswith("fedprefix.")}


ALL = modules()


@pytest.mark.parametrize("module", sorted(ALL))
def test_imports_run_downward_only(module):
    here = room(module)
    wrong = sorted(name for name in project_imports(module, ALL[module]) if room(name) not in ALLOWED[here])
    assert not wrong, f"{module} ({here}) imports {wrong}; {here} may import only {sorted(ALLOWED[here])}"


def test_the_checker_sees_relative_and_lazy_imports(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("from .records import x\n\ndef f():\n    from fedprefix.client.node import y\n")
    assert project_imports("coordinator.probe", source) == {"coordinator.records", "client.node"}
    assert room("coordinator.serving.engine") == "serving" and room("coordinator.cli.store") == "cli"


def test_no_file_holds_two_rooms_worth_of_code():
    long = {name: n for name, path in ALL.items() if (n := len(path.read_text().splitlines())) > 450}
    assert not long, f"files past ~400 lines are usually two ideas: {long}"
