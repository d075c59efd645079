"""The package's import structure: the core stays light, never reaches into the plugin or pipeline
packages, and has no import loops."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sphinx_tools"
# The packages pyproject.toml maps into the namespace from the repo's plugins/ and pipelines/.
OUTSIDE = ("sphinx_tools.plugins", "sphinx_tools.pipelines")
# The demo model's quality measurement runs the labeling pipeline on purpose: it measures what
# `sphinx-tools label` produces. It is an entry point (python -m sphinx_tools.demo quality) that
# only that command's dispatcher imports (checked below); the oracle-token diagnostic (python -m
# sphinx_tools.demo oracle) takes the same measures, so it is one too.
MEASUREMENTS = {"sphinx_tools.demo.quality", "sphinx_tools.demo.oracle"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in PACKAGE.rglob("*.py")}


def _imports(name: str, tree: ast.Module, modules) -> set[str]:
    "Every module ``name`` imports, at the top or inside a function, with relative names resolved."
    package = name if _is_package(name) else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` imports pkg.submodule
                full = f"{base}.{alias.name}"
                found.add(full if full in modules or full.startswith(OUTSIDE) else base)
        elif isinstance(node, ast.Call):  # importlib.import_module("..."), __import__("...")
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__", "spec_from_file_location") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.add(arg.value)
    return found


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()


def test_importing_the_package_and_a_task_loads_no_torch_and_no_pipeline():
    code = (
        "import json, sys\n"
        "import sphinx_tools, sphinx_tools.demo\n"
        "task = sphinx_tools.get_task('detection')\n"
        "assert task.parse('[0.10,0.20,0.30,0.40]', (100, 100)).xyxy.shape == (1, 4)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith("
        "('torch.', 'sphinx_tools.pipelines')))))\n"
    )
    env = {**os.environ, "SPHINX_TOOLS_LOAD_PLUGINS": "none"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_core_never_imports_plugins_or_pipelines():
    modules = _modules()
    offenders = {
        name: sorted(i for i in _imports(name, tree, modules) if i.startswith(OUTSIDE))
        for name, tree in modules.items()
        if name not in MEASUREMENTS
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    # no string in the core's code names those packages either (a path handed to importlib)
    for name, tree in modules.items():
        if name in MEASUREMENTS:
            continue
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                      and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docstrings:
                assert not any(o in node.value for o in OUTSIDE), (name, node.value)


def test_only_the_demo_command_imports_the_measurements():
    modules = _modules()
    importers = {name for name, tree in modules.items()
                 if _imports(name, tree, modules) & MEASUREMENTS}
    assert importers <= {"sphinx_tools.demo.__main__"} | MEASUREMENTS


def _loops(inside: str) -> set[str]:
    "The modules under ``inside`` that reach themselves by following imports (lazy ones too)."
    modules = _modules()
    graph = {
        name: {i for i in _imports(name, tree, modules) if i in modules and i != "sphinx_tools"}
        for name, tree in modules.items()
        if name != "sphinx_tools"  # the package façade re-exports; its modules never need it
    }
    looping = set()
    for start in (n for n in graph if n == inside or n.startswith(inside + ".")):
        seen, todo = set(), list(graph[start])
        while todo:
            current = todo.pop()
            if current == start:
                looping.add(start)
                break
            if current not in seen:
                seen.add(current)
                todo.extend(graph.get(current, ()))
    return looping


def test_the_core_has_no_import_loops():
    "The runtime, the task framework, finetuning and the demo model: no module reaches itself."
    assert _loops("sphinx_tools") == set()
