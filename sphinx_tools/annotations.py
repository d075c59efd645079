"""Result types and ``data`` field names shared by the task plugins.

Boxes, OCR, layout and region captions are plain ``sv.Detections``; pose is ``sv.KeyPoints``. Only
two results need project types: :class:`SceneGraph` (relations) and :class:`GroundedCaption`.
Per-object extras live under the ``data`` keys below (compare supervision's
``CLASS_NAME_DATA_FIELD``); answer-level extras under ``Detections.metadata``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import supervision as sv
from supervision.config import CLASS_NAME_DATA_FIELD

# per-object ``data`` keys
CLASS_NAME_FIELD = CLASS_NAME_DATA_FIELD  # "class_name"
PHRASE_FIELD = "phrase"  # the phrase as the model wrote it (before label normalization)
TEXT_FIELD = "text"  # OCR: the recognised string
CAPTION_FIELD = "caption"  # REG: the region description
RAW_CLASS_NAME_FIELD = "raw_class_name"  # layout: the label before the synonym table
ENTITY_FIELD = "entity_index"  # grounded caption: which entity a box belongs to
PARSE_NOTES_FIELD = "parse_notes"  # repairs and doubts for this object, "; "-joined ("" if none)
RAW_TEXT_FIELD = "raw_text"  # KeyPoints only (no metadata there): the answer each row came from
PERSON_BOX_FIELD = "person_box"  # KeyPoints: (n, 4) pixel box the pose was asked for
POINT_NAMES_FIELD = "keypoint_names"  # metadata: names of the m key points

# answer-level ``metadata`` keys
RAW_TEXT_KEY = "raw_text"  # the generation exactly as given to parse()
ANSWER_NOTES_KEY = "parse_notes"  # list[str]: notes about the whole answer
TRUNCATED_KEY = "truncated"  # bool: the text ended inside a bracket or tag
CLASSES_KEY = "classes"  # list[str]: the names class_id indexes into


def build_detections(
    xyxy,
    *,
    class_name=None,
    class_id=None,
    confidence=None,
    data=None,
    notes=None,
    raw_text: str = "",
    answer_notes=(),
    classes=None,
) -> sv.Detections:
    """Assemble an ``sv.Detections`` with the project's data and metadata conventions.

    Args:
        xyxy: array-like (n, 4), ``[x1, y1, x2, y2]`` pixels of the original image.
        class_name: n strings, stored in ``data["class_name"]``.
        class_id: n ints, or ``None``.
        confidence: n floats (``None`` entries become NaN), or ``None`` for no confidence at all.
        data: other per-object fields, each of length n.
        notes: n lists of strings, joined into ``data["parse_notes"]``.
        raw_text: the model text, kept in ``metadata["raw_text"]``.
        answer_notes: answer-level notes, kept in ``metadata["parse_notes"]``.
        classes: names that ``class_id`` indexes, kept in ``metadata["classes"]``.

    Returns:
        ``sv.Detections`` with n rows.
    """
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    n = len(xyxy)
    fields = {CLASS_NAME_FIELD: _strings(class_name if class_name is not None else [""] * n)}
    fields.update({k: _column(v) for k, v in (data or {}).items()})
    fields[PARSE_NOTES_FIELD] = _strings("; ".join(x) for x in (notes or [[]] * n))
    metadata = {
        RAW_TEXT_KEY: raw_text,
        ANSWER_NOTES_KEY: list(answer_notes),
        TRUNCATED_KEY: "truncated output" in answer_notes,
    }
    if classes is not None:
        metadata[CLASSES_KEY] = list(classes)
    return sv.Detections(
        xyxy=xyxy,
        class_id=None if class_id is None else np.asarray(class_id, dtype=int).reshape(n),
        confidence=_confidence(confidence, n),
        data=fields,
        metadata=metadata,
    )


def merge_detections(results: list[sv.Detections]) -> sv.Detections:
    """Merge the answers of several questions (e.g. one per region) into one ``sv.Detections``.

    ``metadata["raw_text"]`` becomes the list of answers (one per question, in order), the notes
    are concatenated and ``truncated`` is true if any answer was truncated.
    """
    merged = sv.Detections.merge([_without_metadata(d) for d in results])
    merged.metadata = {
        RAW_TEXT_KEY: [d.metadata.get(RAW_TEXT_KEY, "") for d in results],
        ANSWER_NOTES_KEY: [n for d in results for n in d.metadata.get(ANSWER_NOTES_KEY, [])],
        TRUNCATED_KEY: any(d.metadata.get(TRUNCATED_KEY, False) for d in results),
    }
    return merged


def _without_metadata(detections: sv.Detections) -> sv.Detections:
    return sv.Detections(
        xyxy=detections.xyxy,
        mask=detections.mask,
        confidence=detections.confidence,
        class_id=detections.class_id,
        tracker_id=detections.tracker_id,
        data=dict(detections.data),
    )


def _strings(values) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=str)


def _column(values):
    values = list(values) if not isinstance(values, np.ndarray) else values
    if isinstance(values, list) and (not values or isinstance(values[0], str)):
        return _strings(values)
    return np.asarray(values)


def _confidence(values, n):
    if values is None:
        return None
    values = [np.nan if v is None else float(v) for v in values]
    if n and all(np.isnan(values)):
        return None
    return np.asarray(values, dtype=np.float64).reshape(n)


# -- relations -------------------------------------------------------------------------------------
@dataclass
class SceneGraph:
    """Objects and the relations between them.

    Attributes:
        detections: the objects, ``sv.Detections`` with n rows.
        triples: ``[(subject_index, predicate, object_index), ...]``; indices into ``detections``.

    Raises:
        ValueError: if a triple is not ``(int, str, int)`` or an index is outside ``[0, n)``.
    """

    detections: sv.Detections
    triples: list = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.detections, sv.Detections):
            raise ValueError(
                f"`detections` must be sv.Detections, got {type(self.detections).__name__}"
            )
        n = len(self.detections)
        checked = []
        for triple in self.triples:
            if len(triple) != 3 or not isinstance(triple[1], str):
                raise ValueError(
                    f"a triple must be (subject_index, predicate, object_index), got {triple!r}"
                )
            s, p, o = triple
            for index in (s, o):
                if not isinstance(index, (int, np.integer)) or not 0 <= index < n:
                    raise ValueError(
                        f"triple {triple!r} refers to object {index!r}, expected 0 <= index < {n}"
                    )
            checked.append((int(s), p, int(o)))
        self.triples = checked

    def __len__(self) -> int:
        return len(self.triples)

    def named_triples(self) -> list[tuple[str, str, str]]:
        "The triples with class names instead of indices."
        names = self.detections.data.get(CLASS_NAME_FIELD, [""] * len(self.detections))
        return [(str(names[s]), p, str(names[o])) for s, p, o in self.triples]


# -- grounded captions -----------------------------------------------------------------------------
class Entity(NamedTuple):
    "A grounded phrase: text, ``[start, end)`` span in the caption, boxes (k, 4) in pixels."

    phrase: str
    span: tuple[int, int]
    xyxy: np.ndarray


@dataclass
class GroundedCaption:
    """A caption with grounded phrases (the Kosmos-2 ``post_process_generation`` shape).

    Attributes:
        text: the caption with tags and boxes removed.
        entities: :class:`Entity` tuples ``(phrase, (start, end), xyxy)``; ``text[start:end] ==
            phrase`` and ``xyxy`` has shape (k, 4), pixels of the original image.
        detections: one row per box (``class_name`` = phrase, ``data["entity_index"]``), built
            from ``entities`` when not given.

    Raises:
        ValueError: if a span does not match its phrase or boxes are not (k, 4).
    """

    text: str
    entities: list = field(default_factory=list)
    detections: sv.Detections | None = None

    def __post_init__(self):
        checked = []
        for entity in self.entities:
            phrase, span, xyxy = entity
            start, end = (int(v) for v in span)
            if not 0 <= start <= end <= len(self.text) or self.text[start:end] != phrase:
                raise ValueError(f"entity span {span} does not hold {phrase!r} in the caption")
            xyxy = np.asarray(xyxy, dtype=np.float64)
            if xyxy.ndim != 2 or xyxy.shape[1] != 4:
                raise ValueError(
                    f"entity {phrase!r} boxes must have shape (k, 4), got {xyxy.shape}"
                )
            checked.append(Entity(phrase, (start, end), xyxy))
        self.entities = checked
        if self.detections is None:
            self.detections = self._detections()

    def _detections(self) -> sv.Detections:
        boxes = [e.xyxy for e in self.entities]
        xyxy = np.concatenate(boxes) if boxes else np.empty((0, 4))
        names = [e.phrase for e in self.entities for _ in range(len(e.xyxy))]
        index = [i for i, e in enumerate(self.entities) for _ in range(len(e.xyxy))]
        return build_detections(
            xyxy,
            class_name=names,
            data={ENTITY_FIELD: np.asarray(index, dtype=int)},
            raw_text=self.text,
        )

    def __str__(self) -> str:
        return self.text
