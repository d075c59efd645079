"""The plugin manager, plugin loading, the task registry and the ``sphinx-tools tasks`` command.

Plugins come from the entry-point group ``sphinx_tools``; the built-in tasks are declared there
too (``pyproject.toml``) and are also registered from ``DEFAULT_PLUGINS`` when their entry points
are missing (a source checkout that is not installed). ``SPHINX_TOOLS_LOAD_PLUGINS`` controls
third-party plugins, like llm's ``LLM_LOAD_PLUGINS``:

- unset: load every installed plugin;
- ``""`` or ``"none"``: load none (built-ins are always loaded);
- ``"pkg-a,pkg-b"``: load only these distributions (or entry-point names).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import threading
import warnings
from pathlib import Path

import click
import pluggy

from sphinx_tools import hookspecs
from sphinx_tools.errors import UnknownTaskError
from sphinx_tools.tasks import Task, type_name

ENTRY_POINT_GROUP = "sphinx_tools"
LOAD_PLUGINS_ENV = "SPHINX_TOOLS_LOAD_PLUGINS"
BUILTIN_PACKAGE = "sphinx_tools.plugins"
DEFAULT_PLUGINS = tuple(
    f"{BUILTIN_PACKAGE}.{name}"
    for name in (
        "rec",
        "reg",
        "grounded_caption",
        "detection",
        "pose",
        "ocr",
        "relation",
        "layout",
        "caption",
    )
) + ("sphinx_tools.pipelines.autolabel", "sphinx_tools.pipelines.webapp")

pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
pm.add_hookspecs(hookspecs)

_loaded = False
_load_lock = threading.RLock()
_plugin_info: dict[str, dict] = {}  # plugin name -> {"distribution", "version", "builtin"}


# -- loading ---------------------------------------------------------------------------------------
def load_plugins(reload: bool = False) -> None:
    """Register the built-in task plugins and the allowed third-party ones (once per process).

    Args:
        reload: scan entry points again (e.g. after installing a plugin or changing the env var);
            plugins already registered stay registered.
    """
    global _loaded
    with _load_lock:  # threads asking for tasks at once wait for one complete load
        if _loaded and not reload:
            return
        _loaded = True
        _load()


def _load() -> None:
    allow = _allowlist()
    builtin, third_party = [], []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        is_builtin = ep.value.split(":")[0].startswith(BUILTIN_PACKAGE + ".")
        (builtin if is_builtin else third_party).append(ep)
    for ep in builtin:  # built-ins first, so a third-party task of the same name overrides them
        _register_entry_point(ep, builtin=True)
    _register_defaults()
    for ep in third_party:
        dist_name = ep.dist.metadata["Name"] if getattr(ep, "dist", None) is not None else ""
        if allow is None or {_norm(dist_name), _norm(ep.name)} & allow:
            _register_entry_point(ep, builtin=False)


def _register_entry_point(ep, builtin: bool) -> None:
    try:
        plugin = ep.load()
    except Exception as exc:  # one broken plugin must not take the others down
        warnings.warn(
            f"sphinx_tools plugin {ep.name!r} ({ep.value}) failed to load: {exc!r}",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    if pm.is_registered(plugin):
        return
    dist = getattr(ep, "dist", None)
    name = ep.name
    if pm.get_plugin(name) is not None:  # two distributions chose the same entry-point name
        name = f"{dist.metadata['Name'] if dist is not None else ep.value}:{ep.name}"
    pm.register(plugin, name=name)
    _plugin_info[name] = {
        "distribution": dist.metadata["Name"] if dist is not None else None,
        "version": dist.version if dist is not None else None,
        "builtin": builtin,
    }


def _register_defaults() -> None:
    "Register every DEFAULT_PLUGINS module that no entry point brought in."
    for module_name in DEFAULT_PLUGINS:
        module = _import_builtin(module_name)
        if pm.is_registered(module):
            continue
        name = module_name.rsplit(".", 1)[1]
        pm.register(module, name=name if pm.get_plugin(name) is None else module_name)
        _plugin_info[pm.get_name(module)] = {
            "distribution": "sphinx-tools",
            "version": _own_version(),
            "builtin": True,
        }


_SOURCE_DIRS = {"sphinx_tools.plugins": "plugins", "sphinx_tools.pipelines": "pipelines"}


def _import_builtin(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name not in _SOURCE_DIRS or not _map_source_package(exc.name):
            raise
        return importlib.import_module(module_name)


def _map_source_package(package: str) -> bool:
    """Source checkout, not installed: load ``<repo>/plugins`` as ``sphinx_tools.plugins`` (and
    ``<repo>/pipelines`` as ``sphinx_tools.pipelines``).

    This mirrors the ``package-dir`` mapping of ``pyproject.toml``; an installed package never
    gets here.
    """
    folder = Path(__file__).resolve().parent.parent / _SOURCE_DIRS[package]
    init = folder / "__init__.py"
    if package in sys.modules or not init.is_file():
        return False
    spec = importlib.util.spec_from_file_location(
        package, init, submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)
    return True


def _allowlist() -> set[str] | None:
    value = os.environ.get(LOAD_PLUGINS_ENV)
    if value is None:
        return None
    names = {_norm(v) for v in value.split(",") if v.strip()}
    return set() if names <= {"none"} else names


def _norm(name: str) -> str:
    "PEP 503 name normalization: ``My_Plugin`` -> ``my-plugin``."
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _own_version() -> str | None:
    try:
        return importlib.metadata.version("sphinx-tools")
    except importlib.metadata.PackageNotFoundError:
        return None


def list_plugins() -> list[dict]:
    """The registered plugins: ``[{name, distribution, version, builtin, hooks}]``, by name."""
    load_plugins()
    rows = []
    for name, plugin in pm.list_name_plugin():
        info = _plugin_info.get(name, {"distribution": None, "version": None, "builtin": False})
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        rows.append({"name": name, **info, "hooks": hooks})
    return sorted(rows, key=lambda r: r["name"])


# -- tasks -----------------------------------------------------------------------------------------
def _collect_tasks() -> dict[str, Task]:
    "Call every ``register_tasks`` hook; a later plugin overrides a task name, with a warning."
    load_plugins()
    tasks: dict[str, Task] = {}
    for impl in pm.hook.register_tasks.get_hookimpls():  # registration order

        def register(task, _plugin=impl.plugin_name):
            if isinstance(task, type) and issubclass(task, Task):
                task = task()
            if not isinstance(task, Task) or not task.name:
                raise TypeError(f"plugin {_plugin!r} registered {task!r}, expected a named Task")
            if task.name in tasks:
                warnings.warn(
                    f"task {task.name!r} from plugin {_plugin!r} replaces the one from "
                    f"{tasks[task.name].plugin!r}",
                    stacklevel=2,
                )
            task.plugin = _plugin
            tasks[task.name] = task

        impl.function(**{arg: register for arg in impl.argnames if arg == "register"})
    return tasks


def get_task(name: str) -> Task:
    """The registered task called ``name``.

    Raises:
        UnknownTaskError: naming the known tasks.
    """
    tasks = _collect_tasks()
    if name not in tasks:
        shown = name if not isinstance(name, str) or len(name) <= 80 else f"{name[:80]}..."
        raise UnknownTaskError(f"Unknown task {shown!r}. Known tasks: {', '.join(sorted(tasks))}")
    return tasks[name]


def list_tasks() -> list[Task]:
    "Every registered task, sorted by name."
    tasks = _collect_tasks()
    return [tasks[name] for name in sorted(tasks)]


def task_info(task: Task) -> dict:
    "One task as a JSON-friendly row: name, plugin, version, output, variants, default prompt."
    info = _plugin_info.get(task.plugin or "", {})
    return {
        "name": task.name,
        "plugin": task.plugin,
        "version": info.get("version"),
        "output": type_name(task.output),
        "variants": sorted(task.templates),
        "prompt": task.templates.get("default", ""),
        "description": task.description,
    }


@click.command(name="tasks")
@click.option("json_", "--json", is_flag=True, help="Output as JSON")
def tasks_command(json_):
    "List the available tasks: name, plugin, version, output type and default prompt."
    rows = [task_info(t) for t in list_tasks()]
    if json_:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']}  (plugin {row['plugin']}, version {row['version'] or '-'})")
        click.echo(f"  output:  {row['output']}")
        click.echo(f"  prompt:  {row['prompt']}")
        if len(row["variants"]) > 1:
            click.echo(f"  variants: {', '.join(row['variants'])}")
