"""Exports of a COCO file: YOLO and Pascal VOC through supervision, Label Studio, filtered COCO.

``sphinx-tools export LABELS.json --format yolo,voc,label-studio,coco --out DIR`` and
``sphinx-tools label ... --format ...`` both call :func:`export` once per format. Every format
reads the COCO file through the same :class:`~.filters.AnnotationFilter` (``tasks``,
``min_score``, ``nms``), so they all hold the same boxes.

- ``yolo``: the layout ultralytics trains on as written: ``images/{train,val}/`` (the images,
  linked or copied: ``image_mode``), ``labels/{train,val}/*.txt`` (supervision's YOLO writer;
  polygons when masks exist) and ``data.yaml`` with ``path`` (the folder, absolute: edit it when
  the folder moves), ``train``, ``val`` and ``names``. ``split`` (the train fraction) sends a
  seeded, stable choice of images to ``val``; without it every image is in ``train`` and ``val``
  names the same folder.
- ``voc``: ``*.xml`` (supervision's Pascal VOC writer).
- ``label-studio``: a tasks JSON, one task per image with a ``predictions`` entry, and beside it
  ``<name>.xml``, the labeling config whose control names match the predictions' ``from_name``
  (``label`` rectangles, ``polygon`` mask polygons, ``keypoints``, ``transcription`` text per
  region) and ``to_name`` (``image``). ``data.image`` is ``image_url_prefix`` + the file name, or
  without a prefix Label Studio's local-files form ``/data/local-files/?d=<absolute path without
  its leading />`` (serve with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
  ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=/``). Mask parts smaller than ``min_polygon_area``
  pixels are left out (specks of a noisy mask would each be a polygon), and the others are
  simplified to ``simplify``
  pixels (``cv2.approxPolyDP``).
- ``coco``: the filtered COCO file.

Beside the COCO file (``label``): ``<stem>_yolo/``, ``<stem>_voc/``, ``<stem>.label-studio.json``
(+ ``.xml``). In a folder (``export --out DIR``): ``DIR/yolo/``, ``DIR/voc/``,
``DIR/label-studio.json`` (+ ``.xml``), ``DIR/coco.json``.

The YOLO and VOC exports read the COCO file the way ``sv.DetectionDataset.from_coco`` does, one
image at a time, and take image sizes from the COCO file. A mask that a writer cannot turn into
polygons (supervision raises for some masks with holes), or a segmentation that cannot be read,
is written as its box; such masks are counted in :attr:`Exported.fallbacks`. Label Studio leaves
them out (the box is there already) and counts them the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote
from xml.etree import ElementTree

import numpy as np

from .filters import AnnotationFilter
from .worklog import json_text

LABEL_STUDIO_FROM = {"box": "label", "keypoint": "keypoints", "text": "transcription",
                     "polygon": "polygon"}
LABEL_STUDIO_LOCAL_FILES = "/data/local-files/?d="
FORMATS = ("coco", "yolo", "voc", "label-studio")
IMAGE_MODES = ("symlink", "copy", "hardlink", "none")
SIMPLIFY_PX = 1.0
MIN_POLYGON_AREA_PX = 16.0


@dataclass(frozen=True)
class Exported:
    """Where an export went, and what it could not write as asked.

    Attributes:
        path: the export's folder (YOLO, VOC) or file (Label Studio, COCO).
        fallbacks: masks that could not be converted to the format's polygons and were written
            as their box instead (Label Studio: left out, the box is there already).
        missing_images: YOLO: images not found under the images root (their labels are written,
            the image is not).
        dropped: per reason (``task``, ``min_score``, ``nms``), the annotations the filter
            dropped; ``None`` when no filter was asked for.
    """

    path: Path
    fallbacks: int = 0
    missing_images: int = 0
    dropped: dict | None = None


def default_path(coco_path, fmt: str, out_dir=None) -> Path:
    "Where :func:`export` writes ``fmt``: in ``out_dir``, or beside ``coco_path`` (see above)."
    coco_path = Path(coco_path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if out_dir is not None:
        return Path(out_dir) / {"yolo": "yolo", "voc": "voc", "label-studio": "label-studio.json",
                                "coco": "coco.json"}[fmt]
    stem = coco_path.with_suffix("")
    return Path({"yolo": f"{stem}_yolo", "voc": f"{stem}_voc",
                 "label-studio": f"{stem}.label-studio.json",
                 "coco": f"{stem}.filtered.json"}[fmt])


def export(coco_path, fmt: str, images_root=None, out=None, *, tasks=None,
           min_score: float | None = None, nms: float | None = None,
           nms_class_agnostic: bool = False, image_url_prefix: str | None = None,
           split: float | None = None, seed: int = 0, image_mode: str = "symlink",
           simplify: float = SIMPLIFY_PX,
           min_polygon_area: float = MIN_POLYGON_AREA_PX) -> Exported:
    """Export ``coco_path`` to ``fmt``.

    Args:
        coco_path: a COCO file (from ``label``, or any other).
        fmt: ``"yolo"``, ``"voc"``, ``"label-studio"`` or ``"coco"``.
        images_root: the folder the file names are relative to (YOLO images, Label Studio
            local files). Default: the labeled folder recorded in the file's ``info.source``,
            else the COCO file's folder.
        out: where to write; default :func:`default_path` beside ``coco_path``.
        tasks: keep only annotations of these tasks (``None``: all).
        min_score, nms, nms_class_agnostic: see :class:`~.filters.AnnotationFilter`.
        image_url_prefix: Label Studio: ``data.image`` is this + the file name (URL-quoted).
        split: YOLO: the fraction of images in ``train`` (the rest in ``val``); ``None``: all in
            ``train``.
        seed: YOLO: which images go to ``val``.
        image_mode: YOLO: ``"symlink"``, ``"copy"``, ``"hardlink"`` or ``"none"``.
        simplify: Label Studio: polygon tolerance in pixels (0: keep every point).
        min_polygon_area: Label Studio: mask parts smaller than this (square pixels) are left out.

    Returns:
        An :class:`Exported`: the path written, mask fallbacks, images not found.

    Raises:
        ValueError: naming an unknown format or a bad option value, or two images that would
            write the same file.
    """
    coco_path = Path(coco_path)
    out = Path(out) if out is not None else default_path(coco_path, fmt)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if image_mode not in IMAGE_MODES:
        raise ValueError(f"unknown image mode {image_mode!r}; use one of {', '.join(IMAGE_MODES)}")
    if split is not None and not 0.0 < split <= 1.0:
        raise ValueError(f"split must be in (0, 1], got {split!r}")
    if simplify < 0:
        raise ValueError(f"simplify must be >= 0 pixels, got {simplify!r}")
    flt = AnnotationFilter(tasks=None if tasks is None else tuple(tasks), min_score=min_score,
                           nms=nms, class_agnostic=nms_class_agnostic)
    coco = read_filtered(coco_path, flt)
    root = images_root_of(coco, coco_path, images_root)
    dropped = dict(flt.dropped) if flt.active else None
    if fmt == "yolo":
        return Exported(out, *_export_yolo(coco, out, root, split, seed, image_mode), dropped)
    if fmt == "voc":
        return Exported(out, _export_voc(coco, out), dropped=dropped)
    if fmt == "label-studio":
        refer = _image_reference(root, image_url_prefix)
        return Exported(out, _export_label_studio(coco, out, refer, simplify, min_polygon_area),
                        dropped=dropped)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json_text(coco), encoding="utf-8")
    return Exported(out, dropped=dropped)


def read_filtered(coco_path, flt: AnnotationFilter | None = None) -> dict:
    """The COCO file as a dict, its annotations filtered image by image (see :mod:`.filters`).

    Raises:
        ValueError: naming the file when it is not a COCO dict.
    """
    coco = _read(Path(coco_path))
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise ValueError(f"{str(coco_path)!r} is not a COCO file (it needs 'images', "
                         "'annotations' and 'categories' lists)")
    if flt is None or not flt.active:
        return coco
    by_image: dict = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    kept = []
    for anns in by_image.values():
        kept += flt.apply(anns)
    kept_ids = {id(a) for a in kept}
    coco["annotations"] = [a for a in coco["annotations"] if id(a) in kept_ids]
    if "relations" in coco:
        ids = {a.get("id") for a in coco["annotations"]}
        coco["relations"] = [r for r in coco["relations"]
                             if r.get("subject_id") in ids and r.get("object_id") in ids]
    coco.setdefault("info", {})["filters"] = {**flt.settings(), "dropped": dict(flt.dropped)}
    return coco


def images_root_of(coco: dict, coco_path, images_root=None) -> Path:
    "The folder the file names are relative to (see :func:`export`)."
    if images_root is not None:
        return Path(images_root)
    source = (coco.get("info") or {}).get("source") or {}
    if source.get("kind") == "folder" and source.get("location"):
        location = Path(source["location"])  # relative to where `label` ran, or to the file
        for folder in (location, Path(coco_path).parent / location):
            if folder.is_dir():
                return folder
    return Path(coco_path).parent


def export_yolo(coco_path, images_root, out_dir, **options) -> Path:
    "The YOLO layout (see :func:`export`)."
    return export(coco_path, "yolo", images_root, out_dir, **options).path


def export_voc(coco_path, images_root, out_dir, **options) -> Path:
    "Pascal VOC xml files through supervision (see :func:`export`)."
    return export(coco_path, "voc", images_root, out_dir, **options).path


# -- YOLO and Pascal VOC ---------------------------------------------------------------------------
def _export_yolo(coco: dict, out_dir: Path, root: Path, split, seed: int,
                 image_mode: str) -> tuple[int, int]:
    import yaml
    from supervision.dataset.formats.yolo import detections_to_yolo_annotations

    classes, mapping = _classes(coco)
    _check_unique_names(coco, ".txt", "YOLO label")
    parts = split_images(coco["images"], split, seed)
    for part in ("train", "val"):
        (out_dir / "images" / part).mkdir(parents=True, exist_ok=True)
        (out_dir / "labels" / part).mkdir(parents=True, exist_ok=True)
    fallbacks = missing = 0
    for image, detections, unreadable in _images(coco, mapping):
        part = parts[image["id"]]
        other = "val" if part == "train" else "train"
        name = Path(image["file_name"]).name
        shape = (image["height"], image["width"], 3)
        lines, failed = _convert(detections, lambda d: detections_to_yolo_annotations(
            detections=d, image_shape=shape, approximation_percentage=0.0))
        fallbacks += failed + unreadable
        label = f"{Path(name).stem}.txt"
        _remove(out_dir / "labels" / other / label)  # an earlier export put it in the other part
        _remove(out_dir / "images" / other / name)
        with open(out_dir / "labels" / part / label, "w") as f:
            f.writelines(line + "\n" for line in lines)
        if image_mode != "none":
            missing += not _place_image(root / image["file_name"],
                                        out_dir / "images" / part / name, image_mode)
    has_val = any(p == "val" for p in parts.values())
    data = {"path": str(out_dir.resolve()), "train": "images/train",
            "val": "images/val" if has_val else "images/train", "nc": len(classes),
            "names": dict(enumerate(classes))}
    (out_dir / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True),
                                       encoding="utf-8")
    return fallbacks, missing


def split_images(images: list[dict], split: float | None, seed: int = 0) -> dict:
    """``{image id: "train" | "val"}``: the first ``round(n * split)`` images in a seeded hash
    order of their file names are ``train``, so the choice does not depend on the file's order
    and an added image moves few others. With ``n >= 2`` and ``split < 1`` at least one image is
    ``val``. ``split=None``: every image is ``train``."""
    import hashlib

    if split is None:
        return {im["id"]: "train" for im in images}
    order = sorted(images, key=lambda im: hashlib.blake2b(
        f"{seed}:{im['file_name']}".encode("utf-8", "surrogateescape"), digest_size=8).digest())
    n_train = round(len(order) * split)
    if split < 1 and len(order) >= 2:
        n_train = min(n_train, len(order) - 1)
    return {im["id"]: "train" if k < n_train else "val" for k, im in enumerate(order)}


def _place_image(src: Path, dst: Path, mode: str) -> bool:
    "Link or copy ``src`` to ``dst`` (replacing it); false when ``src`` does not exist."
    if not src.is_file():
        return False
    _remove(dst)
    if mode == "symlink":
        os.symlink(os.path.abspath(src), dst)
    elif mode == "hardlink":
        try:
            os.link(src, dst)
        except OSError:  # another file system: copy
            shutil.copy2(src, dst)
    else:
        shutil.copy2(src, dst)
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()


def _export_voc(coco: dict, out_dir: Path) -> int:
    from supervision.dataset.formats.pascal_voc import detections_to_pascal_voc

    classes, mapping = _classes(coco)
    _check_unique_names(coco, ".xml", "Pascal VOC annotation")
    out_dir.mkdir(parents=True, exist_ok=True)
    fallbacks = 0
    for image, detections, unreadable in _images(coco, mapping):
        name = Path(image["file_name"]).name
        shape = (image["height"], image["width"], 3)
        # XML cannot hold an undecodable byte of the name (a lone surrogate): write its escape
        shown = name.encode("utf-8", "backslashreplace").decode("utf-8")
        xml, failed = _convert(detections, lambda d: detections_to_pascal_voc(
            detections=d, classes=classes, filename=shown, image_shape=shape,
            approximation_percentage=0.0))
        fallbacks += failed + unreadable
        (out_dir / f"{Path(name).stem}.xml").write_text(xml, encoding="utf-8")
    return fallbacks


def _read(coco_path: Path) -> dict:
    return json.loads(Path(coco_path).read_text(encoding="utf-8"))


def _classes(coco: dict) -> tuple[list[str], dict[int, int]]:
    "Class names in category-id order (as supervision's COCO loader) and ``{category id: index}``."
    from supervision.dataset.formats.coco import (
        build_coco_class_index_mapping,
        coco_categories_to_classes,
    )

    classes = coco_categories_to_classes(coco_categories=coco["categories"])
    return classes, build_coco_class_index_mapping(coco["categories"], classes)


def _check_unique_names(coco: dict, suffix: str, kind: str) -> None:
    "Refuse, before writing anything, two images whose output files would have the same name."
    seen: dict[str, str] = {}
    for image in coco["images"]:
        name = Path(image["file_name"]).stem + suffix
        if name in seen:
            raise ValueError(f"images {seen[name]!r} and {image['file_name']!r} would both write "
                             f"the {kind} file {name!r}")
        seen[name] = image["file_name"]


def _images(coco: dict, mapping: dict):
    """``(image entry, sv.Detections, unreadable)`` per image, as ``from_coco`` loads them, one
    at a time; a segmentation that cannot be decoded is dropped (its annotation is written as its
    box) and counted in ``unreadable``."""
    from supervision.dataset.utils import map_detections_class_id

    by_image: dict = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image in coco["images"]:
        anns = by_image.get(image["id"], [])
        detections, unreadable = _detections(anns, (image["width"], image["height"]))
        yield image, map_detections_class_id(source_to_target_mapping=mapping,
                                             detections=detections), unreadable


def _detections(anns: list, wh) -> tuple:
    "``coco_annotations_to_detections``, with unreadable segmentations dropped and counted."
    from supervision.dataset.formats.coco import coco_annotations_to_detections

    with_masks = any(a.get("segmentation") for a in anns)
    try:
        return coco_annotations_to_detections(image_annotations=anns, resolution_wh=wh,
                                              with_masks=with_masks), 0
    except Exception:
        if not with_masks:
            raise
    cleaned, unreadable = [], 0
    for ann in anns:
        if ann.get("segmentation"):
            try:
                coco_annotations_to_detections(image_annotations=[ann], resolution_wh=wh,
                                               with_masks=True)
            except Exception:
                ann = {k: v for k, v in ann.items() if k != "segmentation"}
                unreadable += 1
        cleaned.append(ann)
    with_masks = any(a.get("segmentation") for a in cleaned)
    return coco_annotations_to_detections(image_annotations=cleaned, resolution_wh=wh,
                                          with_masks=with_masks), unreadable


def _convert(detections, write):
    """``write(detections)``; when it raises, the masks that fail on their own are cleared (their
    rows are written as boxes) and it is run again. Returns ``(output, masks cleared)``."""
    try:
        return write(detections), 0
    except Exception:
        if detections.mask is None:
            raise
    bad = []
    for i in np.flatnonzero(detections.mask.reshape(len(detections), -1).any(axis=1)):
        try:
            write(detections[int(i): int(i) + 1])
        except Exception:
            bad.append(int(i))
    if not bad:  # only the masks together fail: write every mask as its box
        bad = [int(i) for i in np.flatnonzero(detections.mask.reshape(len(detections), -1)
                                              .any(axis=1))]
    mask = detections.mask.copy()
    mask[bad] = False  # an empty mask is written as its box
    detections.mask = mask
    return write(detections), len(bad)


# -- Label Studio ----------------------------------------------------------------------------------
def export_label_studio(coco_path, out_path, image_prefix: str = "", **options) -> Path:
    """Label Studio tasks with predictions (import them as pre-annotations), and the labeling
    config beside them (see :func:`export`).

    Args:
        coco_path: the COCO file.
        out_path: the JSON file to write (the config goes to ``out_path`` with ``.xml``).
        image_prefix: prepended to file names for ``data.image`` (``None``: the local-files form).
    """
    return export(coco_path, "label-studio", out=out_path, image_url_prefix=image_prefix,
                  **options).path


def config_path(tasks_path) -> Path:
    "The Label Studio labeling config written beside a tasks file."
    return Path(tasks_path).with_suffix(".xml")


def _image_reference(root: Path, prefix: str | None):
    "``file name -> data.image``: the URL prefix + the quoted name, or the local-files form."
    if prefix is not None:
        return lambda name: prefix + quote(name, safe="/", errors="surrogateescape")

    def local(name: str) -> str:
        path = os.path.abspath(os.path.join(root, name)).lstrip("/")
        return LABEL_STUDIO_LOCAL_FILES + quote(path, safe="/", errors="surrogateescape")

    return local


def _export_label_studio(coco: dict, out_path: Path, refer, simplify: float,
                         min_area: float = MIN_POLYGON_AREA_PX) -> int:
    names = {c["id"]: c["name"] for c in coco["categories"]}
    keypoint_names = next((c.get("keypoints") for c in coco["categories"]
                           if c.get("keypoints")), None) or []
    by_image: dict = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    model = coco.get("info", {}).get("model", "sphinx")
    tasks = []
    fallbacks = 0
    used: dict[str, set] = {}
    for image in coco["images"]:
        results = []
        for ann in by_image.get(image["id"], []):
            items, failed = _label_studio_items(ann, image, names, keypoint_names, simplify,
                                                min_area)
            results += items
            fallbacks += failed
        for r in results:
            labels = r["value"].get(r["type"], [])
            used.setdefault(r["type"], set()).update(labels if isinstance(labels, list) else [])
        scores = [r["score"] for r in results if r.get("score") is not None]
        tasks.append({
            "data": {"image": refer(image["file_name"])},
            "predictions": [{"model_version": str(model), "result": results,
                             "score": sum(scores) / len(scores) if scores else None}],
        })
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json_text(tasks), encoding="utf-8")
    config_path(out_path).write_text(label_studio_config(
        [c["name"] for c in coco["categories"]], used, keypoint_names), encoding="utf-8")
    return fallbacks


def label_studio_config(class_names: list[str], used: dict, keypoint_names=()) -> str:
    """The labeling config (XML) for the predictions: an ``Image`` called ``image`` and one
    control per result type used (``used``: result type -> the labels its results carry).

    Rectangles always come (with every class, so a person can add missed objects); polygons,
    key points (in ``keypoint_names`` order) and the per-region transcription only when the
    predictions have them.
    """
    view = ElementTree.Element("View")
    ElementTree.SubElement(view, "Image", name="image", value="$image", zoom="true")

    def control(tag, name, labels):
        element = ElementTree.SubElement(view, tag, name=name, toName="image")
        for label in dict.fromkeys(labels):  # unique, in order
            ElementTree.SubElement(element, "Label", value=str(label))

    rect_labels = list(class_names) + sorted(used.get("rectanglelabels", set())
                                             - set(class_names))
    control("RectangleLabels", LABEL_STUDIO_FROM["box"], rect_labels)
    if "polygonlabels" in used:
        control("PolygonLabels", LABEL_STUDIO_FROM["polygon"],
                rect_labels + sorted(used["polygonlabels"] - set(rect_labels)))
    if "keypointlabels" in used:
        points = used["keypointlabels"]
        control("KeyPointLabels", LABEL_STUDIO_FROM["keypoint"],
                [n for n in keypoint_names if n in points] + sorted(points - set(keypoint_names)))
    if "textarea" in used:
        ElementTree.SubElement(view, "TextArea", name=LABEL_STUDIO_FROM["text"], toName="image",
                               editable="true", perRegion="true", required="false")
    ElementTree.indent(view)
    return ElementTree.tostring(view, encoding="unicode") + "\n"


def label_studio_results(ann: dict, image: dict, names: dict, keypoint_names,
                         simplify: float = SIMPLIFY_PX,
                         min_area: float = MIN_POLYGON_AREA_PX) -> list[dict]:
    "One COCO annotation as Label Studio result items (box, mask polygons, key points, text)."
    return _label_studio_items(ann, image, names, keypoint_names, simplify, min_area)[0]


def _pct(value: float, size: float) -> float:
    return round(100 * value / size, 3)


def _label_studio_items(ann: dict, image: dict, names: dict, keypoint_names,
                        simplify: float, min_area: float = 0.0) -> tuple[list, int]:
    "Label Studio items of one annotation, and 1 when its mask could not be traced (else 0)."
    W, H = image["width"], image["height"]
    x, y, w, h = ann["bbox"]
    rid = f"a{ann['id']}"
    common = {"original_width": W, "original_height": H, "image_rotation": 0,
              "to_name": "image"}
    box = {**common, "id": rid, "from_name": LABEL_STUDIO_FROM["box"], "type": "rectanglelabels",
           "score": ann.get("score"),
           "value": {"x": _pct(x, W), "y": _pct(y, H), "width": _pct(w, W),
                     "height": _pct(h, H), "rotation": 0,
                     "rectanglelabels": [names.get(ann["category_id"], "object")]}}
    out = [box]
    text = ann.get("text") or ann.get("caption")
    if text:
        out.append({**common, "id": rid, "from_name": LABEL_STUDIO_FROM["text"],
                    "type": "textarea", "value": {**box["value"], "text": [text]}})
    polygons, failed = _polygons(ann.get("segmentation"))
    for j, poly in enumerate(polygons):
        if min_area > 0 and polygon_area(poly) < min_area:
            continue
        points = simplify_polygon(poly, simplify)
        out.append({**common, "id": f"{rid}m{j}", "from_name": LABEL_STUDIO_FROM["polygon"],
                    "type": "polygonlabels", "parentID": rid, "score": ann.get("score"),
                    "value": {"points": [[_pct(px, W), _pct(py, H)] for px, py in points],
                              "closed": True,
                              "polygonlabels": box["value"]["rectanglelabels"]}})
    kps = ann.get("keypoints") or []
    for j in range(len(kps) // 3):
        kx, ky, v = kps[3 * j: 3 * j + 3]
        if v > 0:
            label = keypoint_names[j] if j < len(keypoint_names) else str(j)
            out.append({**common, "id": f"{rid}k{j}", "from_name": LABEL_STUDIO_FROM["keypoint"],
                        "type": "keypointlabels", "parentID": rid,
                        "value": {"x": _pct(kx, W), "y": _pct(ky, H), "width": 0.5,
                                  "keypointlabels": [label]}})
    return out, failed


def polygon_area(flat: list) -> float:
    "The area (square pixels) a flat COCO polygon ``[x1, y1, ...]`` encloses (shoelace)."
    x, y = np.asarray(flat, dtype=np.float64).reshape(-1, 2).T
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def simplify_polygon(flat: list, tolerance: float) -> list[tuple[float, float]]:
    """A flat COCO polygon ``[x1, y1, ...]`` as points, simplified with ``cv2.approxPolyDP`` so
    that no point of the original is more than ``tolerance`` pixels away (0: unchanged). A
    polygon that would shrink below 3 points is kept as it was."""
    points = np.asarray(flat, dtype=np.float32).reshape(-1, 2)
    if tolerance > 0 and len(points) > 3:
        import cv2

        simple = cv2.approxPolyDP(points.reshape(-1, 1, 2), float(tolerance), True).reshape(-1, 2)
        if len(simple) >= 3:
            points = simple
    return [(float(px), float(py)) for px, py in points]


def _polygons(segmentation) -> tuple[list, int]:
    "A COCO segmentation as flat polygons (RLE traced), and 1 when it could not be read (else 0)."
    if not segmentation:
        return [], 0
    if isinstance(segmentation, list):  # COCO polygons
        if all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
               and all(isinstance(v, (int, float)) for v in p) for p in segmentation):
            return segmentation, 0
        return [], 1
    from sphinx_tools.coco import rle_to_polygons

    try:
        return rle_to_polygons(segmentation), 0
    except Exception:
        return [], 1
