"""All geometry between original images and SPHINX's padded square (docs/formats.md §2).

SPHINX pads an image to a square of side ``S = max(W, H)`` with the CLIP mean colour, pasting the
image centred with integer-floor offsets, then resizes the square to the model's input size. Every
coordinate SPHINX writes is a fraction of that padded square. ``PaddedResize`` does the image side
(``apply_image``) and both directions of the coordinate maps, so nothing else does coordinate
arithmetic. The coordinate methods are numpy-only.
"""

from __future__ import annotations

import numpy as np

PAD_RGB = (122, 116, 104)  # CLIP mean colour, as in LLaMA2-Accessory's PadToSquare
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_wh(image_wh) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in image_wh)
    except (TypeError, ValueError):
        raise ValueError(f"`image_size` must be (width, height), got {image_wh!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"`image_size` must be positive (width, height), got {image_wh!r}")
    return w, h


class PaddedResize:
    """Pad-to-square + resize, and the maps between pixels and normalized padded coordinates.

    Args:
        target_size: side of the square model input (224 for SPHINX, 448 for SPHINX-1k).
    """

    def __init__(self, target_size: int = 448):
        self.target_size = int(target_size)

    # -- image ---------------------------------------------------------------------------------
    def apply_image(self, image):
        """PIL image -> FloatTensor (3, S, S), CLIP-normalized, exactly as the reference.

        Pads to a square (RGB (122,116,104), centred, floor offsets), resizes with torchvision
        bicubic on the PIL image, then ToTensor and CLIP Normalize.
        """
        import torchvision.transforms as T
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise ValueError(f"expected a PIL.Image, got {type(image).__name__}")
        image = image.convert("RGB")
        w, h = image.size
        s = max(w, h)
        square = Image.new("RGB", (s, s), PAD_RGB)
        square.paste(image, self.offsets((w, h)))
        tf = T.Compose([
            T.Resize(self.target_size, interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ])
        return tf(square)

    # -- coordinates ---------------------------------------------------------------------------
    @staticmethod
    def offsets(image_wh) -> tuple[int, int]:
        "(pad_x, pad_y): where the original image sits inside the padded square (integer floor)."
        w, h = _check_wh(image_wh)
        return ((h - w) // 2 if w < h else 0, (w - h) // 2 if h < w else 0)

    def to_pixels_xyxy(self, boxes, image_wh) -> np.ndarray:
        """Normalized padded-square boxes -> original-image pixel boxes (not clipped).

        Args:
            boxes: array-like of shape (n, 4), ``[x1, y1, x2, y2]`` fractions of the padded side.
            image_wh: ``(width, height)`` of the original image.

        Returns:
            Float array of shape (n, 4) in pixels of the original image.
        """
        w, h = _check_wh(image_wh)
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        s = max(w, h)
        px, py = self.offsets((w, h))
        return b * s - np.array([px, py, px, py], dtype=np.float64)

    def to_pixels_xy(self, points, image_wh) -> np.ndarray:
        "Normalized padded-square points (..., 2) -> original-image pixels (..., 2)."
        w, h = _check_wh(image_wh)
        p = np.asarray(points, dtype=np.float64)
        s = max(w, h)
        px, py = self.offsets((w, h))
        return p * s - np.array([px, py], dtype=np.float64)

    def to_model_xyxy(self, boxes, image_wh) -> np.ndarray:
        "Original-image pixel boxes (n, 4) -> normalized padded-square boxes (n, 4) (inverse map)."
        w, h = _check_wh(image_wh)
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        s = max(w, h)
        px, py = self.offsets((w, h))
        return (b + np.array([px, py, px, py], dtype=np.float64)) / s

    def to_model_xy(self, points, image_wh) -> np.ndarray:
        "Original-image pixel points (..., 2) -> normalized padded-square points."
        w, h = _check_wh(image_wh)
        p = np.asarray(points, dtype=np.float64)
        s = max(w, h)
        px, py = self.offsets((w, h))
        return (p + np.array([px, py], dtype=np.float64)) / s

    def image_region(self, image_wh) -> np.ndarray:
        "The original image's extent in normalized padded coordinates, ``[x1, y1, x2, y2]``."
        w, h = _check_wh(image_wh)
        return self.to_model_xyxy([[0, 0, w, h]], (w, h))[0]
