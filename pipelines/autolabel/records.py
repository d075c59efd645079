"""Task results <-> JSON-able work-log records.

A record's ``result`` keeps what COCO export needs and the raw answer, in pixels of the
EXIF-oriented image:

- ``sv.Detections`` -> ``{"type": "detections", "boxes": [[x1, y1, x2, y2]], "scores": [s|None],
  "class_name": [...], "raw_text", "truncated", and per-object extras ("text", "caption",
  "phrase", "entity_index") when present}``;
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

from sphinx_tools.annotations import (
    GroundedCaption,
    SceneGraph,
    PERSON_BOX_FIELD,
    RAW_TEXT_KEY,
    TRUNCATED_KEY,
)

EXTRA_FIELDS = ("text", "caption", "phrase", "entity_index")


def to_record(result) -> dict:
    """A task result as a JSON-able dict (see the module docstring).

    Raises:
        TypeError: naming the type of an unsupported result.
    """
    if isinstance(result, sv.Detections):
        return {"type": "detections", **detections_to_json(result)}
    if isinstance(result, sv.KeyPoints):
        return {"type": "keypoints", "people": keypoints_to_json(result)}
    if isinstance(result, SceneGraph):
        return {"type": "scene_graph", "detections": detections_to_json(result.detections),
                "triples": [[int(s), p, int(o)] for s, p, o in result.triples]}
    if isinstance(result, GroundedCaption):
        return {"type": "grounded_caption", "caption": result.text,
                "detections": detections_to_json(result.detections)}
    if isinstance(result, str):
        return {"type": "text", "text": result}
    raise TypeError(f"cannot record a task result of type {type(result).__name__}")


def detections_to_json(d: sv.Detections) -> dict:
    "``sv.Detections`` -> boxes, scores, class names, extras, raw text."
    n = len(d)
    scores = [None] * n if d.confidence is None else [_num(c, 4) for c in d.confidence]
    out = {
        "boxes": [[round(float(v), 2) for v in box] for box in d.xyxy],
        "scores": scores,
        "class_name": [str(c) for c in d.data.get("class_name", [""] * n)],
    }
    for name in EXTRA_FIELDS:
        if name in d.data and len(d.data[name]) == n:
            out[name] = [v.item() if isinstance(v, np.generic) else v for v in d.data[name]]
    raw = d.metadata.get(RAW_TEXT_KEY, "")
    out["raw_text"] = raw if isinstance(raw, (str, list)) else str(raw)
    out["truncated"] = bool(d.metadata.get(TRUNCATED_KEY, False))
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
