"""The import structure of ``src/dpokit``: one-way layers, no cycles, no private reach-ins.

Every module is parsed with ``ast`` and EVERY import is collected, the ones inside functions (and
under ``if TYPE_CHECKING``) included, so a cycle cannot hide in a deferred import. The layers and
what each may import are described in docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "dpokit"

# Layer of a module = the first name under dpokit (``dpokit.steps.kto`` -> ``steps``). Every layer
# not named here (data, losses, logprobs, reference, config, modeling, ...) is a foundation: it
# sits below the per-batch steps. The package root ``dpokit`` is the public facade, above all.
UPPER = ("steps", "engine", "recipes", "cli", "demo")
FORBIDDEN = {
    "steps": {"engine", "recipes", "cli", "demo"},
    "engine": {"recipes", "cli", "demo"},
    "recipes": {"cli", "demo"},
    "demo": {"cli"},
    "cli": set(),  # the top: the command line may use every layer
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


MODULES = modules()


def imports(name: str) -> list[tuple[str, str | None, int]]:
    """(imported dpokit module, imported name or None, line) for every import in module ``name``.

    ``from pkg import x`` counts as an import of the module ``pkg.x`` when that is a module, else
    of ``pkg`` with the name ``x``. Relative imports are resolved.
    """
    path = MODULES[name]
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    found.append((alias.name, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in MODULES:
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    return {name: {target for target, _, _ in imports(name)} for name in MODULES}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_every_module_is_seen_and_imports_resolve():
    assert {"dpokit.engine", "dpokit.steps", "dpokit.recipes", "dpokit.cli"} <= set(MODULES)
    for name in MODULES:
        for target, _, line in imports(name):
            assert target in MODULES, f"{name}:{line} imports {target}, which is not a module"


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_private_names_imported_across_modules():
    offenders = [
        f"{name}:{line} imports {imported} from {target}"
        for name in MODULES
        for target, imported, line in imports(name)
        if imported is not None and imported.startswith("_") and target != name
    ]
    assert offenders == []


def forbidden(lower: str) -> set[str]:
    """The layers a module of layer ``lower`` must not import."""
    if lower in FORBIDDEN:
        return FORBIDDEN[lower]
    return set() if lower == "" else set(UPPER)


@pytest.mark.parametrize("lower", sorted({layer(name) for name in MODULES} - {""}))
def test_layers_point_one_way(lower):
    offenders = [
        f"{name}:{line} imports {target}"
        for name in MODULES
        if layer(name) == lower
        for target, _, line in imports(name)
        if layer(target) in forbidden(lower)
    ]
    assert offenders == []


def test_the_foundations_include_data_losses_logprobs():
    for below in ("data", "losses", "logprobs", "reference"):
        assert forbidden(below) == set(UPPER)


def test_nothing_imports_the_cli():
    offenders = [
        f"{name}:{line}"
        for name in MODULES
        for target, _, line in imports(name)
        if layer(target) == "cli" and layer(name) != "cli"
    ]
    assert offenders == []


def test_no_module_getattr_or_globals_tricks():
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        top = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert "__getattr__" not in top, f"{name} defines a module __getattr__"
        calls = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "globals"
        ]
        assert calls == [], f"{name} calls globals()"


def test_the_checks_catch_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_table_names_exactly_the_steps_and_recipes_that_exist():
    # The losses layer cannot import steps/ or recipes/: it lists their names, and this keeps the
    # lists honest. Every method's step and recipe exists.
    from dpokit.losses import METHODS
    from dpokit.losses.registry import RECIPE_KINDS, STEP_KINDS
    from dpokit.recipes import RECIPES
    from dpokit.steps import STEPS

    assert set(STEP_KINDS) == set(STEPS) and set(RECIPE_KINDS) == set(RECIPES)
    for spec in METHODS.values():
        assert spec.step in STEPS and (spec.recipe is None or spec.recipe in RECIPES)
        assert (spec.recipe is None) == (spec.stage_count is None)
