"""The package reads one way: spine -> dialect -> passes -> targets -> driver -> face.

The import graph is built from the source files with ``ast`` (top-level and
function-local imports alike, ``TYPE_CHECKING`` blocks included): no module may
import one above its layer, and there must be no import cycle.  ``lorafx.eval`` is
an application beside the layers: it may import anything, nothing else imports it.
"""
import ast
import fnmatch
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# where each installed package lives in the source tree (pyproject's package-dir)
PACKAGE_DIRS = {"lorafx": "lorafx", "lorafx.passes": "passes", "lorafx.hw_targets": "hw_targets"}

# Lowest first.  A module may import modules of its own layer or below.
LAYERS = [
    ("spine", ["lorafx.meta", "lorafx.options", "lorafx.context", "lorafx.graph_utils", "lorafx.schedules",
               "lorafx.capture", "lorafx.pipeline", "lorafx.printing", "lorafx._version", "lorafx.peft_names"]),
    ("dialect", ["lorafx.dialect", "lorafx.dialect.*", "lorafx.eager"]),
    ("passes", ["lorafx.passes", "lorafx.passes.*"]),
    # a target builds its lowering passes; a pass sees the target only through ctx.target
    ("targets", ["lorafx.hw_targets", "lorafx.hw_targets.*"]),
    ("driver", ["lorafx.compiler", "lorafx.compiled", "lorafx.adapter_io", "lorafx.reallocate", "lorafx.pruning", "lorafx.testing",
                "lorafx.training", "lorafx.program_io", "lorafx.materialize", "lorafx.adapters"]),
    ("face", ["lorafx", "lorafx.__main__", "lorafx.cli", "lorafx.inspect", "lorafx.models"]),
]
APPLICATION = ["lorafx.eval", "lorafx.eval.*"]


def source_modules() -> dict:
    """{module name: path} for every .py file of the installed packages."""
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, files in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            parts = [] if rel == "." else rel.split(os.sep)
            if any(p.startswith((".", "__pycache__")) for p in parts):
                continue
            prefix = ".".join([package, *parts])
            if prefix in PACKAGE_DIRS and prefix != package:
                continue  # a package mapped to its own folder (e.g. a lorafx/passes link)
            for name in files:
                if name.endswith(".py"):
                    module = prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"
                    out[module] = os.path.join(dirpath, name)
    return out


def imports_of(module: str, path: str, known: set) -> set:
    """The known modules ``module`` imports anywhere in its source."""
    tree = ast.parse(open(path).read(), path)
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rpartition(".")[0]
    found = set()

    def deepest(name: str):
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(deepest(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            for alias in node.names:
                full = f"{origin}.{alias.name}"
                found.add(full if full in known else deepest(origin))
    found.discard(None)
    found.discard(module)
    return found


def layer_of(module: str):
    for rank, (name, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return rank, name
    return None


def is_application(module: str) -> bool:
    return any(fnmatch.fnmatchcase(module, p) for p in APPLICATION)


MODULES = source_modules()
GRAPH = {m: imports_of(m, p, set(MODULES)) for m, p in MODULES.items()}


def test_the_packages_are_found():
    assert {"lorafx.compiler", "lorafx.passes.insert_lora", "lorafx.hw_targets", "lorafx.eval.harness"} <= set(GRAPH)
    assert "lorafx.pipeline" in GRAPH["lorafx.passes.insert_lora"]  # absolute and relative imports resolve
    assert "lorafx.compiled" in GRAPH["lorafx.compiler"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_has_a_layer(module):
    assert is_application(module) or layer_of(module) is not None, (
        f"{module} is in no layer: add it to LAYERS in tests/test_layers.py (and the README's layout)")


def test_no_module_imports_one_above_its_layer():
    upward = []
    for module, deps in GRAPH.items():
        if is_application(module):
            continue
        rank, name = layer_of(module)
        for dep in deps:
            if is_application(dep):
                upward.append(f"{module} ({name}) imports the application {dep}")
                continue
            dep_rank, dep_name = layer_of(dep)
            if dep_rank > rank:
                upward.append(f"{module} ({name}) imports {dep} ({dep_name})")
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def find_cycle(graph: dict):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep, stack)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m, [])
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_catches_an_upward_import_and_a_cycle():
    graph = {k: set(v) for k, v in GRAPH.items()}
    graph["lorafx.meta"].add("lorafx.compiler")  # spine -> driver, and compiler -> ... -> meta closes a loop
    assert layer_of("lorafx.compiler")[0] > layer_of("lorafx.meta")[0]
    assert find_cycle(graph) is not None
    # a function-local import counts like a top-level one
    source = "def f():\n    from lorafx.compiled import CompiledModel\n"
    path = os.path.join(os.path.dirname(__file__), "_layers_probe.py")
    try:
        with open(path, "w") as f:
            f.write(source)
        assert imports_of("lorafx.meta", path, set(MODULES)) == {"lorafx.compiled"}
    finally:
        os.remove(path)
