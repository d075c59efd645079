"""Exports of the COCO file: YOLO and Pascal VOC through supervision, Label Studio predictions.

- ``yolo``: ``<out stem>_yolo/`` with ``labels/*.txt`` and ``data.yaml`` (supervision's YOLO
  writer; polygons when masks exist).
- ``voc``: ``<out stem>_voc/*.xml`` (supervision's Pascal VOC writer).
- ``label-studio``: ``<out stem>.label-studio.json``, one task per image with a ``predictions``
  entry: ``rectanglelabels`` per box (percent coordinates, score), ``polygonlabels`` per part of
  its mask (from the COCO polygons, or traced from RLE), ``keypointlabels`` per visible key point,
  ``textarea`` per OCR string / region caption.

The YOLO and VOC exports read the COCO file the way ``sv.DetectionDataset.from_coco`` does, but
one image at a time (its masks are decoded only while its file is written), and take image sizes
from the COCO file instead of opening the images. A mask that a writer cannot turn into polygons
(supervision raises for some masks with holes) is written as its box; such masks are counted in
:attr:`Exported.fallbacks`. Label Studio does the same for masks it cannot trace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .worklog import json_text

LABEL_STUDIO_FROM = {"box": "label", "keypoint": "keypoints", "text": "transcription",
                     "polygon": "polygon"}
FORMATS = ("yolo", "voc", "label-studio")


@dataclass(frozen=True)
class Exported:
    """Where an export went, and how many masks it wrote as their boxes.

    Attributes:
        path: the export's folder (YOLO, VOC) or file (Label Studio).
        fallbacks: masks that could not be converted to the format's polygons and were written
            as their box instead (Label Studio: left out, the box is there already).
    """

    path: Path
    fallbacks: int = 0


def export(coco_path, fmt: str, images_root=None, out=None) -> Exported:
    """Export ``coco_path`` to ``fmt``.

    Args:
        coco_path: the COCO file from ``label``.
        fmt: ``"yolo"``, ``"voc"`` or ``"label-studio"``.
        images_root: unused (image sizes come from the COCO file); kept for callers.
        out: where to write; default beside ``coco_path`` (see the module docstring).

    Returns:
        An :class:`Exported`: the path written and the number of mask fallbacks.

    Raises:
        ValueError: naming an unknown format, or two images that would write the same file.
    """
    coco_path = Path(coco_path)
    stem = coco_path.with_suffix("")
    if fmt == "yolo":
        out = Path(out or f"{stem}_yolo")
        return Exported(out, _export_yolo(coco_path, out))
    if fmt == "voc":
        out = Path(out or f"{stem}_voc")
        return Exported(out, _export_voc(coco_path, out))
    if fmt == "label-studio":
        out = Path(out or f"{stem}.label-studio.json")
        return Exported(out, _export_label_studio(coco_path, out))
    raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")


def export_yolo(coco_path, images_root, out_dir) -> Path:
    "YOLO txt labels and ``data.yaml`` through supervision (see :func:`export`)."
    _export_yolo(Path(coco_path), Path(out_dir))
    return Path(out_dir)


def export_voc(coco_path, images_root, out_dir) -> Path:
    "Pascal VOC xml files through supervision (see :func:`export`)."
    _export_voc(Path(coco_path), Path(out_dir))
    return Path(out_dir)


# -- YOLO and Pascal VOC ---------------------------------------------------------------------------
def _export_yolo(coco_path: Path, out_dir: Path) -> int:
    from supervision.dataset.formats.yolo import detections_to_yolo_annotations, save_data_yaml

    coco = _read(coco_path)
    classes, mapping = _classes(coco)
    _check_unique_names(coco, ".txt", "YOLO label")
    labels = out_dir / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    fallbacks = 0
    for image, detections in _images(coco, mapping):
        shape = (image["height"], image["width"], 3)
        lines, failed = _convert(detections, lambda d: detections_to_yolo_annotations(
            detections=d, image_shape=shape, approximation_percentage=0.0))
        fallbacks += failed
        with open(labels / f"{Path(image['file_name']).stem}.txt", "w") as f:
            f.writelines(line + "\n" for line in lines)
    save_data_yaml(data_yaml_path=str(out_dir / "data.yaml"), classes=classes)
    return fallbacks


def _export_voc(coco_path: Path, out_dir: Path) -> int:
    from supervision.dataset.formats.pascal_voc import detections_to_pascal_voc

    coco = _read(coco_path)
    classes, mapping = _classes(coco)
    _check_unique_names(coco, ".xml", "Pascal VOC annotation")
    out_dir.mkdir(parents=True, exist_ok=True)
    fallbacks = 0
    for image, detections in _images(coco, mapping):
        name = Path(image["file_name"]).name
        shape = (image["height"], image["width"], 3)
        # XML cannot hold an undecodable byte of the name (a lone surrogate): write its escape
        shown = name.encode("utf-8", "backslashreplace").decode("utf-8")
        xml, failed = _convert(detections, lambda d: detections_to_pascal_voc(
            detections=d, classes=classes, filename=shown, image_shape=shape,
            approximation_percentage=0.0))
        fallbacks += failed
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
    "``(image entry, sv.Detections)`` per image, as ``from_coco`` loads them, one at a time."
    from supervision.dataset.formats.coco import coco_annotations_to_detections
    from supervision.dataset.utils import map_detections_class_id

    by_image: dict = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image in coco["images"]:
        anns = by_image.get(image["id"], [])
        detections = coco_annotations_to_detections(
            image_annotations=anns, resolution_wh=(image["width"], image["height"]),
            with_masks=any(a.get("segmentation") for a in anns))
        yield image, map_detections_class_id(source_to_target_mapping=mapping,
                                             detections=detections)


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
def export_label_studio(coco_path, out_path, image_prefix: str = "") -> Path:
    """Label Studio tasks with predictions (import them as pre-annotations).

    Args:
        coco_path: the COCO file from ``label``.
        out_path: the JSON file to write.
        image_prefix: prepended to file names for ``data.image`` (e.g. ``/data/local-files/?d=``).
    """
    _export_label_studio(Path(coco_path), Path(out_path), image_prefix)
    return Path(out_path)


def _export_label_studio(coco_path: Path, out_path: Path, image_prefix: str = "") -> int:
    coco = _read(coco_path)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    keypoint_names = next((c.get("keypoints") for c in coco["categories"]
                           if c.get("keypoints")), None) or []
    by_image: dict = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    model = coco.get("info", {}).get("model", "sphinx")
    tasks = []
    fallbacks = 0
    for image in coco["images"]:
        results = []
        for ann in by_image.get(image["id"], []):
            items, failed = _label_studio_items(ann, image, names, keypoint_names)
            results += items
            fallbacks += failed
        scores = [r["score"] for r in results if "score" in r]
        tasks.append({
            "data": {"image": image_prefix + image["file_name"]},
            "predictions": [{"model_version": str(model), "result": results,
                             "score": sum(scores) / len(scores) if scores else None}],
        })
    Path(out_path).write_text(json_text(tasks), encoding="utf-8")
    return fallbacks


def label_studio_results(ann: dict, image: dict, names: dict, keypoint_names) -> list[dict]:
    "One COCO annotation as Label Studio result items (box, mask polygons, key points, text)."
    return _label_studio_items(ann, image, names, keypoint_names)[0]


def _label_studio_items(ann: dict, image: dict, names: dict, keypoint_names) -> tuple[list, int]:
    "Label Studio items of one annotation, and 1 when its mask could not be traced (else 0)."
    W, H = image["width"], image["height"]
    x, y, w, h = ann["bbox"]
    rid = f"a{ann['id']}"
    common = {"original_width": W, "original_height": H, "image_rotation": 0,
              "to_name": "image"}
    box = {**common, "id": rid, "from_name": LABEL_STUDIO_FROM["box"], "type": "rectanglelabels",
           "score": ann.get("score"),
           "value": {"x": 100 * x / W, "y": 100 * y / H, "width": 100 * w / W,
                     "height": 100 * h / H, "rotation": 0,
                     "rectanglelabels": [names.get(ann["category_id"], "object")]}}
    out = [box]
    text = ann.get("text") or ann.get("caption")
    if text:
        out.append({**common, "id": rid, "from_name": LABEL_STUDIO_FROM["text"],
                    "type": "textarea", "value": {**box["value"], "text": [text]}})
    polygons, failed = _polygons(ann.get("segmentation"))
    for j, poly in enumerate(polygons):
        out.append({**common, "id": f"{rid}m{j}", "from_name": LABEL_STUDIO_FROM["polygon"],
                    "type": "polygonlabels", "parentID": rid, "score": ann.get("score"),
                    "value": {"points": [[100 * px / W, 100 * py / H]
                                         for px, py in zip(poly[::2], poly[1::2])],
                              "closed": True,
                              "polygonlabels": box["value"]["rectanglelabels"]}})
    kps = ann.get("keypoints") or []
    for j in range(len(kps) // 3):
        kx, ky, v = kps[3 * j: 3 * j + 3]
        if v > 0:
            label = keypoint_names[j] if j < len(keypoint_names) else str(j)
            out.append({**common, "id": f"{rid}k{j}", "from_name": LABEL_STUDIO_FROM["keypoint"],
                        "type": "keypointlabels", "parentID": rid,
                        "value": {"x": 100 * kx / W, "y": 100 * ky / H, "width": 0.5,
                                  "keypointlabels": [label]}})
    return out, failed


def _polygons(segmentation) -> tuple[list, int]:
    "A COCO segmentation as flat polygons (RLE traced), and 1 when it could not be read (else 0)."
    if not segmentation:
        return [], 0
    if isinstance(segmentation, list):  # COCO polygons
        if all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
               and all(isinstance(v, (int, float)) for v in p) for p in segmentation):
            return segmentation, 0
        return [], 1
    from .segmenting import rle_to_polygons

    try:
        return rle_to_polygons(segmentation), 0
    except Exception:
        return [], 1
