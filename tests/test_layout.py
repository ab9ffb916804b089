"""The library's layering, read from the source (no imports executed): what the architecture issue (#17) promises.

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
