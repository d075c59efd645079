"The reference's tiny goldens in tests/data/golden/<name>/ (see each folder's README.md)."

from pathlib import Path

import numpy as np
import torch
from PIL import Image

GOLDEN_ROOT = Path(__file__).parent / "data" / "golden"
GOLDENS = ["sphinx-1k-tiny", "sphinx-224-tiny", "sphinx-tiny-tiny", "sphinx-tiny-1k-tiny",
           "sphinx-moe-tiny", "sphinx-moe-1k-tiny"]
CLIP_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
CLIP_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)


def load_io(folder: Path) -> dict:
    return torch.load(folder / "golden_io.pt", weights_only=True)


def golden_image(folder: Path, io: dict) -> torch.Tensor:
    """The exact preprocessed input (3, S, S): the stored float tensor, or the README's recipe on
    the lossless ``input.png`` (pixels after pad-to-square and resize)."""
    if "image" in io:
        return io["image"]
    pixels = torch.from_numpy(np.array(Image.open(folder / "input.png").convert("RGB")))
    return (pixels.permute(2, 0, 1).contiguous().float().div(255) - CLIP_MEAN) / CLIP_STD
