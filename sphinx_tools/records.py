"""Task results <-> JSON-able records: what labeling writes to its work log and the web demo
shows and downloads.

A record keeps what COCO export needs and the raw answer, in pixels of the EXIF-oriented image:

- ``sv.Detections`` -> ``{"type": "detections", "boxes": [[x1, y1, x2, y2]], "scores": [s|None],
  "class_name": [...], per-object extras (``fields``: by default "text", "caption", "phrase",
  "entity_index" when present), "raw_text", "truncated"}``, plus ``"masks"`` (compressed RLE, one
  per row) when the detections carry masks;
- ``sv.KeyPoints`` -> ``{"type": "keypoints", "people": [{"box", "keypoints": [x, y, v] * 17,
  "score"}]}`` (``v`` 2 visible, 0 missing; ``box`` the person box it was asked for);
- ``SceneGraph`` -> ``{"type": "scene_graph", "detections": {...}, "triples": [[s, p, o]]}``;
- ``GroundedCaption`` -> ``{"type": "grounded_caption", "caption": str, "detections": {...}}``;
- ``str`` -> ``{"type": "text", "text": str}``.
"""

from __future__ import annotations

import math

import numpy as np
import supervision as sv

from .annotations import (
    PERSON_BOX_FIELD,
    RAW_TEXT_KEY,
    TRUNCATED_KEY,
    GroundedCaption,
    SceneGraph,
)
from .coco import encode_rle

EXTRA_FIELDS = ("text", "caption", "phrase", "entity_index")
ALL_FIELDS = None  # ``fields=ALL_FIELDS``: every per-object ``data`` column


def to_record(result, fields=EXTRA_FIELDS) -> dict:
    """A task result as a JSON-able dict (see the module docstring).

    Args:
        result: a task's parsed result.
        fields: the per-object ``data`` columns kept besides ``class_name`` (:data:`ALL_FIELDS`:
            all of them).

    Raises:
        TypeError: naming the type of an unsupported result.
    """
    if isinstance(result, sv.Detections):
        return {"type": "detections", **detections_to_json(result, fields)}
    if isinstance(result, sv.KeyPoints):
        return {"type": "keypoints", "people": keypoints_to_json(result)}
    if isinstance(result, SceneGraph):
        return {"type": "scene_graph", "detections": detections_to_json(result.detections, fields),
                "triples": [[int(s), p, int(o)] for s, p, o in result.triples]}
    if isinstance(result, GroundedCaption):
        return {"type": "grounded_caption", "caption": result.text,
                "detections": detections_to_json(result.detections, fields)}
    if isinstance(result, str):
        return {"type": "text", "text": result}
    raise TypeError(f"cannot record a task result of type {type(result).__name__}")


def detections_to_json(d: sv.Detections, fields=EXTRA_FIELDS) -> dict:
    "``sv.Detections`` -> boxes, scores, class names, extras, raw text, masks (:func:`to_record`)."
    n = len(d)
    scores = [None] * n if d.confidence is None else [_num(c, 4) for c in d.confidence]
    out = {
        "boxes": [[round(float(v), 2) for v in box] for box in d.xyxy],
        "scores": scores,
        "class_name": [str(c) for c in d.data.get("class_name", [""] * n)],
    }
    names = [k for k in d.data if k != "class_name"] if fields is ALL_FIELDS else fields
    for name in names:
        if name in d.data and len(d.data[name]) == n:
            out[name] = [plain(v) for v in d.data[name]]
    raw = d.metadata.get(RAW_TEXT_KEY, "")
    out["raw_text"] = raw if isinstance(raw, (str, list)) else str(raw)
    out["truncated"] = bool(d.metadata.get(TRUNCATED_KEY, False))
    if d.mask is not None:
        out["masks"] = [encode_rle(m) for m in d.mask]
    return out


def keypoints_to_json(k: sv.KeyPoints) -> list[dict]:
    "``sv.KeyPoints`` -> one dict per person: box, flat COCO keypoints ``[x, y, v] * 17``, score."
    people = []
    boxes = k.data.get(PERSON_BOX_FIELD)
    for i in range(len(k)):
        visible = k.visible[i] if k.visible is not None else np.ones(len(k.xy[i]), bool)
        flat = []
        for (x, y), v in zip(k.xy[i], visible, strict=True):
            flat += [round(float(x), 2), round(float(y), 2), 2] if v else [0.0, 0.0, 0]
        score = None if k.detection_confidence is None else _num(k.detection_confidence[i], 4)
        box = None if boxes is None else [round(float(v), 2) for v in boxes[i]]
        people.append({"box": box, "keypoints": flat, "score": score})
    return people


def plain(value):
    "numpy scalars and arrays (nested in dicts, lists, tuples) -> JSON types; NaN and inf -> None."
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _num(value, digits: int):
    value = float(value)
    return None if math.isnan(value) else round(value, digits)


def record_boxes(record: dict) -> np.ndarray:
    """Pixel boxes (n, 4) ``[x1, y1, x2, y2]`` of a box-carrying record, in the order the COCO
    merge reads them: a detections record's boxes, a scene graph's or grounded caption's
    detections, or a REC record's boxes expression by expression.

    Raises:
        ValueError: naming a record type without boxes.
    """
    kind = record.get("type")
    if kind == "detections":
        boxes = record["boxes"]
    elif kind in ("scene_graph", "grounded_caption"):
        boxes = record["detections"]["boxes"]
    elif kind == "rec":
        boxes = [box for item in record["items"] for box in item["boxes"]]
    else:
        raise ValueError(f"a {kind!r} record has no boxes to segment")
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
