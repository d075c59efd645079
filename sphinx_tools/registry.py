"""The plugin manager, plugin loading, the task registry and the ``sphinx-tools tasks`` command.

Plugins come from the entry-point group ``sphinx_tools``, and plugins that only add commands
may use ``sphinx_tools.commands`` (loaded for the command line, not when a task is looked up).
The package's own plugins (the built-in tasks; labeling and the web demo) are declared in these
groups too, in ``pyproject.toml``: that list is the only one, and installing the package
(``pip install -e .`` in a checkout) installs it.
The core itself never names a plugin or pipeline module. ``SPHINX_TOOLS_LOAD_PLUGINS`` controls
third-party plugins, like llm's ``LLM_LOAD_PLUGINS``:

- unset: load every installed plugin;
- ``""`` or ``"none"``: load none (built-ins are always loaded);
- ``"pkg-a,pkg-b"``: load only these distributions (or entry-point names).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import threading
import warnings

import click
import pluggy

from sphinx_tools import hookspecs
from sphinx_tools.errors import UnknownTaskError
from sphinx_tools.tasks import Task, type_name

ENTRY_POINT_GROUP = "sphinx_tools"  # task plugins (and any other plugin)
COMMANDS_GROUP = "sphinx_tools.commands"  # plugins that only add commands: not loaded for tasks
LOAD_PLUGINS_ENV = "SPHINX_TOOLS_LOAD_PLUGINS"
OWN_DISTRIBUTION = "sphinx-tools"

pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
pm.add_hookspecs(hookspecs)

_loaded: set[str] = set()  # the entry-point groups loaded so far
_load_lock = threading.RLock()
_plugin_info: dict[str, dict] = {}  # plugin name -> {"distribution", "version", "builtin"}


# -- loading ---------------------------------------------------------------------------------------
def load_plugins(reload: bool = False) -> None:
    """Register the built-in plugins and the allowed third-party ones (once per process).

    Args:
        reload: scan entry points again (e.g. after installing a plugin or changing the env var);
            plugins already registered stay registered.
    """
    _load_groups((ENTRY_POINT_GROUP, COMMANDS_GROUP), reload)


def _load_groups(groups: tuple[str, ...], reload: bool = False) -> None:
    with _load_lock:  # threads asking for tasks at once wait for one complete load
        todo = [g for g in groups if reload or g not in _loaded]
        _loaded.update(todo)
        for group in todo:
            _load(group)


def _load(group: str) -> None:
    allow = _allowlist()
    builtin, third_party = [], []
    for ep in importlib.metadata.entry_points(group=group):
        (builtin if _is_builtin(ep) else third_party).append(ep)
    if group == ENTRY_POINT_GROUP and not builtin:
        warnings.warn(
            f"no built-in sphinx_tools tasks: the {OWN_DISTRIBUTION} entry points are not "
            "installed (install the package, e.g. `pip install -e .` in a source checkout)",
            RuntimeWarning,
            stacklevel=4,
        )
    for ep in builtin:  # built-ins first, so a third-party task of the same name overrides them
        _register_entry_point(ep, builtin=True)
    for ep in third_party:
        dist_name = ep.dist.metadata["Name"] if getattr(ep, "dist", None) is not None else ""
        if allow is None or {_norm(dist_name), _norm(ep.name)} & allow:
            _register_entry_point(ep, builtin=False)


def _is_builtin(ep) -> bool:
    "An entry point that this package declares itself (its own tasks, labeling, the web demo)."
    dist = getattr(ep, "dist", None)
    return dist is not None and _norm(dist.metadata["Name"] or "") == OWN_DISTRIBUTION


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


def _allowlist() -> set[str] | None:
    value = os.environ.get(LOAD_PLUGINS_ENV)
    if value is None:
        return None
    names = {_norm(v) for v in value.split(",") if v.strip()}
    return set() if names <= {"none"} else names


def _norm(name: str) -> str:
    "PEP 503 name normalization: ``My_Plugin`` -> ``my-plugin``."
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


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
    """Call every ``register_tasks`` hook; a later plugin overrides a task name, with a warning.

    Only the ``sphinx_tools`` group is loaded for this: command plugins (labeling, the web demo)
    stay unimported, so looking up a task costs no torch."""
    _load_groups((ENTRY_POINT_GROUP,))
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
    """One task as a JSON-friendly row: name, plugin, version, output, variants, default prompt,
    and its options (see :func:`option_rows`)."""
    info = _plugin_info.get(task.plugin or "", {})
    return {
        "name": task.name,
        "plugin": task.plugin,
        "version": info.get("version"),
        "output": type_name(task.output),
        "variants": sorted(task.templates),
        "prompt": task.templates.get("default", ""),
        "description": task.description,
        "options": option_rows(task.Options),
    }


def option_rows(options_class) -> list[dict]:
    """The fields of a task's ``Options`` model: ``[{name, type, default, required, help,
    common}]``; ``common`` marks the fields every task has (:class:`TaskOptions`'), ``help`` is
    the field's line under ``Attributes:`` in the class docstring (or its pydantic description).
    """
    from sphinx_tools.tasks import TaskOptions

    helps = {**_attribute_help(TaskOptions), **_attribute_help(options_class)}
    rows = []
    for name, field in options_class.model_fields.items():
        required = field.is_required()
        if required:
            default = None
        elif field.default_factory is not None:
            default = field.default_factory()
        else:
            default = field.default
        rows.append({"name": name, "type": _annotation_name(field.annotation),
                     "default": _jsonable(default), "required": required,
                     "help": field.description or helps.get(name, ""),
                     "common": name in TaskOptions.model_fields})
    return rows


def _annotation_name(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _attribute_help(cls) -> dict:
    "``{name: text}`` from the ``name: text`` lines (and their continuations) of a docstring."
    helps: dict[str, str] = {}
    current = None
    for line in (cls.__doc__ or "").splitlines():
        match = re.match(r"\s*(\w+):\s+(\S.*)", line)
        if match and match.group(1) not in ("Attributes", "Args", "Example", "Examples"):
            current = match.group(1)
            helps[current] = match.group(2).strip()
        elif current and line.strip() and line.startswith(" " * 8):
            helps[current] += " " + line.strip()
        else:
            current = None
    return helps


@click.command(name="tasks")
@click.option("json_", "--json", is_flag=True, help="Output as JSON")
def tasks_command(json_):
    """List the available tasks: name, plugin, version, output type, default prompt, and each
    task's options with their types and defaults (pass them as ``run_task(..., name=value)``
    or ``label --option TASK.NAME=VALUE``)."""
    rows = [task_info(t) for t in list_tasks()]
    if json_:
        click.echo(json.dumps(rows, indent=2))
        return
    common = []
    for row in rows:
        click.echo(f"{row['name']}  (plugin {row['plugin']}, version {row['version'] or '-'})")
        click.echo(f"  output:  {row['output']}")
        click.echo(f"  prompt:  {row['prompt']}")
        if len(row["variants"]) > 1:
            click.echo(f"  variants: {', '.join(row['variants'])}")
        own = [o for o in row["options"] if not o["common"]]
        common = common or [o for o in row["options"] if o["common"]]
        if own:
            click.echo("  options:")
        for option in own:
            click.echo(_option_line(option))
    if common:
        click.echo("every task also takes:")
        for option in common:
            click.echo(_option_line(option))


def _option_line(option: dict) -> str:
    default = "required" if option["required"] else f"default {json.dumps(option['default'])}"
    text = f"    {option['name']}: {option['type']} ({default})"
    return text + (f"  {option['help']}" if option["help"] else "")
