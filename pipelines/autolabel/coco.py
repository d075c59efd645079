"""Merge the work logs into ONE COCO file, streamed, written atomically (temp + rename).

Layout of the output (a superset of COCO detection / keypoints / captions)::

    info        run metadata: model, tasks, prompts, options, versions, date (and ``filters``
                when ``min_score`` / ``nms`` dropped boxes)
    categories  given categories first (``--categories`` file, else the source's, else the
                ontology's in its order; ids kept), new names appended with the id the work log
                recorded for them, else the next id; ``person`` carries the 17 COCO keypoint
                names and the skeleton
    images      {id, file_name (relative to the source root), width, height}; the id is the
                source's own for a COCO source, else the one the work log recorded for the file
                name, else the next one (a fresh run numbers the images 1, 2, ... in source order)
    annotations {id, image_id, category_id, bbox [x, y, w, h] px, area, iscrowd 0, score, task,
                 segmentation (with SAM: compressed RLE, or polygons with
                 ``mask_format="polygon"``), keypoints + num_keypoints (pose),
                 caption (REG), text (OCR), phrase, expression + question_id (REC),
                 caption_id (grounded caption)}
    captions    {id, image_id, caption, task}  (COCO-captions ``annotations`` shape)
    vqa         {id, image_id, question, answer}
    relations   {image_id, subject_id, predicate, object_id}  (annotation ids)
    failures    {file_name, reason}

The merge reads no image: it finds each source item's content hash in the work log (from the
item's own result records, or from a ``seen`` record a run wrote when it skipped the item) and
looks its results up by work key, so duplicated and renamed images get the results of their
content.

Ids stay put across re-runs that add or remove images: the first merge that meets a file name
(or a new category name) gives it an id and records it in the work log (an ``image_id`` /
``category_id`` record); later merges reuse it, and new names get ids after every recorded one.
Boxes may be filtered per image (:class:`~.filters.AnnotationFilter`: ``min_score``, NMS); the
annotation ids count only the annotations written.

The temp folder of section files (``.<out name>.XXXXXXXX/*.part``) and the assembled temp file
(``.<out name>.tmp-PID``) are removed when the merge fails; :func:`remove_debris` removes
those that a killed process left behind. File names with lone surrogates (undecodable bytes) are
written with JSON ``\\u`` escapes, so the file stays valid UTF-8 JSON.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sphinx_tools.coco import coco_annotation, rle_area, rle_to_polygons
from sphinx_tools.parsing import normalize_label

from .engine import SEGMENT, Labeler
from .filters import AnnotationFilter
from .sources import Source
from .worklog import WorkLog, json_text, log_dir_for, work_key

COCO_KEYPOINT_NAMES = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
]
COCO_SKELETON = [
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
    [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7],
]
ID_KINDS = ("image_id", "category_id")  # work-log records of the ids given to names
SECTIONS = ("images", "annotations", "captions", "vqa", "relations", "failures")
FAILURE = "__failure__"
BOX_MATCH_PX = 1.0
MASK_FORMATS = ("rle", "polygon")


@dataclass
class MergeSummary:
    """What the merge wrote: counts per section, images not (yet) labeled, torn log lines, and
    per reason (``min_score``, ``nms``) the annotations the filter dropped."""

    counts: dict = field(default_factory=dict)
    missing: int = 0
    torn_lines: int = 0
    path: Path | None = None
    dropped: dict = field(default_factory=dict)


class Categories:
    """COCO categories by name: the given ones keep their ids, new names get the id recorded for
    them (when no given category has it), else the next id after every given and recorded one.

    Args:
        given: COCO category dicts to start from.
        recorded: ``{name: id}`` given to names by earlier merges (see the module docstring).

    Attributes:
        new: ``{name: id}`` of the names given an id here for the first time (to record).
    """

    def __init__(self, given=(), recorded: dict | None = None):
        self.items = [dict(c) for c in given]
        self.by_name = {c["name"]: c for c in self.items}
        self.recorded = dict(recorded or {})
        taken = {int(c["id"]) for c in self.items}
        self._free = {n: i for n, i in self.recorded.items() if i not in taken}
        self._next = max([*taken, *self.recorded.values()], default=0) + 1
        self.new: dict[str, int] = {}

    def id(self, name: str) -> int:
        "The id of ``name``, adding it when new."
        if name not in self.by_name:
            if name in self._free:
                cid = self._free.pop(name)
            else:
                cid = self._next
                self._next += 1
                if name not in self.recorded:
                    self.new[name] = cid
            entry = {"id": cid, "name": name, "supercategory": name}
            self.items.append(entry)
            self.by_name[name] = entry
        return self.by_name[name]["id"]

    def add_person_keypoints(self) -> None:
        "Make sure ``person`` exists and carries the COCO keypoint names and skeleton."
        self.id("person")
        person = self.by_name["person"]
        person.setdefault("keypoints", COCO_KEYPOINT_NAMES)
        person.setdefault("skeleton", COCO_SKELETON)


class _ArrayFile:
    "A JSON array written element by element to a temp file (never held in memory)."

    def __init__(self, folder: Path, name: str):
        self.path = folder / f"{name}.part"
        self.f = open(self.path, "w", encoding="utf-8")
        self.f.write("[")
        self.n = 0

    def add(self, item: dict) -> None:
        self.f.write(("," if self.n else "") + json_text(item))
        self.n += 1

    def close(self) -> None:
        try:
            self.f.write("]")
        finally:
            self.f.close()

    def abort(self) -> None:
        "Close without finishing (the folder is being removed); never raises."
        try:
            self.f.close()
        except OSError:
            pass


class ImageIds:
    """COCO image ids that stay put: the source's own ids for a COCO source, else the id recorded
    for the file name, else the next id after every recorded and given one.

    Args:
        recorded: ``{file name: id}`` from the work log.
        own: use each item's own id (a COCO source's).

    Attributes:
        new: ``{file name: id}`` of the names given an id here for the first time (to record).
    """

    def __init__(self, recorded: dict | None = None, own: bool = False):
        self.recorded = dict(recorded or {})
        self.own = own
        self._next = max(self.recorded.values(), default=0) + 1
        self.new: dict[str, int] = {}

    def __call__(self, item) -> int:
        if self.own:
            return item.image_id
        name = item.file_name
        if name not in self.recorded:
            self.recorded[name] = self.new[name] = self._next
            self._next += 1
        return self.recorded[name]


class CocoBuilder:
    """Turns one image's task records into COCO entries, streamed to section files.

    Args:
        folder: where the section files go (a temp folder).
        categories: the category table.
        ontology: maps class phrases to category names (``None``: normalized phrase).
        question: the VQA question (written beside each answer).
        mask_format: ``"rle"`` (compressed RLE, exact) or ``"polygon"`` (outer contours, for tools
            that only read polygons; a mask with no 3-point contour stays RLE). ``area`` is the
            mask's pixel count either way.
        annotation_filter: drops boxes task by task (``min_score``, NMS) before pose and REG
            attach to detections; ``None``: keep all.
    """

    def __init__(self, folder: Path, categories: Categories, ontology=None,
                 question: str | None = None, mask_format: str = "rle",
                 annotation_filter: AnnotationFilter | None = None):
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"unknown mask format {mask_format!r}; use one of {MASK_FORMATS}")
        self.mask_format = mask_format
        self.sections = {name: _ArrayFile(folder, name) for name in SECTIONS}
        self.categories = categories
        self.ontology = ontology
        self.question = question
        self.filter = annotation_filter if annotation_filter and annotation_filter.active else None
        self.ids = {name: itertools.count(1) for name in ("annotations", "captions", "vqa")}

    # -- categories ----------------------------------------------------------------------------
    def category(self, phrase: str) -> int | None:
        "The category id for a phrase, or ``None`` when the ontology drops it."
        if self.ontology is not None:
            name = self.ontology.map(phrase)
        else:
            name = normalize_label(phrase or "") or "object"
        return None if name is None else self.categories.id(name)

    def rec_category(self, expression: str) -> int:
        "REC boxes: the ontology class the expression names, else ``object``."
        if self.ontology is not None:
            name = self.ontology.map(expression)
            if name in self.ontology.names:
                return self.categories.id(name)
        return self.categories.id("object")

    # -- images --------------------------------------------------------------------------------
    def add_image(self, item, wh, results: dict, image_id: int | None = None) -> None:
        "Write one labeled image (as ``image_id``, default the item's) and everything found on it."
        image_id = item.image_id if image_id is None else image_id
        self.sections["images"].add({"id": image_id, "file_name": item.file_name,
                                     "width": int(wh[0]), "height": int(wh[1])})
        anns: dict[str, list] = {}  # task -> per box of its record, the annotation (or None)
        for task, result in results.items():
            if task != SEGMENT:
                anns[task] = self._filtered(self._task(task, result, image_id, anns))
        if SEGMENT in results:
            self._masks(results[SEGMENT], anns)
        for ann in (a for task_anns in anns.values() for a in task_anns if a is not None):
            ann["id"] = next(self.ids["annotations"])
            self.sections["annotations"].add(ann)
        if "relation" in results:
            self._relations(results["relation"], anns["relation"], image_id)

    def add_failure(self, item, reason: str, image_id: int | None = None) -> None:
        self.sections["failures"].add({"file_name": item.file_name,
                                       "image_id": item.image_id if image_id is None else image_id,
                                       "reason": reason})

    def _filtered(self, anns: list) -> list:
        "``anns`` with the boxes the filter drops as ``None`` (positions kept for masks)."
        if self.filter is None:
            return anns
        return [a if k else None for a, k in zip(anns, self.filter.keep(anns), strict=True)]

    def _task(self, task: str, result: dict, image_id: int, anns: dict) -> list:
        kind = result["type"]
        if kind == "rec":
            return self._rec(result, image_id)
        if kind == "text":
            self._text(task, result["text"], image_id)
            return []
        if kind == "keypoints":
            return self._pose(result, image_id, anns.get("detection"))
        if kind == "grounded_caption":
            caption_id = self._caption(result["caption"], image_id, task)
            return self._boxes(task, result["detections"], image_id, {"caption_id": caption_id})
        if kind == "scene_graph":
            return self._boxes(task, result["detections"], image_id)
        if task == "reg" and anns.get("detection") is not None:
            return self._attach_captions(result, anns["detection"])
        return self._boxes(task, result, image_id)

    def _annotation(self, image_id, category_id, xyxy, score, task, **extra) -> dict:
        x1, y1, x2, y2 = (float(v) for v in xyxy)
        extra = {k: v for k, v in extra.items() if v is not None}
        # the id is given when the annotation is written; an inverted box has no width/height
        return coco_annotation(None, image_id, category_id, (x1, y1, max(x1, x2), max(y1, y2)),
                               digits=2, score=1.0 if score is None else score, task=task, **extra)

    def _boxes(self, task, det: dict, image_id, common=None) -> list:
        out = []
        for j, box in enumerate(det["boxes"]):
            category_id = self.category(det["class_name"][j])
            if category_id is None:
                out.append(None)
                continue
            extra = {name: det[name][j] for name in ("text", "caption", "phrase") if name in det}
            if task != "ocr":
                extra.pop("text", None)
            out.append(self._annotation(image_id, category_id, box, det["scores"][j], task,
                                        **extra, **(common or {})))
        return out

    def _rec(self, result, image_id) -> list:
        out = []
        for item in result["items"]:
            for j, box in enumerate(item["boxes"]):
                out.append(self._annotation(image_id, self.rec_category(item["expression"]), box,
                                            item["scores"][j], "rec",
                                            expression=item["expression"],
                                            question_id=item["question_id"]))
        return out

    def _pose(self, result, image_id, detections) -> list:
        out = []
        for person in result["people"]:
            kps = person["keypoints"]
            target = _match(detections, person["box"]) if person["box"] else None
            extra = {"keypoints": kps, "num_keypoints": sum(1 for v in kps[2::3] if v > 0)}
            if target is not None:
                target.update(extra, keypoint_score=person["score"])
                out.append(None)  # the person is the detection's annotation
                continue
            out.append(self._annotation(image_id, self.categories.id("person"),
                                        _person_box(person), person["score"], "pose", **extra))
        return out

    def _attach_captions(self, result, detections) -> list:
        for j, box in enumerate(result["boxes"]):
            target = _match(detections, box)
            if target is not None:
                target["caption"] = result["caption"][j] if "caption" in result else \
                    result["class_name"][j]
        return []

    def _text(self, task, text: str, image_id) -> None:
        if task == "vqa":
            self.sections["vqa"].add({"id": next(self.ids["vqa"]), "image_id": image_id,
                                      "question": self.question, "answer": text})
        else:
            self._caption(text, image_id, task)

    def _caption(self, text: str, image_id, task) -> int:
        caption_id = next(self.ids["captions"])
        self.sections["captions"].add({"id": caption_id, "image_id": image_id, "caption": text,
                                       "task": task})
        return caption_id

    def _masks(self, record: dict, anns: dict) -> None:
        for task, rles in record["masks"].items():
            for ann, rle in zip(anns.get(task, []), rles, strict=False):
                if ann is not None and rle is not None:
                    polygons = rle_to_polygons(rle) if self.mask_format == "polygon" else None
                    ann["segmentation"] = polygons or rle
                    ann["area"] = rle_area(rle)

    def _relations(self, result, anns: list, image_id) -> None:
        for s, predicate, o in result["triples"]:
            if anns[s] is None or anns[o] is None:
                continue
            self.sections["relations"].add({"image_id": image_id, "subject_id": anns[s]["id"],
                                            "predicate": predicate, "object_id": anns[o]["id"]})

    def close(self) -> dict:
        try:
            for section in self.sections.values():
                section.close()
        except BaseException:
            self.abort()
            raise
        return {name: s.n for name, s in self.sections.items()}

    def abort(self) -> None:
        for section in self.sections.values():
            section.abort()


def _match(annotations, xyxy):
    "The annotation whose box equals ``xyxy`` (within a pixel), or ``None``."
    if not annotations:
        return None
    x1, y1, x2, y2 = xyxy
    for ann in annotations:
        if ann is None:
            continue
        bx, by, bw, bh = ann["bbox"]
        if np.allclose([bx, by, bx + bw, by + bh], [x1, y1, x2, y2], atol=BOX_MATCH_PX):
            return ann
    return None


def _person_box(person) -> list:
    "Pose without detection: the visible key points' extent (else the box asked about)."
    kps = np.asarray(person["keypoints"], dtype=float).reshape(-1, 3)
    seen = kps[kps[:, 2] > 0, :2]
    if len(seen) >= 2:
        (x1, y1), (x2, y2) = seen.min(0), seen.max(0)
        return [x1, y1, x2, y2]
    return person["box"] or [0, 0, 0, 0]


# -- the merge -------------------------------------------------------------------------------------
@dataclass
class LogIndex:
    """Where the work log's records are, read once.

    Attributes:
        results: work key -> ``(t, file number, offset)`` of its newest result record.
        hashes: file name -> ``{content hash: t}``, the newest time each hash was logged for it
            (by a result or a seen record).
        failures: file name -> ``(t, file number, offset)`` of its newest failure record.
        image_ids: file name -> the image id recorded for it.
        category_ids: category name -> the id recorded for it.
    """

    results: dict = field(default_factory=dict)
    hashes: dict = field(default_factory=dict)
    failures: dict = field(default_factory=dict)
    image_ids: dict = field(default_factory=dict)
    category_ids: dict = field(default_factory=dict)


def index_log(log: WorkLog) -> LogIndex:
    "Index every complete record of every rank's log (see :class:`LogIndex`)."
    index = LogIndex()
    for number, offset, r in log.entries():
        kind, t, name = r.get("kind"), r.get("t", 0.0), r.get("file_name")
        if kind == ID_KINDS[0] and isinstance(r.get("image_id"), int):
            index.image_ids.setdefault(name, r["image_id"])  # the first one recorded
            continue
        if kind == ID_KINDS[1] and isinstance(r.get("category_id"), int):
            index.category_ids.setdefault(r.get("name"), r["category_id"])
            continue
        if kind == "failure":
            if name not in index.failures or t >= index.failures[name][0]:
                index.failures[name] = (t, number, offset)
            continue
        if kind not in ("result", "seen"):
            continue
        digest = r.get("hash")
        if name is not None and digest is not None:
            known = index.hashes.setdefault(name, {})
            known[digest] = max(t, known.get(digest, t))
        if kind == "result" and (r["key"] not in index.results or t >= index.results[r["key"]][0]):
            index.results[r["key"]] = (t, number, offset)
    return index


def _pick(labeler: Labeler, index: LogIndex, item, tasks) -> tuple[dict | None, float]:
    """The results of ``item`` for its newest content hash that has every task done, by work key:
    ``({task: (file number, offset)}, t)`` with ``t`` when that hash was last logged for it."""
    known = index.hashes.get(item.file_name, {})
    for digest, t in sorted(known.items(), key=lambda e: (e[1], e[0]), reverse=True):
        keys = labeler.keys(digest, item)
        found = {task: index.results.get(keys[task]) for task in tasks}
        if all(found.values()):
            return {task: (where[1], where[2]) for task, where in found.items()}, t
    return None, 0.0


def write_coco(out, source: Source, labeler: Labeler, *, limit: int | None = None,
               metadata: dict | None = None, mask_format: str = "rle",
               categories: list | None = None,
               annotation_filter: AnnotationFilter | None = None) -> MergeSummary:
    """Merge every rank's work log into the COCO file ``out`` (atomically replaced).

    Images come in source order; an image is written when every task has a current record (its
    key matches this configuration, whichever file name it was logged under), as a failure when
    its newest record is one, and is counted as missing otherwise.

    Args:
        out: the output path.
        source: the labeled source (its order, ids and categories).
        labeler: the configuration the records must match (tasks, prompts, model, ...).
        limit: only the first ``limit`` images of the source.
        metadata: extra run metadata for ``info``.
        mask_format: SAM masks as ``"rle"`` (compressed RLE) or ``"polygon"`` (see
            :class:`CocoBuilder`).
        categories: COCO categories whose names and ids to use (e.g. the ground truth's, so
            that a plain COCOeval against it is right); default the source's, else the
            ontology's.
        annotation_filter: drop boxes by score and NMS (counted in ``MergeSummary.dropped``).

    Returns:
        A :class:`MergeSummary`.

    Raises:
        OSError: when the output cannot be written (a full disk, say); the previous ``out`` is
            left as it was and no temp file or folder is left behind.
    """
    out = Path(out)
    log = WorkLog(log_dir_for(out), rank=0)
    index = index_log(log)
    given = categories or source.categories or _ontology_categories(labeler.ontology)
    categories = Categories(given, index.category_ids)
    if "pose" in labeler.names:
        categories.add_person_keypoints()
    image_ids = ImageIds(index.image_ids, own=source.kind == "coco")
    tasks = labeler.work_names
    summary = MergeSummary(torn_lines=log.torn_lines)
    flt = annotation_filter if annotation_filter is not None and annotation_filter.active else None
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        builder = CocoBuilder(Path(tmp), categories, labeler.ontology,
                              labeler.options.get("vqa", {}).get("question"), mask_format, flt)
        try:
            items = source.items() if limit is None else itertools.islice(source.items(), limit)
            for item in items:
                image_id = image_ids(item)
                chosen, t = _pick(labeler, index, item, tasks)
                failure = index.failures.get(item.file_name)
                if failure is not None and failure[0] > t:
                    builder.add_failure(item, log.read(failure[1], failure[2])["reason"],
                                        image_id)
                elif chosen is not None:
                    records = {task: log.read(*where) for task, where in chosen.items()}
                    wh = next(iter(records.values()))["wh"]
                    builder.add_image(item, wh, {task: r["result"] for task, r in records.items()},
                                      image_id)
                else:
                    summary.missing += 1
        except BaseException:
            builder.abort()
            log.close()
            raise
        summary.counts = builder.close()
        info = _info(labeler, source, metadata)
        if flt is not None:
            info["filters"] = {**flt.settings(), "dropped": dict(flt.dropped)}
            summary.dropped = dict(flt.dropped)
        head = {"info": info, "licenses": [], "categories": categories.items}
        try:
            _assemble(out, Path(tmp), head)
            log.append(_id_records(image_ids.new, categories.new))
        finally:
            log.close()
    summary.path = out
    return summary


def _id_records(image_ids: dict, category_ids: dict) -> list[dict]:
    "Work-log records of the ids given to names for the first time (see the module docstring)."
    records = [{"kind": ID_KINDS[0], "key": work_key(ID_KINDS[0], name), "file_name": name,
                "image_id": i} for name, i in image_ids.items()]
    return records + [{"kind": ID_KINDS[1], "key": work_key(ID_KINDS[1], name), "name": name,
                       "category_id": i} for name, i in category_ids.items()]


def _ontology_categories(ontology) -> list:
    if ontology is None:
        return []
    return [{"id": i + 1, "name": n, "supercategory": n} for i, n in enumerate(ontology.names)]


def _assemble(out: Path, folder: Path, head: dict) -> None:
    """Write ``head`` plus the section files as one JSON object to a temp file, fsync, rename.

    On any error (a full disk, say) the temp file is removed and ``out`` is left as it was.
    """
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json_text(head)[:-1])
            for name in SECTIONS:
                f.write(f', "{name}": ')
                with open(folder / f"{name}.part", encoding="utf-8") as part:
                    shutil.copyfileobj(part, f)
            f.write("}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


# ``tempfile`` names its folders with 8 characters of this alphabet after the prefix.
_TEMP_DIR = re.compile(r"[a-z0-9_]{8}")
_TEMP_FILE = re.compile(r"tmp-[0-9]+")


def remove_debris(out) -> list[Path]:
    """Remove what a killed merge of ``out`` left beside it; returns what was removed.

    That is ``.<out name>.tmp-PID`` files and ``.<out name>.XXXXXXXX/`` folders that hold only
    ``*.part`` section files; nothing else is touched. Call it only while no other process can be
    merging into ``out`` (the ``label`` command holds the output lock).
    """
    out = Path(out)
    prefix = f".{out.name}."
    removed = []
    try:
        candidates = sorted(out.parent.iterdir())
    except OSError:
        return removed
    for path in candidates:
        name = path.name
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        try:
            if _TEMP_FILE.fullmatch(rest) and path.is_file() and not path.is_symlink():
                path.unlink()
                removed.append(path)
            elif _TEMP_DIR.fullmatch(rest) and path.is_dir() and not path.is_symlink() and all(
                    p.suffix == ".part" and p.is_file() and not p.is_symlink()
                    for p in path.iterdir()):
                shutil.rmtree(path)
                removed.append(path)
        except OSError:
            continue  # vanished meanwhile, or not ours to remove: leave it
    return removed


def _info(labeler: Labeler, source: Source, metadata: dict | None) -> dict:
    import datetime
    import platform

    import supervision
    import sphinx_tools

    from .engine import PARSER_VERSION

    prompts = {}
    for name in labeler.names:
        task = labeler.tasks[name]
        try:
            prompts[name] = task.template(task.options(**{
                k: v for k, v in labeler.options[name].items() if k in task.Options.model_fields}))
        except ValueError:
            prompts[name] = None
    versions = {"sphinx_tools": sphinx_tools.__version__, "supervision": supervision.__version__,
                "python": platform.python_version(), "parser": PARSER_VERSION}
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    return {
        "description": "SPHINX auto-labels (sphinx-tools label)",
        "date_created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "model": labeler.model_id,
        "tasks": labeler.names,
        "prompts": prompts,
        "task_options": labeler.options,
        "sampling": {**labeler.sampling, "max_gen_len": {n: labeler.budget(n) for n in labeler.names}},
        "ontology": None if labeler.ontology is None else labeler.ontology.fingerprint(),
        "sam": labeler.sam_id if labeler.uses_sam else None,
        "source": {"location": str(source.location), "kind": source.kind},
        "versions": versions,
        **(metadata or {}),
    }
