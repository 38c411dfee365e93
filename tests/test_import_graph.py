"""The three rooms and their directions: the contract imports neither room, the operator and the trainer never import
each other, nothing ships that imports the dev tooling, and no module imports itself through others (lazy imports
inside functions count too: they are edges all the same)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOMS = {"finetune_api": REPO / "api", "finetune_operator": REPO / "operator", "finetune_trainer": REPO / "trainer"}
# package -> the project packages it may import
ALLOWED = {
    "finetune_api": {"finetune_api"},
    "finetune_operator": {"finetune_api", "finetune_operator"},
    "finetune_trainer": {"finetune_api", "finetune_trainer"},
}
PROJECT = {*ROOMS, "finetune_dev"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, module: str) -> set[str]:
    """Project modules that `path` imports, resolved to module names (relative imports included)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PROJECT}


def graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (`from pkg import name` counts as importing `pkg.name` when that is
    a module, else `pkg`)."""
    modules = {
        module_name(path, root): path for package, root in ROOMS.items() for path in (root / package).rglob("*.py")
    }

    def resolve(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rpartition(".")[0]
        return name

    def ancestors(name: str) -> set[str]:
        # A module's own parent packages are initialised before it, whatever it imports: not an edge of its own.
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))}

    return {
        name: {resolve(target) for target in imports_of(path, name)} - {name} - ancestors(name)
        for name, path in modules.items()
    }


def test_rooms_import_only_what_they_may():
    wrong = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if target.split(".")[0] not in ALLOWED[module.split(".")[0]]
    ]
    assert wrong == []


def test_no_shipped_module_imports_the_dev_tooling():
    offenders = [
        str(path.relative_to(REPO))
        for root in ROOMS.values()
        for path in root.rglob("*.py")
        if any(name.startswith("finetune_dev") for name in imports_of(path, module_name(path, root)))
    ]
    assert offenders == []


def test_no_import_cycles():
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append([*trail[trail.index(target) :], target])
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_the_launcher_imports_the_worker_not_the_entrypoint():
    edges = graph()
    assert "finetune_trainer.worker" in edges["finetune_trainer.ray_launcher"]
    assert not edges["finetune_trainer.ray_launcher"] & {"finetune_trainer.stage", "finetune_trainer.pipeline"}
