"""Exports of the COCO file: YOLO and Pascal VOC through supervision, Label Studio predictions.

- ``yolo``: ``<out stem>_yolo/`` with ``labels/*.txt`` and ``data.yaml`` (supervision
  ``DetectionDataset.as_yolo``; polygons when masks exist).
- ``voc``: ``<out stem>_voc/*.xml`` (``as_pascal_voc``).
- ``label-studio``: ``<out stem>.label-studio.json``, one task per image with a ``predictions``
  entry: ``rectanglelabels`` per box (percent coordinates, score), ``polygonlabels`` per part of
  its mask (from the COCO polygons, or traced from RLE), ``keypointlabels`` per visible key point,
  ``textarea`` per OCR string / region caption.
"""

from __future__ import annotations

import json
from pathlib import Path

LABEL_STUDIO_FROM = {"box": "label", "keypoint": "keypoints", "text": "transcription",
                     "polygon": "polygon"}


def export(coco_path, fmt: str, images_root, out=None) -> Path:
    """Export ``coco_path`` to ``fmt``; returns where it went.

    Raises:
        ValueError: naming an unknown format.
    """
    coco_path = Path(coco_path)
    stem = coco_path.with_suffix("")
    if fmt == "yolo":
        return export_yolo(coco_path, images_root, out or Path(f"{stem}_yolo"))
    if fmt == "voc":
        return export_voc(coco_path, images_root, out or Path(f"{stem}_voc"))
    if fmt == "label-studio":
        return export_label_studio(coco_path, out or Path(f"{stem}.label-studio.json"))
    raise ValueError(f"unknown export format {fmt!r}; use yolo, voc or label-studio")


def _dataset(coco_path, images_root):
    import supervision as sv

    return sv.DetectionDataset.from_coco(str(images_root), str(coco_path))


def export_yolo(coco_path, images_root, out_dir) -> Path:
    "YOLO txt labels and ``data.yaml`` through supervision."
    out_dir = Path(out_dir)
    ds = _dataset(coco_path, images_root)
    ds.as_yolo(annotations_directory_path=str(out_dir / "labels"),
               data_yaml_path=str(out_dir / "data.yaml"))
    return out_dir


def export_voc(coco_path, images_root, out_dir) -> Path:
    "Pascal VOC xml files through supervision."
    out_dir = Path(out_dir)
    ds = _dataset(coco_path, images_root)
    ds.as_pascal_voc(annotations_directory_path=str(out_dir))
    return out_dir


def export_label_studio(coco_path, out_path, image_prefix: str = "") -> Path:
    """Label Studio tasks with predictions (import them as pre-annotations).

    Args:
        coco_path: the COCO file from ``label``.
        out_path: the JSON file to write.
        image_prefix: prepended to file names for ``data.image`` (e.g. ``/data/local-files/?d=``).
    """
    coco = json.loads(Path(coco_path).read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in coco["categories"]}
    keypoint_names = next((c.get("keypoints") for c in coco["categories"]
                           if c.get("keypoints")), None) or []
    by_image: dict = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    model = coco.get("info", {}).get("model", "sphinx")
    tasks = []
    for image in coco["images"]:
        results = []
        for ann in by_image.get(image["id"], []):
            results += label_studio_results(ann, image, names, keypoint_names)
        scores = [r["score"] for r in results if "score" in r]
        tasks.append({
            "data": {"image": image_prefix + image["file_name"]},
            "predictions": [{"model_version": str(model), "result": results,
                             "score": sum(scores) / len(scores) if scores else None}],
        })
    Path(out_path).write_text(json.dumps(tasks, ensure_ascii=False))
    return Path(out_path)


def label_studio_results(ann: dict, image: dict, names: dict, keypoint_names) -> list[dict]:
    "One COCO annotation as Label Studio result items (box, mask polygons, key points, text)."
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
    segmentation = ann.get("segmentation")
    if segmentation:  # COCO polygons, or RLE traced into polygons
        from .segmenting import rle_to_polygons

        polygons = segmentation if isinstance(segmentation, list) else rle_to_polygons(segmentation)
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
    return out
