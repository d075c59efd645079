"""Human pose: person region -> COCO-17 key points.

docs/formats.md §4.6: prompt VERIFIED, output INFERRED.

Prompt: ``Detect the key points of the person in the region [x1,y1,x2,y2].`` with the person box in
SPHINX's coordinate form (the whole image if no box is given). Expected answer: one
``<p>{name}</p> [x,y]`` per visible key point, names as COCO with spaces (``left eye``). The demo
reads one person per answer, so several people are asked one box at a time (``boxes=[...]`` with
``run_task``); a name repeated within one answer starts another person. SPHINX-X writes one
flat list of 17 x,y pairs in COCO order with no names (``... human keypoints [0.64,0.32, ...,
0.68,0.74]``): a group of exactly 34 numbers is one person read that way.

Result: ``sv.KeyPoints`` with ``xy`` (n, 17, 2) pixels in COCO order and ``visible`` (n, 17): a
point that is missing, written as ``[0,0]`` or lying in the padding band is not visible (its xy is
0 or clipped). ``keypoint_confidence`` (n, 17) and ``detection_confidence`` (n,) come from token
log-probs (0 for missing points) and are ``None`` without them.
"""

import numpy as np
import supervision as sv

from sphinx_tools.annotations import (
    CLASS_NAME_FIELD,
    PARSE_NOTES_FIELD,
    PERSON_BOX_FIELD,
    RAW_TEXT_FIELD,
)
from sphinx_tools.hookspecs import hookimpl
from sphinx_tools.parsing import find_mentions, normalize_label, points_to_pixels, region_text
from sphinx_tools.tasks import Task, TaskOptions, split_per

COCO_KEYPOINTS = (
    "nose",
    "left eye",
    "right eye",
    "left ear",
    "right ear",
    "left shoulder",
    "right shoulder",
    "left elbow",
    "right elbow",
    "left wrist",
    "right wrist",
    "left hip",
    "right hip",
    "left knee",
    "right knee",
    "left ankle",
    "right ankle",
)
# 1-based COCO skeleton, as in the SPHINX demo
COCO_SKELETON = (
    (16, 14),
    (14, 12),
    (17, 15),
    (15, 13),
    (12, 13),
    (6, 12),
    (7, 13),
    (6, 7),
    (6, 8),
    (7, 9),
    (8, 10),
    (9, 11),
    (2, 3),
    (1, 2),
    (1, 3),
    (2, 4),
    (3, 5),
    (4, 6),
    (5, 7),
)
_INDEX = {name: i for i, name in enumerate(COCO_KEYPOINTS)}
FLAT_VALUES = 2 * len(COCO_KEYPOINTS)  # one unnamed list of every point: x1,y1,...,x17,y17
MAX_SHARED_NOTES = 50  # answer-level notes repeated in each person's parse_notes
_ALIASES = {"l": "left", "r": "right", "lt": "left", "rt": "right"}

Box = tuple[float, float, float, float]


def keypoint_index(phrase: str) -> int | None:
    "COCO index of a key-point name (``Left_Eye``, ``left eyes``, ``the nose``), or ``None``."
    words = normalize_label(phrase).split()
    words = [_ALIASES.get(w, w) for w in words]
    return _INDEX.get(" ".join(words))


class PoseOptions(TaskOptions):
    """Attributes:
    box: the person's ``[x1, y1, x2, y2]`` in pixels (default: the whole image).
    boxes: several people, asked one box at a time by ``run_task``.
    image_size: ``(width, height)``; needed to put the box into the prompt.
    """

    box: Box | None = None
    boxes: list[Box] | None = None
    image_size: tuple[int, int] | None = None


class Pose(Task):
    "Person box -> ``sv.KeyPoints`` (17 COCO key points per person)."

    name = "pose"
    output = sv.KeyPoints
    description = "Human pose: person region(s) -> COCO-17 key points"
    templates = {"default": "Detect the key points of the person in the region {region}."}
    Options = PoseOptions
    max_gen_len = 512
    keypoint_names = COCO_KEYPOINTS
    skeleton = COCO_SKELETON

    def prompt_fields(self, opts):
        if opts.image_size is None:
            raise ValueError("task 'pose' needs `image_size` (width, height) to write the region")
        w, h = opts.image_size
        box = opts.box if opts.box is not None else (0, 0, w, h)
        return {"region": region_text(box, (w, h), self.name, "box")}

    def split(self, **options):
        return split_per(options, "boxes", "box")

    def merge(self, results):
        return sv.KeyPoints.merge(results)

    def parse_answer(self, answer, image_wh, opts):
        people, notes = self._read_points(answer, image_wh, opts)
        people = [p for p in people if p["visible"].any()]
        if not people:
            return self.empty(answer, image_wh, opts, notes + ["no key point found"])
        if len(people) > opts.max_objects:
            people = people[: opts.max_objects]
            notes.append(f"stopped at max_objects={opts.max_objects}")
        box = np.asarray(opts.box if opts.box is not None else (0, 0, *image_wh), dtype=np.float64)
        for person in people:
            self._check_inside(person, box)
        return self._key_points(answer, people, box, notes)

    def _read_points(self, answer, image_wh, opts):
        "One dict per person: xy (17, 2), visible (17,), spans (17 lists), notes."
        placed, notes, unnamed = [], [], []  # placed: (person, key point, group, spans)
        flats = []  # (person, group of 34 numbers)
        written = [set()]  # the key points of each person so far
        for mention in find_mentions(answer.text, opts.recover_decimals):
            if mention.bracket is None:
                continue
            flat = [g for g in mention.bracket.groups if len(g.values) == FLAT_VALUES]
            for group in flat:  # SPHINX-X: one person's 17 points as one list, no names
                if written[-1]:
                    written.append(set())
                written[-1].update(range(len(COCO_KEYPOINTS)))
                flats.append((len(written) - 1, group))
                notes.extend(group.notes)
            if flat:
                notes.append(f"{len(flat)} unnamed list(s) of 17 points read in COCO order")
            points = [g for g in mention.bracket.groups if len(g.values) == 2]
            dropped = len(mention.bracket.groups) - len(points) - len(flat)
            if dropped:
                notes.append(f"{dropped} group(s) that are not x,y points dropped")
            if mention.phrase is None:
                unnamed += points
                continue
            index = keypoint_index(mention.phrase.text)
            if index is None:
                if not flat:  # the phrase of a flat list names the person, not a point
                    notes.append(f"unknown key point {mention.phrase.text!r} ignored")
                continue
            for group in points[:1]:
                if index in written[-1]:
                    written.append(set())  # a repeated name: the next person
                written[-1].add(index)
                placed.append((len(written) - 1, index, group, [mention.phrase.span]))
            if len(points) > 1:
                notes.append(f"{mention.phrase.text!r} has {len(points)} points, kept the first")
        if not placed and len(unnamed) == len(COCO_KEYPOINTS):
            notes.append("unnamed points read in COCO order")
            placed = [(0, index, group, []) for index, group in enumerate(unnamed)]
        elif unnamed:
            notes.append(f"{len(unnamed)} point(s) without a name ignored")
        people = self._people(len(written), placed, image_wh)
        _place_flat(people, flats, image_wh)
        return self._dedupe(people, notes), notes

    @staticmethod
    def _people(n, placed, image_wh):
        "``n`` people with the ``placed`` points, mapped to pixels all at once."
        xy = np.zeros((n, 17, 2))
        visible = np.zeros((n, 17), bool)
        written = np.zeros((n, 17), bool)
        people = [
            {
                "xy": xy[i],
                "visible": visible[i],
                "written": written[i],
                "spans": [[] for _ in range(17)],
                "notes": [],
            }
            for i in range(n)
        ]
        values = [group.values for _, _, group, _ in placed]
        pixels, seen, point_notes = points_to_pixels(values, image_wh)
        for k, (i, index, group, spans) in enumerate(placed):
            person = people[i]
            xy[i, index], visible[i, index], written[i, index] = pixels[k], seen[k], True
            person["spans"][index] = spans + [group.span]
            person["notes"] += [
                f"{COCO_KEYPOINTS[index]}: {note}" for note in list(group.notes) + point_notes[k]
            ]
        return people

    @staticmethod
    def _dedupe(people, notes):
        kept, seen = [], set()
        rounded = np.round(np.stack([p["xy"] for p in people]), 1)
        for person, xy in zip(people, rounded, strict=True):
            key = (tuple(xy.ravel().tolist()), tuple(person["visible"].tolist()))
            if key in seen:
                continue
            seen.add(key)
            kept.append(person)
        if len(kept) < len(people):
            notes.append(f"{len(people) - len(kept)} repeated person(s) removed")
        if len(kept) > 1:
            notes.append(f"{len(kept)} people in one answer")
        return kept

    @staticmethod
    def _check_inside(person, box, margin=0.1):
        "Note visible points well outside the person box they were asked for."
        w, h = box[2] - box[0], box[3] - box[1]
        lo = box[:2] - margin * np.array([w, h])
        hi = box[2:] + margin * np.array([w, h])
        outside = person["visible"] & ((person["xy"] < lo) | (person["xy"] > hi)).any(axis=1)
        for index in np.flatnonzero(outside):
            person["notes"].append(f"{COCO_KEYPOINTS[index]}: outside the requested region")

    def _key_points(self, answer, people, box, notes):
        n = len(people)
        keypoint_confidence = detection_confidence = None
        if answer.logprobs is not None:
            keypoint_confidence = np.zeros((n, 17), dtype=np.float32)
            detection_confidence = np.zeros(n, dtype=np.float32)
            for i, person in enumerate(people):
                for j in np.flatnonzero(person["visible"]):
                    keypoint_confidence[i, j] = answer.confidence(person["spans"][j]) or 0.0
                spans = [s for j in np.flatnonzero(person["visible"]) for s in person["spans"][j]]
                detection_confidence[i] = answer.confidence(spans) or 0.0
        shared = _shared_notes(notes)
        row_notes = ["; ".join(shared + p["notes"]) for p in people]
        return sv.KeyPoints(
            xy=np.stack([p["xy"] for p in people]).astype(np.float32),
            class_id=np.zeros(n, dtype=int),
            keypoint_confidence=keypoint_confidence,
            detection_confidence=detection_confidence,
            visible=np.stack([p["visible"] for p in people]),
            data=self._data(n, box, answer.raw, row_notes),
        )

    @staticmethod
    def _data(n, box, raw, notes):
        return {
            CLASS_NAME_FIELD: np.array(["person"] * n, dtype=str),
            PERSON_BOX_FIELD: np.tile(box, (n, 1)).reshape(n, 4),
            RAW_TEXT_FIELD: _repeated(raw, n),
            PARSE_NOTES_FIELD: np.array(notes, dtype=str),
        }

    def empty(self, answer, image_wh, opts, notes=()):
        return sv.KeyPoints(
            xy=np.empty((0, 17, 2), dtype=np.float32),
            class_id=np.empty(0, dtype=int),
            visible=np.empty((0, 17), dtype=bool),
            data=self._data(0, np.empty((0, 4)), "", []),
        )


def _place_flat(people, flats, image_wh) -> None:
    "Fill the people written as 34 numbers (x,y pairs in COCO order), all mapped at once."
    if not flats:
        return
    values = np.array([group.values for _, group in flats], dtype=np.float64).reshape(-1, 2)
    pixels, seen, point_notes = points_to_pixels(values, image_wh)
    pixels = pixels.reshape(len(flats), len(COCO_KEYPOINTS), 2)
    seen = seen.reshape(len(flats), len(COCO_KEYPOINTS))
    for k, (i, group) in enumerate(flats):
        person = people[i]
        person["xy"][:], person["visible"][:], person["written"][:] = pixels[k], seen[k], True
        person["spans"] = [[group.span]] * len(COCO_KEYPOINTS)  # one list, read only
        for j in np.flatnonzero(~seen[k]):
            person["notes"] += [
                f"{COCO_KEYPOINTS[j]}: {note}"
                for note in point_notes[k * len(COCO_KEYPOINTS) + j]
            ]


def _shared_notes(notes: list[str]) -> list[str]:
    "The answer's notes as each person's row carries them: at most ``MAX_SHARED_NOTES``."
    if len(notes) <= MAX_SHARED_NOTES:
        return notes
    return notes[:MAX_SHARED_NOTES] + [f"{len(notes) - MAX_SHARED_NOTES} more note(s)"]


def _repeated(text: str, n: int) -> np.ndarray:
    "``n`` references to one string (an object array: a long answer is not copied per row)."
    out = np.empty(n, dtype=object)
    out[:] = [text] * n
    return out


@hookimpl
def register_tasks(register):
    register(Pose())
