"""The library's layering, read from the source (no imports executed): what docs/architecture.md promises.

* Every package of ``megatron_zero`` has a layer (:data:`LAYERS`); a module imports only from its own layer or
  below, at module level or inside a function, and neither the modules nor the packages import each other in a
  cycle. The core library never imports the development tooling (``megatron_zero_dev``) or ``tools``.
* ``megatron_zero/models/`` holds modules and specs only: no module under it imports ``checkpointing``,
  ``training``, ``evaluation``, ``inference`` or the method's steps at the top of the library (``grafting``,
  ``surrogate``), at module level or inside a function.
* Tools are thin command-line front ends: every ``tools/*.py`` is at most 150 lines (total lines, blank lines
  and docstrings included); their logic lives in the library.
"""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "megatron_zero")
FORBIDDEN_FROM_MODELS = ("megatron_zero.checkpointing", "megatron_zero.training", "megatron_zero.evaluation",
                         "megatron_zero.inference", "megatron_zero.grafting", "megatron_zero.surrogate",
                         "megatron_zero.analysis")
MAX_TOOL_LINES = 150

# docs/architecture.md: higher layers import lower ones, never the reverse.
LAYERS = {
    "platform": 0,                                    # what this machine can do; megatron-core's fixes
    "errors": 1, "config": 1,                         # error classes and the error boundary; the typed run config
    "parallel": 2, "data": 2, "loss": 2,
    "models": 3,
    "checkpointing": 4, "inference": 4,
    "training": 5, "evaluation": 5, "arguments": 5,
    "surrogate": 6, "grafting": 6, "analysis": 6, "zero_import": 6,  # the method
    "launcher": 7,                                    # entry-point helper
}
# Import edges that break the layering today, each owned by a parallel branch of issue #25 that removes it; the
# integrator deletes an entry once that branch is merged (the test fails on an entry that no longer exists).
KNOWN_VIOLATIONS: set = set()


def imported_modules(path: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in a file, relative imports resolved."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module))
            # ``from megatron_zero import grafting`` imports the submodule
            out.extend((node.lineno, f"{module}.{a.name}") for a in node.names)
    return out


def _python_files(root: str):
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def test_import_walker_sees_function_level_and_relative_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\nfrom . import sibling\n\ndef f():\n    from megatron_zero.checkpointing import hf_llama\n")
    mods = [m for _, m in imported_modules(str(src), "megatron_zero.models")]
    assert "megatron_zero.checkpointing.hf_llama" in mods and "megatron_zero.models.sibling" in mods


def test_models_import_no_checkpointing_training_evaluation_inference():
    models = os.path.join(PACKAGE, "models")
    edges = []
    for path in _python_files(models):
        rel = os.path.relpath(path, REPO)
        for line, module in imported_modules(path, "megatron_zero.models"):
            if module.startswith(FORBIDDEN_FROM_MODELS):
                edges.append(f"{rel}:{line} imports {module}")
    assert not edges, "models/ must hold modules and specs only:\n" + "\n".join(edges)


@pytest.mark.parametrize("tool", sorted(f for f in os.listdir(os.path.join(REPO, "tools")) if f.endswith(".py")
                                        and f != "__init__.py"))
def test_tools_are_thin(tool):
    with open(os.path.join(REPO, "tools", tool)) as f:
        lines = len(f.read().splitlines())
    assert lines <= MAX_TOOL_LINES, f"tools/{tool} has {lines} lines (> {MAX_TOOL_LINES}): move its logic to the library"


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """megatron_zero's modules -> the megatron_zero modules they import (module level and inside functions)."""
    paths = {_module_name(p): p for p in _python_files(PACKAGE)}
    graph = {}
    for name, path in paths.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        deps = set()
        for _, module in imported_modules(path, package):
            while module and module not in paths:
                module = module.rpartition(".")[0]
            if module and module not in (name, "megatron_zero"):
                deps.add(module)
        graph[name] = deps
    return graph


def _layer(module: str) -> str:
    return module.split(".")[1]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _without_known(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    known = {(a, b) for pair in KNOWN_VIOLATIONS for a, b in (pair, pair[::-1])}
    return {m: {d for d in deps if (m, d) not in known} for m, deps in graph.items()}


def test_every_package_has_a_layer():
    layers = {_layer(m) for m in import_graph() if m != "megatron_zero"}
    assert not layers - set(LAYERS), f"give {sorted(layers - set(LAYERS))} a layer in LAYERS and docs/architecture.md"
    assert not set(LAYERS) - layers, f"{sorted(set(LAYERS) - layers)} no longer exist: remove them from LAYERS"


def test_layers_import_only_downwards():
    graph = _without_known(import_graph())
    upward = [f"{m} ({_layer(m)}, layer {LAYERS[_layer(m)]}) imports {d} ({_layer(d)}, layer {LAYERS[_layer(d)]})"
              for m, deps in sorted(graph.items()) if m != "megatron_zero" for d in sorted(deps)
              if LAYERS[_layer(d)] > LAYERS[_layer(m)]]
    assert not upward, "lower layers never import higher ones (docs/architecture.md):\n" + "\n".join(upward)


def test_no_import_cycles_between_modules_or_packages():
    graph = _without_known(import_graph())
    assert not _cycles(graph), f"module import cycles: {_cycles(graph)}"
    packages = {}
    for m, deps in graph.items():
        for d in deps:
            if m != "megatron_zero" and _layer(m) != _layer(d):
                packages.setdefault(_layer(m), set()).add(_layer(d))
    assert not _cycles(packages), f"package import cycles: {_cycles(packages)}"


def test_known_violations_still_exist():
    """An allow-list entry whose import is gone must be deleted (so the list only shrinks)."""
    graph = import_graph()
    gone = [pair for pair in sorted(KNOWN_VIOLATIONS) if pair[1] not in graph.get(pair[0], set())
            and pair[0] not in graph.get(pair[1], set())]
    assert not gone, f"remove from KNOWN_VIOLATIONS (fixed): {gone}"


def test_cycle_finder():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_core_library_does_not_import_dev_tooling_or_tools():
    edges = [f"{os.path.relpath(p, REPO)}:{line} imports {m}" for p in _python_files(PACKAGE)
             for line, m in imported_modules(p, _module_name(p).rpartition(".")[0])
             if m.split(".")[0] in ("megatron_zero_dev", "tools")]
    assert not edges, "\n".join(edges)
