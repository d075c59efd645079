"sphinx-tools: SPHINX multi-modal LLMs as dependable vision tooling."

from .conversation import build_prompt
from .errors import CheckpointError, SphinxToolsError, UnknownTaskError
from .generate import Generation
from .model import SphinxConfig, VisionConfig
from .sphinx_model import SphinxModel
from .tiny import make_tiny_checkpoint
from .transforms import PaddedResize

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "Generation", "PaddedResize", "SphinxConfig", "SphinxModel",
    "SphinxToolsError", "UnknownTaskError", "VisionConfig", "build_prompt", "make_tiny_checkpoint",
]
