"""COCO pieces shared by every writer in the package: masks as compressed RLE (pycocotools), one
annotation dict, and the JSON file.

Masks are COCO compressed RLE with the counts as text: ``{"size": [H, W], "counts": str}``, the
form ``pycocotools.mask`` reads once ``counts`` is encoded back to bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _mask_utils():
    from pycocotools import mask as mask_utils

    return mask_utils


def _coco_rle(rle: dict) -> dict:
    return {"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}


def encode_rle(mask: np.ndarray) -> dict:
    "Binary (H, W) mask -> COCO compressed RLE ``{size: [H, W], counts: str}``."
    rle = _mask_utils().encode(np.asfortranarray(np.asarray(mask).astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    "COCO compressed RLE ``{size, counts: str}`` -> (H, W) bool mask."
    return _mask_utils().decode(_coco_rle(rle)).astype(bool)


def rle_area(rle: dict) -> float:
    "Pixels of a COCO compressed RLE mask."
    return float(_mask_utils().area(_coco_rle(rle)))


def rle_to_polygons(rle: dict) -> list[list[float]]:
    """COCO compressed RLE -> COCO polygons ``[[x1, y1, x2, y2, ...], ...]``: the outer contour of
    each connected part of the mask (supervision's ``mask_to_polygons``); holes are not kept.
    Parts too small for a polygon of 3 points are dropped, so a speck gives ``[]``."""
    import supervision as sv

    return [[float(v) for v in poly.reshape(-1)] for poly in sv.mask_to_polygons(decode_rle(rle))
            if len(poly) >= 3]


def coco_annotation(ann_id: int, image_id: int, category_id: int, xyxy, *, area=None,
                    digits: int | None = None, **extra) -> dict:
    """One COCO annotation: ``id``, ``image_id``, ``category_id``, ``bbox`` (xywh pixels),
    ``area``, ``iscrowd`` 0, then ``extra`` in the order given (``score``, ``segmentation``,
    ``keypoints``, ...).

    Args:
        xyxy: ``(x1, y1, x2, y2)`` pixels; written as given, or rounded to ``digits`` places.
        area: the object's pixels (e.g. of its mask); ``None``: the box's area.
        digits: decimal places of ``bbox`` and of the box's area (``None``: no rounding).
    """
    x1, y1, x2, y2 = xyxy
    bbox = [x1, y1, x2 - x1, y2 - y1]
    if area is None:
        area = bbox[2] * bbox[3] if digits is None else round(float(bbox[2] * bbox[3]), digits)
    if digits is not None:
        bbox = [round(float(v), digits) for v in bbox]
    ann = {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
           "area": area, "iscrowd": 0}
    ann.update(extra)
    return ann


def coco_categories(names) -> list[dict]:
    """COCO categories for ``names``: ids 1, 2, ... in order, supercategory ``object``."""
    return [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(names)]


def write_json(path, data) -> Path:
    "Write ``data`` as compact UTF-8 JSON (non-ASCII text kept as written); returns the path."
    path = Path(path)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path
