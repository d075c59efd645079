"""sphinx-tools: SPHINX multi-modal LLMs as dependable vision tooling.

Model-side names (``SphinxModel``, ``make_tiny_checkpoint``, ...) import torch lazily, so parsing
SPHINX text with the task plugins stays light.
"""

from importlib import import_module

from . import threads  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
from .annotations import Entity, GroundedCaption, SceneGraph
from .conversation import build_prompt
from .errors import CheckpointError, SphinxToolsError, UnknownTaskError
from .hookspecs import hookimpl
from .registry import get_task, list_tasks, load_plugins, pm
from .run import run_task, trained_options
from .tasks import DetectionsTask, Task, TaskOptions
from .transforms import PaddedResize

__version__ = "0.1.0"

_LAZY = {
    "SphinxModel": "sphinx_model",
    "Generation": "generate",
    "SphinxConfig": "model",
    "VisionConfig": "model",
    "make_tiny_checkpoint": "tiny",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointError", "DetectionsTask", "Entity", "Generation", "GroundedCaption", "PaddedResize",
    "SceneGraph", "SphinxConfig", "SphinxModel", "SphinxToolsError", "Task", "TaskOptions",
    "UnknownTaskError", "VisionConfig", "build_prompt", "get_task", "hookimpl", "list_tasks",
    "load_plugins", "make_tiny_checkpoint", "pm", "run_task", "trained_options",
]
