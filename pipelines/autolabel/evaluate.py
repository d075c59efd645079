"""Score predictions against ground truth.

- COCO GT (a dict with ``images``): COCOeval (pycocotools) ``bbox``, ``segm`` and ``keypoints``,
  each run when both files have the data. Prediction categories map to GT categories by name
  (exact, then normalized: case, plural), images by ``file_name`` (then base name). Only the GT
  images the predictions cover are scored (a ``--limit`` run scores its images).
  Beside them, where the files have the data: OCR text accuracy (``text``: the share of GT
  annotations with a ``text`` that a prediction boxing it at IoU >= 0.5 reads exactly) and key-point
  PCK (``pck``: the share of labelled GT key points that the matched person, the prediction with
  the highest box IoU >= 0.5, puts within 0.1 and 0.2 of the longer side of the person's box), a
  scale-free view of key points next to COCO's OKS-based AP.
- RefCOCO-style GT (a list of ``{question_id, answer: [x1, y1, x2, y2] px, ...}``): REC accuracy,
  the share of questions whose predicted box has IoU >= 0.5 with the answer. Predictions are a
  COCO file from ``label`` (``task: "rec"`` annotations with ``question_id``; the best-scored one
  counts) or a list of ``{question_id, answer | bbox_xyxy}`` pixel boxes.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np

from sphinx_tools.parsing import normalize_label

STAT_NAMES = {
    "bbox": ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
             "ARl"],
    "keypoints": ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"],
}
STAT_NAMES["segm"] = STAT_NAMES["bbox"]


def evaluate(pred, gt, iou_types=("bbox", "segm", "keypoints"), rec_iou: float = 0.5) -> dict:
    """Metrics of ``pred`` against ``gt`` (paths or loaded JSON).

    Returns:
        ``{"rec": {...}}`` for RefCOCO-style GT, else ``{iou_type: {metric: value}, "matching":
        {...}}``.

    Raises:
        ValueError: for an unknown IoU type or files of the wrong shape.
    """
    bad = [t for t in iou_types if t not in STAT_NAMES]
    if bad:
        raise ValueError(f"unknown IoU type(s) {bad}; use {sorted(STAT_NAMES)}")
    pred, gt = _load(pred), _load(gt)
    if isinstance(gt, list):
        return {"rec": rec_accuracy(pred, gt, rec_iou)}
    if not isinstance(gt, dict) or "images" not in gt:
        raise ValueError("ground truth must be a COCO dict or a RefCOCO-style list")
    if not isinstance(pred, dict) or "annotations" not in pred:
        raise ValueError("predictions for a COCO ground truth must be a COCO dict")
    return coco_metrics(pred, gt, iou_types)


def _load(value):
    if isinstance(value, (str, Path)):
        return json.loads(Path(value).read_text(encoding="utf-8"))
    return value


# -- COCO ------------------------------------------------------------------------------------------
def match_categories(pred_categories, gt_categories) -> dict[int, int]:
    "Prediction category id -> GT category id, by name (exact, then normalized)."
    exact = {c["name"]: c["id"] for c in gt_categories}
    loose = {normalize_label(c["name"]): c["id"] for c in gt_categories}
    out = {}
    for c in pred_categories:
        gid = exact.get(c["name"], loose.get(normalize_label(c["name"])))
        if gid is not None:
            out[c["id"]] = gid
    return out


def match_images(pred_images, gt_images) -> dict[int, int]:
    "Prediction image id -> GT image id, by file name, then base name."
    by_name = {im["file_name"]: im["id"] for im in gt_images}
    by_base = {Path(im["file_name"]).name: im["id"] for im in gt_images}
    out = {}
    for im in pred_images:
        gid = by_name.get(im["file_name"], by_base.get(Path(im["file_name"]).name))
        if gid is not None:
            out[im["id"]] = gid
    return out


def coco_metrics(pred: dict, gt: dict, iou_types) -> dict:
    "COCOeval summaries per IoU type, plus how predictions were matched."
    cats = match_categories(pred.get("categories", []), gt.get("categories", []))
    images = match_images(pred.get("images", []), gt["images"])
    dts, dropped = [], 0
    for ann in pred["annotations"]:
        if ann.get("category_id") in cats and ann.get("image_id") in images:
            dts.append({**ann, "category_id": cats[ann["category_id"]],
                        "image_id": images[ann["image_id"]]})
        else:
            dropped += 1
    out = {"matching": {"images": len(images), "categories": len(cats),
                        "annotations": len(dts), "dropped": dropped}}
    scored = set(images.values())  # the GT images the predictions cover
    gt_coco = _coco(gt) if iou_types else None
    for iou_type in iou_types:
        result = _cocoeval(gt_coco, gt, dts, iou_type, sorted(scored))
        if result is not None:
            out[iou_type] = result
    by_image = {}
    for ann in pred["annotations"]:  # text and key points are scored whatever their category
        if ann.get("image_id") in images and ann.get("bbox") is not None:
            by_image.setdefault(images[ann["image_id"]], []).append(ann)
    covered = [a for a in gt.get("annotations", []) if a.get("image_id") in scored]
    text = text_accuracy(by_image, covered)
    if text is not None:
        out["text"] = text
    pck = keypoint_pck(by_image, covered) if "keypoints" in iou_types else None
    if pck is not None:
        out["pck"] = pck
    return out


def text_accuracy(pred_by_image: dict, gt_anns: list, iou: float = 0.5) -> dict | None:
    """The share of GT annotations with a ``text`` that some prediction of their image (one with a
    ``text``) boxes at IoU >= ``iou`` and reads exactly (surrounding spaces ignored); ``None``
    when no GT annotation has a text."""
    words = [a for a in gt_anns if isinstance(a.get("text"), str)]
    if not words:
        return None
    read = 0
    for w in words:
        for p in pred_by_image.get(w["image_id"], []):
            if (isinstance(p.get("text"), str) and p["text"].strip() == w["text"].strip()
                    and box_iou(_xyxy(p["bbox"]), _xyxy(w["bbox"])) >= iou):
                read += 1
                break
    return {"accuracy": read / len(words), "read": read, "words": len(words), "iou_threshold": iou}


def keypoint_pck(pred_by_image: dict, gt_anns: list, fractions=(0.1, 0.2)) -> dict | None:
    """PCK: the share of labelled GT key points (visibility > 0) within ``f`` x the longer side of
    their person's box of the point predicted for them, for each ``f``. Each GT person takes the
    prediction with key points of the highest box IoU (at least 0.5); a person with no match
    misses all its points. ``None`` when no GT annotation has key points."""
    persons = [a for a in gt_anns if a.get("keypoints") and a.get("bbox") is not None]
    if not persons:
        return None
    hits, total, matched = [0] * len(fractions), 0, 0
    for g in persons:
        true = np.asarray(g["keypoints"], dtype=float).reshape(-1, 3)
        visible = true[:, 2] > 0
        total += int(visible.sum())
        cands = [p for p in pred_by_image.get(g["image_id"], []) if p.get("keypoints")]
        ious = [box_iou(_xyxy(p["bbox"]), _xyxy(g["bbox"])) for p in cands]
        if not ious or max(ious) < 0.5:
            continue
        matched += 1
        guess = np.asarray(cands[int(np.argmax(ious))]["keypoints"], dtype=float).reshape(-1, 3)
        if len(guess) != len(true):
            continue
        ok = visible & (guess[:, 2] > 0)
        dist = np.hypot(*(guess[:, :2] - true[:, :2]).T)
        side = max(g["bbox"][2], g["bbox"][3])
        for j, f in enumerate(fractions):
            hits[j] += int((ok & (dist <= f * side)).sum())
    out = {f"pck@{f:g}": h / max(total, 1) for f, h in zip(fractions, hits)}
    return {**out, "persons_matched": matched, "persons": len(persons), "keypoints": total}


def _xyxy(b):
    "COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]``."
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def _coco(data: dict):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {"info": {}, "licenses": [], "annotations": [], **data}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


FIELDS = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}


def _cocoeval(gt_coco, gt: dict, dts: list, iou_type: str, image_ids: list) -> dict | None:
    "One COCOeval run, or ``None`` when either side lacks the data it needs."
    from pycocotools.cocoeval import COCOeval

    field = FIELDS[iou_type]
    cat_ids = _evaluable_categories(gt, iou_type)
    mine = [_slim(d, field) for d in dts if d.get(field) and d["category_id"] in cat_ids]
    if iou_type == "segm":
        mine = [{**d, "segmentation": _as_rle(d["segmentation"], gt_coco.imgs[d["image_id"]])}
                for d in mine]
    if not mine or not cat_ids or not image_ids:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        dt_coco = gt_coco.loadRes(mine)
        ev = COCOeval(gt_coco, dt_coco, iou_type)
        ev.params.imgIds = image_ids
        ev.params.catIds = sorted(cat_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: round(float(v), 4) for name, v in zip(STAT_NAMES[iou_type], ev.stats,
                                                        strict=True)}


def _slim(ann: dict, field: str) -> dict:
    "Only what loadRes needs (it tells result types apart by the first annotation's keys)."
    return {"image_id": ann["image_id"], "category_id": ann["category_id"],
            "score": float(ann.get("score", 1.0) or 0.0), field: ann[field]}


def _as_rle(segmentation, image: dict) -> dict:
    "Polygons or uncompressed RLE -> compressed RLE (what loadRes takes for segm results)."
    from pycocotools import mask as mask_utils

    h, w = image["height"], image["width"]
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    if isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, h, w)
    return segmentation


def _evaluable_categories(gt: dict, iou_type: str) -> set:
    "GT categories whose every annotation has what this IoU type compares."
    field = FIELDS[iou_type]
    cats = {c["id"] for c in gt.get("categories", [])}
    if iou_type == "keypoints":
        cats = {c["id"] for c in gt.get("categories", []) if c.get("keypoints")}
    has, lacks = set(), set()
    for ann in gt.get("annotations", []):
        (has if ann.get(field) else lacks).add(ann["category_id"])
    return cats if iou_type == "bbox" else (cats & has) - lacks


# -- REC -------------------------------------------------------------------------------------------
def rec_accuracy(pred, gt: list, iou: float = 0.5) -> dict:
    """Acc@IoU of referring-expression boxes.

    Args:
        pred: a COCO dict from ``label`` (``rec`` annotations with ``question_id``) or a list of
            ``{question_id, answer | bbox_xyxy}`` pixel boxes.
        gt: RefCOCO-style items ``{question_id, answer: [x1, y1, x2, y2]}`` in pixels.
        iou: the IoU a hit needs.

    Returns:
        ``{"accuracy", "correct", "total", "missing", "iou_threshold"}``.
    """
    boxes = rec_predictions(pred)
    correct = missing = 0
    for k, item in enumerate(gt):
        qid = str(item.get("question_id", k))
        if qid not in boxes:
            missing += 1
            continue
        correct += box_iou(boxes[qid], item["answer"]) >= iou
    total = len(gt)
    return {"accuracy": round(correct / total, 4) if total else 0.0, "correct": int(correct),
            "total": total, "missing": missing, "iou_threshold": iou}


def rec_predictions(pred) -> dict[str, list]:
    "Each question's predicted ``[x1, y1, x2, y2]`` (its best-scored box), by question id."
    out, best = {}, {}
    if isinstance(pred, dict):
        for ann in pred.get("annotations", []):
            if ann.get("task") != "rec" or "question_id" not in ann:
                continue
            qid, score = str(ann["question_id"]), float(ann.get("score", 0.0) or 0.0)
            if qid not in best or score > best[qid]:
                x, y, w, h = ann["bbox"]
                out[qid], best[qid] = [x, y, x + w, y + h], score
        return out
    if not isinstance(pred, list):
        raise ValueError("REC predictions must be a COCO dict or a list of {question_id, answer}")
    for k, item in enumerate(pred):
        box = item.get("answer", item.get("bbox_xyxy"))
        if box is not None and len(box) == 4:
            out[str(item.get("question_id", k))] = list(box)
    return out


def box_iou(a, b) -> float:
    "IoU of two ``[x1, y1, x2, y2]`` boxes."
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


# -- output ----------------------------------------------------------------------------------------
def format_table(metrics: dict) -> str:
    "A plain-text table of the metrics (one column per IoU type)."
    if "rec" in metrics:
        r = metrics["rec"]
        return (f"REC Acc@IoU{r['iou_threshold']}: {r['accuracy']:.4f} "
                f"({r['correct']}/{r['total']}, {r['missing']} without a prediction)")
    kinds = [k for k in ("bbox", "segm", "keypoints") if k in metrics]
    m = metrics.get("matching", {})
    head = (f"matched {m.get('images', 0)} images, {m.get('categories', 0)} categories, "
            f"{m.get('annotations', 0)} predictions ({m.get('dropped', 0)} unmatched)")
    extra = []
    if "text" in metrics:
        t = metrics["text"]
        extra.append(f"text     accuracy {t['accuracy']:.4f} ({t['read']}/{t['words']} GT texts read "
                     f"exactly by a box with IoU >= {t['iou_threshold']})")
    if "pck" in metrics:
        p = metrics["pck"]
        levels = ", ".join(f"{k.upper()} {v:.4f}" for k, v in p.items() if k.startswith("pck@"))
        extra.append(f"pose     {levels} ({p['persons_matched']}/{p['persons']} persons matched)")
    if not kinds:
        if extra:
            return "\n".join([head, *extra])
        return head + "\nnothing to evaluate (no IoU type has data on both sides)"
    names = list(dict.fromkeys(n for k in kinds for n in STAT_NAMES[k]))
    lines = [head, f"{'metric':<8}" + "".join(f"{k:>11}" for k in kinds)]
    for name in names:
        cells = [metrics[k].get(name) for k in kinds]
        lines.append(f"{name:<8}" + "".join(f"{'-':>11}" if v is None else f"{v:>11.4f}"
                                            for v in cells))
    return "\n".join(lines + extra)
