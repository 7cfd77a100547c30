"""The house in wings: every module imports only from its own wing or from a wing below it, and no two
modules import each other, directly or round a circle. Imports inside functions count, and so does a
``"festival_serve.x.y:attribute"`` string (the stage table and the serve config name code that way).

The allowed directions are written once, here, as floors from the top of the import graph down; wings on
one floor are siblings and do not import each other (``serving`` runs the request, ``models`` the math).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("festival_serve", "deployments", "graphs")

#: Top floor first. A module may import its own wing and any wing on a lower floor, never one above it
#: or a sibling on its own floor. ``festival_serve`` itself (its ``__init__``: ``DATA_DIR``) is below them all.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("festival_serve.cli",),
    ("festival_serve.measure",),
    ("festival_serve.ops",),
    ("festival_serve.training",),
    ("festival_serve.world",),
    ("graphs",),
    ("deployments",),
    ("festival_serve.serving", "festival_serve.models"),
    ("festival_serve.pipeline",),
    ("festival_serve.runtime",),
    ("festival_serve",),
)

#: The one place a lower floor may name a higher one: the stage table names each stage's loader and network
#: sources by ``"module:attribute"`` string, imported only when a loader is called (that is what the table is for).
#: A real import statement from it to the models still fails.
LATE_BOUND: dict[str, str] = {"festival_serve.pipeline.stages": "festival_serve.models"}

_CODE_STRING = re.compile(r"^((?:festival_serve|deployments|graphs)(?:\.\w+)+):\w+$")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _known(name: str) -> str | None:
    """The longest prefix of a dotted name that is one of our modules (``a.b.func`` → ``a.b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imported(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)  # a module, or a name in ``base``
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _CODE_STRING.match(node.value):
            named = _known(_CODE_STRING.match(node.value)[1])
            if not (module in LATE_BOUND and named and _inside(named, LATE_BOUND[module])):
                names.add(named)
    return {_known(name) for name in names} - {None, module}


def _inside(module: str, wing: str) -> bool:
    return module == wing or module.startswith(wing + ".")


IMPORTS: dict[str, set[str]] = {module: _imported(module, path) for module, path in MODULES.items()}


def floor_of(module: str) -> tuple[int, str]:
    """(floor, wing) of a module: the wing is the longest name of FLOORS that the module is or is inside."""
    best = None
    for level, wings in enumerate(FLOORS):
        for wing in wings:
            if _inside(module, wing) and (best is None or len(wing) > len(best[1])):
                best = (level, wing)
    assert best is not None, f"{module} is in no wing of FLOORS"
    return best


def test_every_module_is_in_a_wing_and_the_root_holds_only_the_cli():
    loose = sorted(m for m in MODULES if m.count(".") == 1 and m.startswith("festival_serve.")
                   and floor_of(m)[1] == "festival_serve")
    assert loose == [], f"modules outside every wing (move them into one): {loose}"


def test_imports_run_downward_only():
    upward = []
    for module, imports in sorted(IMPORTS.items()):
        level, wing = floor_of(module)
        for target in sorted(imports):
            target_level, target_wing = floor_of(target)
            if target_wing == wing or target_level > level or target_wing == "festival_serve":
                continue
            upward.append(f"{module} ({wing}) -> {target} ({target_wing})")
    assert upward == [], "imports that run up or sideways:\n" + "\n".join(upward)


def _circles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in IMPORTS.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(IMPORTS):
        if module not in index:
            visit(module)
    return groups


def _without_package_inits(imports: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's ``__init__`` re-exporting its own modules is not a circle with them."""
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    return {m: {t for t in targets if not (m in packages and t.startswith(m + "."))} for m, targets in imports.items()}


def test_no_import_circles():
    global IMPORTS
    saved, IMPORTS = IMPORTS, _without_package_inits(IMPORTS)
    try:
        circles = _circles()
    finally:
        IMPORTS = saved
    assert circles == [], f"modules that import each other: {circles}"


def test_the_checker_sees_an_upward_import_and_a_circle():
    """The rule is real: a model module importing the HTTP module, or two modules importing each other, fails."""
    level, _ = floor_of("festival_serve.models.sign_detector.detector")
    assert floor_of("festival_serve.serving.http")[0] == level  # siblings: neither may import the other
    assert floor_of("festival_serve.measure.evaluate")[0] < floor_of("festival_serve.world.scores")[0]
    global IMPORTS
    saved = IMPORTS
    IMPORTS = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    try:
        assert _circles() == [["a", "b", "c"]]
    finally:
        IMPORTS = saved
