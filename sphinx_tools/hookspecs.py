"""Plugin hook specifications (pluggy project name ``sphinx_tools``).

A plugin is a module (or object) with ``@hookimpl`` functions, found through the entry-point group
``sphinx_tools``::

    # pyproject.toml of a third-party package
    [project.entry-points.sphinx_tools]
    my_task = "my_package.my_task"

    # my_package/my_task.py
    from sphinx_tools.hookspecs import hookimpl

    @hookimpl
    def register_tasks(register):
        register(MyTask())

A plugin that only adds commands (``register_commands``) may use the group
``sphinx_tools.commands`` instead: it is loaded for the command line, not when a task is looked up.
The package's own plugins are written the same way and declared in its ``pyproject.toml``.
"""

from pluggy import HookimplMarker, HookspecMarker

PROJECT_NAME = "sphinx_tools"

hookspec = HookspecMarker(PROJECT_NAME)
hookimpl = HookimplMarker(PROJECT_NAME)


@hookspec
def register_tasks(register):
    "Register task instances: call ``register(task)`` once for each ``sphinx_tools.tasks.Task``."


@hookspec
def register_commands(cli):
    "Add commands to the ``sphinx-tools`` click group: ``cli.add_command(...)`` or ``@cli.command()``."
