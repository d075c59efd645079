"""SAM masks for the boxes of box-carrying results, as COCO compressed RLE.

Uses ``sphinx_tools.pipelines.segment.segment_detections`` when it is installed; otherwise drives
a ``segment_anything.SamPredictor``-like object directly (``set_image(HWC uint8)`` once, then
``predict(box=..., multimask_output=False)`` per box).
"""

from __future__ import annotations

import numpy as np
import supervision as sv
from pycocotools import mask as mask_utils


def masks_for_boxes(predictor, image, boxes: dict) -> dict:
    """Segment every box of every task on one image.

    Args:
        predictor: a SAM predictor.
        image: the RGB PIL image.
        boxes: ``{task: (n, 4) pixel xyxy}``.

    Returns:
        ``{"type": "masks", "masks": {task: [RLE dict | None, ...]}}``, aligned with ``boxes``.
    """
    out = {}
    array = np.asarray(image.convert("RGB"))
    is_set = False
    h, w = array.shape[:2]
    for task, xyxy in boxes.items():
        xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4).clip(0, [w, h, w, h])
        if not len(xyxy):
            out[task] = []
            continue
        masks = _segment(predictor, array, xyxy, is_set)
        is_set = True
        out[task] = [encode_rle(m) if m is not None and m.any() else None for m in masks]
    return {"type": "masks", "masks": out}


def _segment(predictor, array: np.ndarray, xyxy: np.ndarray, is_set: bool) -> list:
    try:
        from sphinx_tools.pipelines.segment import segment_detections
    except ImportError:
        return _predict_boxes(predictor, array, xyxy, is_set)
    detections = segment_detections(predictor, array, sv.Detections(xyxy=xyxy))
    return list(detections.mask) if detections.mask is not None else [None] * len(xyxy)


def _predict_boxes(predictor, array, xyxy, is_set: bool) -> list:
    if not is_set:
        predictor.set_image(array)
    masks = []
    for box in xyxy:
        m, _, _ = predictor.predict(box=box, multimask_output=False)
        masks.append(np.asarray(m[0], dtype=bool))
    return masks


def encode_rle(mask: np.ndarray) -> dict:
    "Binary (H, W) mask -> COCO compressed RLE ``{size: [H, W], counts: str}``."
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    "COCO compressed RLE ``{size, counts: str}`` -> (H, W) bool mask."
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def rle_to_polygons(rle: dict) -> list[list[float]]:
    """COCO compressed RLE -> COCO polygons ``[[x1, y1, x2, y2, ...], ...]``: the outer contour of
    each connected part of the mask (supervision's ``mask_to_polygons``); holes are not kept.
    Parts too small for a polygon of 3 points are dropped, so a speck gives ``[]``."""
    return [[float(v) for v in poly.reshape(-1)] for poly in sv.mask_to_polygons(decode_rle(rle))
            if len(poly) >= 3]


def rle_area(rle: dict) -> float:
    return float(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")}))


def rle_to_bbox(rle: dict) -> list[float]:
    return [float(v) for v in mask_utils.toBbox({"size": rle["size"],
                                                 "counts": rle["counts"].encode("ascii")})]
