"""Image sources for labeling, read lazily, and robust image loading.

A source is a folder (searched recursively), a text file of image paths (one a line, relative to
the file's folder unless absolute), a COCO json (its images; file names relative to the json's
folder, its ``images/`` subfolder or ``image_root``) or a RefCOCO-style json list (``image``,
``question``: referring expressions to ground with the ``rec`` task).

Items come out in a deterministic order and are never all held in memory: folders are walked
directory by directory, sorted.

:func:`open_source` checks every entry of a file list, COCO json or RefCOCO json before it
returns, so a malformed entry fails before any model is loaded. It raises :class:`SourceError`
(a ``ValueError``) naming the entry (line number, ``images[k]`` with its id, or ``record k``) and
what is wrong with it: a NUL byte, a missing or non-string file name, an id that is not an
integer (``"3"``, ``3.0``, ``true`` and ``null`` are refused), a duplicate image, category or
question id, a category without an integer id and a string name, or JSON that cannot be parsed.
Folders are not listed up front.

File names in a COCO or RefCOCO json are relative to the image root. A name that is absolute, or
that climbs out of the root with ``..`` (checked on the text of the name, after normalization),
is refused unless ``allow_outside_root=True`` (``--allow-outside-root``). A text file list names
its images explicitly and documents absolute paths as a way to do so, so its entries may point
anywhere, ``..`` included; its ``file_name`` is then the path as written relative to the list's
folder (``../x.png``) or the absolute path. Symbolic links are followed as the OS does.

File names need not be valid UTF-8: folder and list entries keep undecodable bytes as lone
surrogates (:func:`os.fsdecode`, ``surrogateescape``), so ``file_name`` is a ``str`` and ``path``
opens the original file.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import posixpath
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps

from sphinx_tools.errors import SphinxToolsError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit
_MISSING = object()


@dataclass
class ImageItem:
    """One image to label.

    Attributes:
        index: position in the source's global order (0-based; shards split on it).
        path: where the file is.
        file_name: the name written to COCO ``images[].file_name`` (relative to the source root;
            undecodable bytes of the OS name appear as lone surrogates).
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


class SourceError(SphinxToolsError, ValueError):
    "A source, or one of its entries, that cannot be read; the message names the entry."


@dataclass
class Source:
    """A labeling source: where it is, what kind, its root and (COCO) categories.

    Use :func:`open_source` to make one (it checks every entry); iterate :meth:`items` (lazily)
    as often as needed.
    """

    location: Path
    kind: str  # "folder" | "list" | "coco" | "refcoco"
    root: Path
    categories: list = field(default_factory=list)
    image_root: Path | None = None
    allow_outside_root: bool = False
    # checked json entries: coco [(id, file_name)], refcoco {file_name: [(qid, question)]}
    _entries: list | dict | None = field(default=None, init=False, repr=False, compare=False)

    def items(self) -> Iterator[ImageItem]:
        """Every image of the source, in its deterministic global order.

        Raises:
            SourceError: for a malformed entry (only in a file list changed after it was opened,
                or in a ``Source`` made without :func:`open_source`).
        """
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
        for index, (_, line) in enumerate(_list_entries(self.location)):
            path = Path(line) if Path(line).is_absolute() else self.root / line
            yield ImageItem(index, path, _relative(path, self.root), index + 1)

    def _coco_items(self):
        if self._entries is None:
            self._entries = _coco_entries(self.location, _read_json(self.location),
                                          self.root, self.allow_outside_root)
        for index, (image_id, name) in enumerate(self._entries):
            yield ImageItem(index, self._resolve(name), name, image_id)

    def _refcoco_items(self):
        if self._entries is None:
            self._entries = _refcoco_entries(self.location, _read_json(self.location),
                                             self.root, self.allow_outside_root)
        for index, (name, expressions) in enumerate(self._entries.items()):
            yield ImageItem(index, self._resolve(name), name, index + 1, list(expressions))

    def _resolve(self, name: str) -> Path:
        roots = [self.image_root] if self.image_root else [self.root, self.root / "images"]
        for root in roots:
            try:
                if (root / name).exists():
                    return root / name
            except (OSError, ValueError):  # a name too long for the OS: read_bytes reports it
                pass
        return roots[0] / name


def open_source(src, image_root=None, *, allow_outside_root: bool = False) -> Source:
    """Recognize a source by what it is, and check every entry of a list or json source.

    Args:
        src: a folder, a ``.txt``/``.lst`` file of paths, a COCO json or a RefCOCO-style json list.
        image_root: folder that COCO / RefCOCO file names are relative to (default: the json's
            folder, or its ``images/`` subfolder when the file is there).
        allow_outside_root: accept COCO / RefCOCO file names that are absolute or climb out of
            the image root with ``..`` (refused by default).

    Raises:
        SourceError: a ``ValueError`` naming the source when it does not exist, is of no known
            kind or cannot be parsed, or naming its first malformed entry.
    """
    src = Path(src).expanduser()
    root = Path(image_root) if image_root else None
    if src.is_dir():
        return Source(src, "folder", src)
    if not src.is_file():
        raise SourceError(f"source {str(src)!r} does not exist")
    if src.suffix.lower() != ".json":
        for _ in _list_entries(src):  # reads the list once, line by line, to check it
            pass
        return Source(src, "list", src.parent)
    data = _read_json(src)
    if isinstance(data, dict) and "images" in data:
        source = Source(src, "coco", root or src.parent, _categories(src, data), root,
                        allow_outside_root)
        source._entries = _coco_entries(src, data, source.root, allow_outside_root)
        return source
    if isinstance(data, list) and (not data or any(
            isinstance(r, dict) and {"image", "question"} <= set(r) for r in data[:100])):
        source = Source(src, "refcoco", root or src.parent, [], root, allow_outside_root)
        source._entries = _refcoco_entries(src, data, source.root, allow_outside_root)
        return source
    raise SourceError(
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


# -- checking list and json entries ------------------------------------------------------------
def _list_entries(location: Path) -> Iterator[tuple[int, str]]:
    """``(line number, path)`` for each entry of a file list, read as bytes, one line at a time.

    Blank lines and ``#`` comments are skipped, surrounding whitespace and a UTF-8 byte order
    mark are removed, and bytes that are not valid UTF-8 are kept as lone surrogates.

    Raises:
        SourceError: naming the list when it cannot be read, or the line with a NUL byte.
    """
    where = f"file list {str(location)!r}"
    try:
        with open(location, "rb") as f:
            for number, raw in enumerate(f, 1):
                if number == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                try:
                    line = os.fsdecode(raw).strip()
                except UnicodeDecodeError as exc:  # only where the OS has no surrogateescape
                    raise SourceError(f"{where}, line {number}: cannot decode the path: {exc}"
                                      ) from None
                if not line or line.startswith("#"):
                    continue
                if "\0" in line:
                    raise SourceError(f"{where}, line {number}: the path contains a NUL byte "
                                      "(expected a text file of image paths, one a line)")
                yield number, line
    except OSError as exc:
        raise SourceError(f"{where} cannot be read: {exc.strerror or exc}") from None


def _read_json(location: Path):
    "The parsed json file; a :class:`SourceError` naming it when it cannot be read or parsed."
    where = f"source {str(location)!r}"
    try:
        return json.loads(location.read_bytes())
    except OSError as exc:
        raise SourceError(f"{where} cannot be read: {exc.strerror or exc}") from None
    except RecursionError:
        raise SourceError(f"{where} is not usable JSON: it is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise SourceError(f"{where} is not valid JSON: {exc}") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value) -> str:
    "A short description of a bad json value for a message, written as JSON."
    if value is _MISSING:
        return "nothing (missing)"
    text = json.dumps(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object"}
    return text if value is None else f"{text} ({kinds.get(type(value), type(value).__name__)})"


def _check_name(name, key: str, entry: str, root: Path, allow_outside_root: bool) -> str:
    "A json entry's image file name, checked; ``entry`` names it in the error."
    if name is _MISSING:
        raise SourceError(f"{entry}: {key!r} is missing")
    if not isinstance(name, str):
        raise SourceError(f"{entry}: {key!r} must be a string, got {_show(name)}")
    if not name.strip():
        raise SourceError(f"{entry}: {key!r} is empty")
    if "\0" in name:
        raise SourceError(f"{entry}: {key!r} {name!r} contains a NUL byte")
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        raise SourceError(f"{entry}: {key!r} {name!r} is not a possible file name "
                          "(it holds a lone surrogate)") from None
    if not allow_outside_root:
        how = None
        if os.path.isabs(name) or posixpath.isabs(name):
            how = "an absolute path"
        elif os.path.normpath(name).replace(os.sep, "/").split("/")[0] == "..":
            how = "it climbs out with '..'"
        if how:
            raise SourceError(f"{entry}: {key!r} {name!r} is outside the image root "
                              f"{str(root)!r} ({how}); pass --allow-outside-root "
                              "(allow_outside_root=True) to read it")
    return name


def _coco_entries(location: Path, data, root: Path,
                  allow_outside_root: bool) -> list[tuple[int, str]]:
    "``(image id, file name)`` of a COCO dict's images, checked, sorted by id."
    where = f"COCO source {str(location)!r}"
    if not isinstance(data, dict) or "images" not in data:
        raise SourceError(f"{where} is not a COCO dict with 'images'")
    images = data["images"]
    if not isinstance(images, list):
        raise SourceError(f"{where}: 'images' must be a list, got {_show(images)}")
    seen: dict[int, int] = {}
    entries = []
    for k, image in enumerate(images):
        entry = f"{where}: images[{k}]"
        if not isinstance(image, dict):
            raise SourceError(f"{entry} must be an object, got {_show(image)}")
        image_id = image.get("id", _MISSING)
        if not _is_int(image_id):
            raise SourceError(f"{entry}: 'id' must be an integer, got {_show(image_id)}")
        entry = f"{entry} (id {image_id})"
        if image_id in seen:
            raise SourceError(f"{entry}: duplicate image id, also used by images[{seen[image_id]}]")
        seen[image_id] = k
        name = _check_name(image.get("file_name", _MISSING), "file_name", entry, root,
                           allow_outside_root)
        entries.append((image_id, name))
    entries.sort(key=lambda e: e[0])
    return entries


def read_categories(path) -> list:
    """The checked categories of a COCO file (e.g. the ground truth, for ``--categories``).

    Raises:
        SourceError: naming the file when it cannot be read or has no categories, or naming its
            first malformed category.
    """
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"cannot read categories from {str(path)!r}: {exc}") from None
    categories = _categories(path, data) if isinstance(data, dict) else None
    if not categories:
        raise SourceError(f"{str(path)!r} has no COCO 'categories' list")
    return categories


def _categories(location: Path, data: dict) -> list:
    "A COCO dict's categories, checked: integer ids, unique; string names; list synonyms."
    where = f"COCO source {str(location)!r}"
    categories = data.get("categories")
    if categories is None:
        return []
    if not isinstance(categories, list):
        raise SourceError(f"{where}: 'categories' must be a list, got {_show(categories)}")
    seen: dict[int, int] = {}
    for k, category in enumerate(categories):
        entry = f"{where}: categories[{k}]"
        if not isinstance(category, dict):
            raise SourceError(f"{entry} must be an object, got {_show(category)}")
        cat_id = category.get("id", _MISSING)
        if not _is_int(cat_id):
            raise SourceError(f"{entry}: 'id' must be an integer, got {_show(cat_id)}")
        entry = f"{entry} (id {cat_id})"
        if cat_id in seen:
            raise SourceError(f"{entry}: duplicate category id, also used by "
                              f"categories[{seen[cat_id]}]")
        seen[cat_id] = k
        name = category.get("name", _MISSING)
        if not isinstance(name, str) or not name.strip():
            raise SourceError(f"{entry}: 'name' must be a non-empty string, got {_show(name)}")
        synonyms = category.get("synonyms", [])
        if not isinstance(synonyms, list) or not all(isinstance(s, str) for s in synonyms):
            raise SourceError(f"{entry}: 'synonyms' must be a list of strings, got "
                              f"{_show(synonyms)}")
    return categories


def _refcoco_entries(location: Path, data, root: Path,
                     allow_outside_root: bool) -> dict[str, list]:
    "``{image file name: [(question id, expression), ...]}`` of a RefCOCO-style list, checked."
    where = f"RefCOCO source {str(location)!r}"
    if not isinstance(data, list):
        raise SourceError(f"{where} must be a json list of records, got {_show(data)}")
    by_image: dict[str, list] = {}
    seen: dict[str, int] = {}
    for k, record in enumerate(data):
        entry = f"{where}: record {k}"
        if not isinstance(record, dict):
            raise SourceError(f"{entry} must be an object, got {_show(record)}")
        qid = record.get("question_id", k)
        if not (_is_int(qid) or isinstance(qid, str)):
            raise SourceError(f"{entry}: 'question_id' must be a string or an integer, got "
                              f"{_show(qid)}")
        key = str(qid)
        if "question_id" in record:
            entry = f"{entry} (question_id {qid!r})"
        if key in seen:
            raise SourceError(f"{entry}: duplicate question id {key!r}, also used by record "
                              f"{seen[key]}")
        seen[key] = k
        name = _check_name(record.get("image", _MISSING), "image", entry, root,
                           allow_outside_root)
        question = record.get("question", _MISSING)
        if not isinstance(question, str):
            raise SourceError(f"{entry}: 'question' must be a string, got {_show(question)}")
        by_image.setdefault(name, []).append((key, question))
    return by_image


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
    except ValueError as exc:  # a NUL byte or a lone surrogate the OS cannot take in a path
        raise ImageError(f"cannot read file: {exc}") from None
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
        # PIL names the in-memory file by its repr (an address): keep the reason stable
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the data", str(exc))
        raise ImageError(f"cannot decode image: {reason}") from None
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
