"""The package's architecture (DESIGN.md, "Layout"): layers that only import downwards, no import
cycles, no private names across modules, and a Lightning-free core."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "samtrain"

# Floors, lowest first: a module imports only from its own floor's package or from lower floors.
FLOORS = {
    "samtrain.frame": 0,
    "samtrain.distributed": 0,
    "samtrain.models": 1,
    "samtrain.interactive": 2,
    "samtrain.data": 3,
    "samtrain.visualize": 3,
    "samtrain.plots": 3,
    "samtrain.inference": 4,
    "samtrain.lightning": 5,
    "samtrain.commands": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported samtrain module, names taken from it, line) for every import of a file, at module
    level or inside functions alike. ``from pkg import sub`` counts as importing ``pkg.sub``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [
                (alias.name, [], node.lineno) for alias in node.names if alias.name.startswith("samtrain")
            ]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("samtrain"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append(
                    (sub, [], node.lineno) if sub in known else (node.module, [alias.name], node.lineno)
                )
    return found


def floor_of(module: str) -> tuple[str, int] | None:
    for prefix, floor in FLOORS.items():
        if module == prefix or module.startswith(prefix + "."):
            return prefix, floor
    return None


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: {target for target, _, _ in imports(path, set(known))} & set(known)
        for name, path in known.items()
    }


def test_every_module_has_a_floor():
    assert not [m for m in modules() if m != "samtrain" and floor_of(m) is None]


def test_layers_only_import_downwards():
    known = modules()
    upward = []
    for name, path in known.items():
        here = floor_of(name)
        if here is None:
            continue
        for target, _, line in imports(path, set(known)):
            there = floor_of(target)
            if there is None or there[0] == here[0]:
                continue
            if there[1] >= here[1]:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_no_private_names_across_modules():
    known = modules()
    private = [
        f"{path.relative_to(ROOT)}:{line} takes {names} from {target}"
        for path in known.values()
        for target, names, line in imports(path, set(known))
        if any(n.startswith("_") for n in names)
    ]
    assert not private, "\n".join(private)


def test_the_interaction_core_models_and_data_load_no_lightning():
    code = (
        "import sys; import samtrain.interactive, samtrain.models, samtrain.data, samtrain.frame, "
        "samtrain.distributed; print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pytorch_lightning', 'lightning', 'lightning_fabric')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
