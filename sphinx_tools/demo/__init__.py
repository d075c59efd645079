"""The embedded demo model: a tiny SPHINX-shaped model (one 224-px view) trained on synthetic
scenes.

- ``weights/``: the shipped checkpoint (with ``task_options.json``: the wording its scenes ask
  layout in), its training configs and logs, and its measured quality
  (``quality.json``) and image-token probes (``token_probe.json``);
- ``recipe.py``: the build recipes, ``python -m sphinx_tools.demo build`` (the shipped one:
  ``SHIPPED_SHAPE``);
- ``synth.py``: the synthetic scenes it is trained and measured on (``sphinx-tools synth``);
- ``quality.py``, ``probe.py``: the measurements, ``python -m sphinx_tools.demo quality|probe``.

Where the weights are, and what the name ``demo`` means, is the runtime's to know
(``sphinx_tools.checkpoint``: ``DEMO_DIR``, ``demo_path``, ``resolve``); they are named here too,
and looked up there on first use, so importing this package loads none of the modules above (nor
torch).
"""

from __future__ import annotations

_FROM_CHECKPOINT = ("DEMO_NAME", "DEMO_DIR", "demo_path", "resolve")


def __getattr__(name):
    if name in _FROM_CHECKPOINT:
        from .. import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
