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

The built-in tasks in ``sphinx_tools.plugins`` are written the same way.
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
