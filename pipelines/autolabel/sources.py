"""Image sources for labeling, read lazily, and robust image loading.

A source is a folder (searched recursively), a text file of image paths (one a line, relative to
the file's folder unless absolute), a COCO json (its images; file names relative to the json's
folder, its ``images/`` subfolder or ``image_root``) or a RefCOCO-style json list (``image``,
``question``: referring expressions to ground with the ``rec`` task).

Items come out in a deterministic order and are never all held in memory: folders are walked
directory by directory, sorted.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit


@dataclass
class ImageItem:
    """One image to label.

    Attributes:
        index: position in the source's global order (0-based; shards split on it).
        path: where the file is.
        file_name: the name written to COCO ``images[].file_name`` (relative to the source root).
        image_id: the COCO id (the source's own for a COCO json, else ``index + 1``).
        expressions: referring expressions to ground (RefCOCO-style sources), as
            ``(question_id, expression)``.
    """

    index: int
    path: Path
    file_name: str
    image_id: int
    expressions: list = field(default_factory=list)


class ImageError(Exception):
    "An image that cannot be labeled; the message is the reason recorded for it."


@dataclass
class Source:
    """A labeling source: where it is, what kind, its root and (COCO) categories.

    Use :func:`open_source` to make one; iterate :meth:`items` (lazily) as often as needed.
    """

    location: Path
    kind: str  # "folder" | "list" | "coco" | "refcoco"
    root: Path
    categories: list = field(default_factory=list)
    image_root: Path | None = None

    def items(self) -> Iterator[ImageItem]:
        "Every image of the source, in its deterministic global order."
        if self.kind == "folder":
            yield from self._folder_items()
        elif self.kind == "list":
            yield from self._list_items()
        elif self.kind == "coco":
            yield from self._coco_items()
        else:
            yield from self._refcoco_items()

    def count(self) -> int:
        "The number of items (one streaming pass)."
        return sum(1 for _ in self.items())

    def _folder_items(self):
        index = 0
        for path in walk_images(self.location):
            yield ImageItem(index, path, path.relative_to(self.root).as_posix(), index + 1)
            index += 1

    def _list_items(self):
        with open(self.location, encoding="utf-8") as f:
            index = 0
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                path = Path(line) if Path(line).is_absolute() else self.root / line
                yield ImageItem(index, path, _relative(path, self.root), index + 1)
                index += 1

    def _coco_items(self):
        images = json.loads(self.location.read_text(encoding="utf-8")).get("images", [])
        for index, image in enumerate(sorted(images, key=lambda im: im["id"])):
            name = image["file_name"]
            yield ImageItem(index, self._resolve(name), name, int(image["id"]))

    def _refcoco_items(self):
        records = json.loads(self.location.read_text(encoding="utf-8"))
        by_image: dict[str, list] = {}
        for k, rec in enumerate(records):
            key = rec.get("question_id", k)
            by_image.setdefault(rec["image"], []).append((str(key), rec["question"]))
        for index, name in enumerate(by_image):
            yield ImageItem(index, self._resolve(name), name, index + 1, by_image[name])

    def _resolve(self, name: str) -> Path:
        roots = [self.image_root] if self.image_root else [self.root, self.root / "images"]
        for root in roots:
            if (root / name).exists():
                return root / name
        return roots[0] / name


def open_source(src, image_root=None) -> Source:
    """Recognize a source by what it is.

    Args:
        src: a folder, a ``.txt``/``.lst`` file of paths, a COCO json or a RefCOCO-style json list.
        image_root: folder that COCO / RefCOCO file names are relative to (default: the json's
            folder, or its ``images/`` subfolder when the file is there).

    Raises:
        ValueError: naming the source when it does not exist or is of no known kind.
    """
    src = Path(src).expanduser()
    root = Path(image_root) if image_root else None
    if src.is_dir():
        return Source(src, "folder", src)
    if not src.is_file():
        raise ValueError(f"source {str(src)!r} does not exist")
    if src.suffix.lower() != ".json":
        return Source(src, "list", src.parent)
    data = json.loads(src.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "images" in data:
        return Source(src, "coco", root or src.parent, data.get("categories", []), root)
    if isinstance(data, list) and all(isinstance(r, dict) and {"image", "question"} <= set(r)
                                      for r in data[:100]):
        return Source(src, "refcoco", root or src.parent, [], root)
    raise ValueError(
        f"source {str(src)!r} is a json file but neither COCO (a dict with 'images') nor "
        "RefCOCO-style (a list of {'image', 'question', ...})"
    )


def walk_images(folder: Path) -> Iterator[Path]:
    "Image files under ``folder``, recursively, sorted within each directory (hidden ones skipped)."
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                yield Path(dirpath) / name


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


# -- loading -----------------------------------------------------------------------------------
def read_bytes(path: Path) -> bytes:
    """The file's bytes.

    Raises:
        ImageError: for a missing, unreadable or empty file.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
    if not data:
        raise ImageError("empty file (0 bytes)")
    return data


def content_hash(data: bytes) -> str:
    "A short, stable hash of the file content (the work log keys results on it)."
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes into an 8-bit RGB image, EXIF orientation applied.

    CMYK, 16-bit, float, palette, grayscale and alpha images are converted (alpha composited on
    white; 16-bit scaled to 8 bits).

    Raises:
        ImageError: for undecodable or truncated data, or more than ``max_pixels`` pixels.
    """
    import io

    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if w * h > max_pixels:
                raise ImageError(f"too many pixels: {w}x{h} > {max_pixels} (decompression bomb?)")
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"decompression bomb: {exc}") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise ImageError(f"cannot decode image: {exc}") from None
    if image.width < 1 or image.height < 1:
        raise ImageError(f"empty image ({image.width}x{image.height})")
    return to_rgb(_exif_transpose(image))


def _exif_transpose(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose the image
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    "Any PIL mode -> 8-bit RGB (alpha composited on white, 16-bit / float scaled)."
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        return _gray(np.asarray(image, dtype=np.float64) / 257.0)
    if image.mode in ("I", "F"):
        return _gray(_stretch(np.asarray(image, dtype=np.float64)))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _stretch(array: np.ndarray) -> np.ndarray:
    "32-bit int / float pixels -> [0, 255]: kept when already there, else min-max stretched."
    lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
    if lo >= 0 and hi <= 255:
        return array
    return (array - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(array)


def _gray(array: np.ndarray) -> Image.Image:
    gray = np.nan_to_num(array).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str]:
    """Read and decode one image: ``(RGB PIL image, content hash)``.

    Raises:
        ImageError: with the reason when the file cannot be labeled.
    """
    data = read_bytes(path)
    return decode_image(data, max_pixels), content_hash(data)
