"""The embedded demo model: a tiny SPHINX-1k-shaped model trained on synthetic scenes.

- ``weights/``: the shipped checkpoint, its training config and log, and its measured quality
  (``quality.json``) and image-token probes (``token_probe.json``);
- ``recipe.py``: the build recipe, ``python -m sphinx_tools.demo build``;
- ``synth.py``: the synthetic scenes it is trained and measured on (``sphinx-tools synth``);
- ``quality.py``, ``probe.py``: the measurements, ``python -m sphinx_tools.demo quality|probe``.

Importing this package loads none of them (nor torch): it only knows where the weights are.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

DEMO_NAME = "demo"
DEMO_DIR = Path(__file__).parent / "weights"


def demo_path() -> Path:
    "The folder of the embedded demo checkpoint; a clear error when it is not installed."
    if not (DEMO_DIR / "tokenizer.model").is_file():
        raise CheckpointError(
            f"the embedded demo model is not installed ({DEMO_DIR} is missing); build it with "
            "`python -m sphinx_tools.demo build`"
        )
    return DEMO_DIR


def resolve(path) -> Path:
    """Map the name ``demo`` to the embedded checkpoint; other paths pass through.

    A ``demo`` folder in the working directory wins only if it holds checkpoint shards, so a
    build's ``--work`` folder (or any other ``demo`` folder) does not shadow the embedded model."""
    from ..load import SHARD_RE

    p = Path(path).expanduser()
    if str(path) == DEMO_NAME and not (p.is_dir() and any(SHARD_RE.match(f.name) for f in p.iterdir())):
        return demo_path()
    return p
