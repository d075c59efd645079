"""Which COCO annotations to keep: by task, by confidence, and after non-maximum suppression.

One image's annotations at a time, as COCO dicts (``bbox`` ``[x, y, w, h]``, ``score``,
``category_id``, ``task``). The merge (:func:`~.coco.write_coco`) and the exports
(:mod:`.export`) both filter through :class:`AnnotationFilter`, so the COCO file and every export
drop the same boxes. NMS is supervision's (:func:`sv.box_non_max_suppression`), run per task (a
detection box never suppresses an OCR box) and per category unless ``class_agnostic``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_TASK = "detection"  # annotations without a ``task`` (files not written by `label`)


@dataclass
class AnnotationFilter:
    """What to drop, and how many were dropped so far.

    Args:
        tasks: keep only annotations of these tasks (``None``: every task). An annotation without
            a ``task`` counts as ``detection``; a detection that pose or REG added to (its
            ``keypoints``, its ``caption``) also counts as ``pose`` or ``reg``.
        min_score: drop annotations whose ``score`` is below it (``None``: off).
        nms: IoU above which the lower-scored of two boxes of one task and category is dropped
            (``None``: off).
        class_agnostic: NMS across categories (still within one task).

    Attributes:
        dropped: per reason (``"task"``, ``"min_score"``, ``"nms"``), the annotations dropped.

    Raises:
        ValueError: naming a ``min_score`` or ``nms`` outside [0, 1].
    """

    tasks: tuple[str, ...] | None = None
    min_score: float | None = None
    nms: float | None = None
    class_agnostic: bool = False
    dropped: dict = field(default_factory=lambda: {"task": 0, "min_score": 0, "nms": 0})

    def __post_init__(self):
        for name in ("min_score", "nms"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.tasks is not None:
            self.tasks = tuple(self.tasks)

    @property
    def active(self) -> bool:
        return self.tasks is not None or self.min_score is not None or self.nms is not None

    def settings(self) -> dict:
        "The filter as JSON-able settings (recorded in the COCO file's ``info``)."
        return {"tasks": None if self.tasks is None else list(self.tasks),
                "min_score": self.min_score, "nms": self.nms,
                "nms_class_agnostic": self.class_agnostic}

    def keep(self, annotations: list) -> list[bool]:
        """Per annotation of one image, whether it stays (``None`` entries are kept, as holes).

        Counts what it drops in :attr:`dropped`.
        """
        keep = [True] * len(annotations)
        live = [i for i, a in enumerate(annotations) if a is not None]
        if self.tasks is not None:
            for i in live:
                if not tasks_of(annotations[i]) & set(self.tasks):
                    keep[i] = False
                    self.dropped["task"] += 1
            live = [i for i in live if keep[i]]
        if self.min_score is not None:
            for i in live:
                if _score(annotations[i]) < self.min_score:
                    keep[i] = False
                    self.dropped["min_score"] += 1
            live = [i for i in live if keep[i]]
        if self.nms is not None and len(live) > 1:
            groups: dict = {}
            for i in live:
                a = annotations[i]
                groups.setdefault(a.get("task", DEFAULT_TASK), []).append(i)
            for members in groups.values():
                for i, kept in zip(members, self._nms([annotations[i] for i in members]),
                                   strict=True):
                    if not kept:
                        keep[i] = False
                        self.dropped["nms"] += 1
        return keep

    def apply(self, annotations: list) -> list:
        "The annotations :meth:`keep` keeps (``None`` entries stay)."
        return [a for a, k in zip(annotations, self.keep(annotations), strict=True) if k]

    def _nms(self, annotations: list[dict]) -> np.ndarray:
        import supervision as sv

        if len(annotations) < 2:
            return np.ones(len(annotations), bool)
        rows = []
        for a in annotations:
            x, y, w, h = (float(v) for v in a["bbox"])
            row = [x, y, x + w, y + h, _score(a)]
            if not self.class_agnostic:
                row.append(float(a.get("category_id", 0)))
            rows.append(row)
        return sv.box_non_max_suppression(np.asarray(rows, dtype=np.float64),
                                          iou_threshold=float(self.nms))


def tasks_of(annotation: dict) -> set[str]:
    "The tasks an annotation holds results of (see :class:`AnnotationFilter`)."
    tasks = {annotation.get("task", DEFAULT_TASK)}
    if "keypoints" in annotation:
        tasks.add("pose")
    if "caption" in annotation and "caption_id" not in annotation:
        tasks.add("reg")
    return tasks


def _score(annotation: dict) -> float:
    score = annotation.get("score")
    return 1.0 if score is None else float(score)
