"""The package's shape: no module imports another that (directly or through others) imports it back,
counting imports inside functions too (a late import that dodges a cycle is still a cycle); below the run layer no
function takes the whole config (typed objects of configs.py or plain arguments) and nothing imports the run layer."""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "propetl"
BELOW_THE_RUN = ("propetl.storage", "propetl.models", "propetl.data", "propetl.methods")
RUN_LAYER = ("propetl.run", "propetl.cli")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def propetl_imports(path: Path, modules: set[str]) -> set[str]:
    """The propetl modules `path` imports anywhere, except under `if __name__ == "__main__":` (run as a script,
    the module is __main__, not itself: no cycle). `from propetl import x` counts propetl.x."""
    tree = ast.parse(path.read_text())
    tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("propetl"):
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("propetl")}
    own = module_name(path)
    return {m for m in found if m in modules and m != "propetl" and m != own and not own.startswith(m + ".")}


def import_graph() -> dict[str, set[str]]:
    paths = [p for p in PACKAGE.rglob("*.py") if "conf" not in p.relative_to(PACKAGE).parts]
    modules = {module_name(p) for p in paths}
    return {module_name(p): propetl_imports(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}                  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 20 and graph["propetl.run.train"] >= {"propetl.run.lifecycle", "propetl.data.multitask"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def whole_config_parameters(module) -> list[str]:
    """`module.function(parameter)` of every function or method defined in `module` whose parameter is named cfg or
    annotated DictConfig."""
    found = []
    for name, thing in vars(module).items():
        if getattr(thing, "__module__", None) != module.__name__:
            continue
        functions = [(name, thing)] if inspect.isfunction(thing) else []
        if inspect.isclass(thing):
            functions = [(f"{name}.{n}", f) for n, f in vars(thing).items() if inspect.isfunction(f)]
            functions += [(f"{name}.{n}", f.__func__) for n, f in vars(thing).items() if isinstance(f, classmethod)]
        for label, function in functions:
            for parameter in inspect.signature(function).parameters.values():
                if parameter.name == "cfg" or "DictConfig" in str(parameter.annotation):
                    found.append(f"{module.__name__}.{label}({parameter.name})")
    return found


def modules_of(package: str) -> list[str]:
    path = importlib.import_module(package).__path__
    return [package, *(f"{package}.{info.name}" for info in pkgutil.iter_modules(path))]


@pytest.mark.parametrize("package", BELOW_THE_RUN)
def test_no_function_below_the_run_layer_takes_the_whole_config(package):
    found = [f for name in modules_of(package) for f in whole_config_parameters(importlib.import_module(name))]
    assert len(modules_of(package)) >= 2
    assert not found, f"take typed objects (propetl/configs.py) or plain arguments: {found}"


def test_the_signature_check_finds_a_whole_config(tmp_path, monkeypatch):
    (tmp_path / "layered_example.py").write_text(
        "from omegaconf import DictConfig\n"
        "def plain(hidden: int): ...\n"
        "def named(cfg): ...\n"
        "class Model:\n"
        "    def __init__(self, setup: 'DictConfig | None'): ...\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("layered_example")
    assert whole_config_parameters(module) == ["layered_example.named(cfg)", "layered_example.Model.__init__(setup)"]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each module below the run layer that reaches the run layer, directly or through other modules, as its chain of
    imports to the nearest run-layer module (breadth-first)."""
    found = []
    for start in sorted(m for m in graph if m.startswith(BELOW_THE_RUN)):
        came_from: dict[str, str | None] = {start: None}
        queue = [start]
        for module in queue:  # grows while it is read
            if module.startswith(RUN_LAYER):
                chain = [module]
                while (previous := came_from[chain[0]]) is not None:
                    chain.insert(0, previous)
                found.append(" -> ".join(chain))
                break
            for target in sorted(graph[module] - came_from.keys()):
                came_from[target] = module
                queue.append(target)
    return found


def test_no_package_below_the_run_layer_imports_the_run_layer():
    graph = import_graph()
    assert len([m for m in graph if m.startswith(BELOW_THE_RUN)]) > 10 and "propetl.run.train" in graph
    assert not (found := upward_imports(graph)), f"imports flow downward: {found}"


def test_the_upward_import_check_follows_other_modules():
    graph = {"propetl.storage.a": {"propetl.validate"}, "propetl.validate": {"propetl.run.log"}, "propetl.run.log": set()}
    assert upward_imports(graph) == ["propetl.storage.a -> propetl.validate -> propetl.run.log"]
    assert upward_imports({"propetl.storage.a": {"propetl.validate"}, "propetl.validate": set()}) == []
