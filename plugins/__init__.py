"""Built-in task plugins, one task (family) per module, each registering itself with ``@hookimpl``.

Installed as ``sphinx_tools.plugins`` and declared in the ``sphinx_tools`` entry-point group like
any third-party plugin. Formats and verification status of every prompt: ``docs/formats.md`` §4.
"""
