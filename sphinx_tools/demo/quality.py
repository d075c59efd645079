"""Label quality of a model on a fresh seed of the synthetic-scene generator.

Run:  python -m sphinx_tools.demo quality [--checkpoint demo] [--n 24] [--seed 777]

(the demo model's result is ``weights/quality.json``).

For each scene kind it writes a fresh test set (ground truth from :mod:`.synth`), labels
it with the project's own engine (``sphinx_tools.pipelines.autolabel``) and scores it with the
project's own ``evaluate``:

- shapes: detection AP50 (COCOeval bbox) and REC Acc@0.5 (``rec.json``); detection AP50 again
  with the ground truth's categories asked by name, as ``label --categories`` asks
  (``detection_ap50_with_categories``);
- pose: keypoint AP (COCOeval keypoints on the detected persons). Its object scale is the
  person's ink area, a stick figure's few lines, so it asks for a precision of a pixel or two at
  the head; ``pose_pck`` (``evaluate``'s PCK) says how far the key points are in the person's
  own size: the share of ground-truth key points that the person's match (the predicted person
  with the highest box IoU, at least 0.5) puts within 0.1 (and 0.2) of the longer side of its box;
- words: OCR word accuracy (a GT word counts when a prediction with IoU >= 0.5 reads it exactly);
- document: layout AP50.

It also scores detection with every score set to 1.0, to show what logprob confidences add, and
measures localization under teacher forcing (``teacher_forced``): on each task's answers for fresh
scenes, how often the model's next-token prediction gets a coordinate's first decimal right and the
mean absolute error of its two-decimal coordinate (image fractions), a finer signal than AP while
a model is still far from the targets; for boxes also how the first corner (where the object is)
follows the truth, over all scenes and split by the number of objects in the scene (a model that
locates the only object of a scene but cannot yet pick one of several shows it there); and how
much the answers depend on the image (``image_reliance``: answer loss with the scene's own image
vs another scene's), which is ~0 for a model that answers from the question alone.
Targets: detection AP50 >= 0.90, REC >= 0.90, pose AP >= 0.5, OCR >= 0.8, layout AP50 >= 0.8.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

from ..tiny import COORDINATE_PIECES
from ..train.data import IGNORE, tokenize_conversation
from .synth import fmt_box, generate_scene, scene_qas, write_dataset

TARGETS = {"detection_ap50": 0.90, "rec_acc50": 0.90, "pose_keypoint_ap": 0.5,
           "ocr_word_accuracy": 0.8, "layout_ap50": 0.8}


def label(model, src: Path, tasks: list[str], out: Path, max_gen_len: int, categories=None) -> dict:
    """Label ``src`` with the auto-labeling pipeline; returns the COCO json it writes to ``out``.
    With ``categories`` (a COCO categories list), as ``label --categories`` does: detection asks
    for those classes by name, and the output takes their names and ids."""
    from sphinx_tools.pipelines.autolabel import Labeler, Ontology, label_dataset, open_source, write_coco

    # no task options: the model's own (its checkpoint's task_options.json) apply, as in `label`
    labeler = Labeler(model, tasks, max_gen_len=max_gen_len, model_id="bench",
                      ontology=None if categories is None else Ontology.from_categories(categories))
    source = open_source(src)
    label_dataset(labeler, source, out, batch_size=8, progress=False, workers=1)
    write_coco(out, source, labeler, categories=categories)
    return json.loads(out.read_text())


def ap50(metrics: dict, iou_type: str = "bbox") -> float | None:
    m = metrics.get(iou_type) or {}
    return m.get("AP50", m.get("ap50"))


def ocr_word_accuracy(pred: dict, gt: dict) -> float:
    "The share of ground-truth words that a prediction with IoU >= 0.5 reads exactly (``evaluate``'s text accuracy)."
    from sphinx_tools.pipelines.autolabel import evaluate

    return (evaluate(pred, gt, iou_types=()).get("text") or {}).get("accuracy", 0.0)


def constant_scores(pred: dict) -> dict:
    out = dict(pred)
    out["annotations"] = [{**a, "score": 1.0} for a in pred["annotations"]]
    return out


def _coordinates(pieces: list[str], labels: list[int], pred: list[str]):
    """``(slot, true, predicted)`` hundredths of each answer coordinate; ``slot`` counts the
    coordinates inside each ``[...]`` (even: x, odd: y; ``slot % 4`` is x1, y1, x2, y2 of a box),
    ``pred[i]`` is the piece predicted after ``pieces[:i + 1]``, ``predicted`` is ``None`` when it
    is not a number.

    A coordinate is one piece ``"0.41"`` (coordinate tokens) or the four pieces ``0 . 4 1``."""
    axis = 0  # coordinates alternate x, y inside each "[...]"
    for i in range(1, len(pieces)):
        if "[" in pieces[i]:
            axis = 0
        if labels[i] == IGNORE:
            continue
        if pieces[i] in COORDINATE_PIECES:  # one token
            guess = pred[i - 1]
            yield axis, round(float(pieces[i]) * 100), (
                round(float(guess) * 100) if guess in COORDINATE_PIECES else None)
            axis += 1
        elif pieces[i - 1:i + 1] == ["0", "."] and i + 2 < len(pieces) and \
                pieces[i + 1].isdigit() and pieces[i + 2].isdigit():  # digit by digit
            guess = pred[i] + pred[i + 1]
            yield axis, int(pieces[i + 1] + pieces[i + 2]), int(guess) if guess.isdigit() else None
            axis += 1


TEACHER_FORCED = (("shapes", "rec"), ("shapes", "detection"), ("pose", "pose"), ("document", "layout"),
                  ("words", "ocr"))


@torch.inference_mode()
def teacher_forced(model, seed: int, n: int, per_scene: int = 3, tasks=TEACHER_FORCED, encode=None) -> dict:
    """Coordinates predicted under teacher forcing, per task, on ``n`` fresh scenes per kind.

    For boxes also the error of the first corner (x1, y1: where the object is; x2, y2 follow
    from it and the object's size) next to that of always answering the median first corner of
    these scenes: a model that has learned where objects are beats it. For REC on scenes of
    several objects also how often the first x guessed is nearest the named object's x1 among all
    the scene's objects (``named_object_nearest``; chance: one in the number of objects): a model
    that finds objects but cannot tell which one the question names stays at chance; also split
    by the number of objects (``named_object_by_objects``), and on scenes of 3 or more objects by
    the kind of referring expression (``named_object_by_expression_3plus``, see
    :func:`expression_kind`). ``tasks``: ``(scene kind, task)``; ``encode(scene)``: the image
    tokens (1, I, dim) of a scene (default: the model's encoders on its image)."""
    t, tok = model.transformer, model.tokenizer
    t.clear_caches()  # full-sequence forwards, no decoding cache
    out = {}
    for kind, task in tasks:
        first = total = 0
        errors = ([], [])  # x, y
        first_corner = []  # (axis, truth, guess, objects in the scene) of x1 and y1, hundredths
        named = []  # REC, several objects: (first x nearest the named object's, 1 / objects,
        # objects, expression kind)
        for k in range(n):
            scene = generate_scene(kind, seed * 1000 + k)
            qas = [q for q in scene_qas(scene) if q.task == task][:per_scene]
            img = encode(scene) if encode else model.encode_images(model.preprocess(scene.image)[None])
            xs = [round(float(fmt_box(o.xyxy, scene.image.size).split(",")[0]) * 100)
                  for o in scene.objects]  # each object's x1 as its answer writes it
            for q in qas:
                ids, labels = tokenize_conversation(
                    tok, [{"from": "human", "value": q.question}, {"from": "gpt", "value": q.answer}])
                h = t.embed(torch.tensor([ids], device=img.device), img)
                pred = t(h, torch.arange(h.shape[1], device=img.device)[None], keep_last=len(ids))[0]
                pred = [tok.sp.id_to_piece(int(i)) for i in pred.argmax(-1)]
                pieces = [tok.sp.id_to_piece(i) for i in ids]
                for slot, truth, guess in _coordinates(pieces, labels, pred):
                    if task == "rec" and slot == 0 and guess is not None and len(xs) > 1:
                        named.append((nearest_is_named(guess, xs, q.targets[0]), 1 / len(xs), len(xs),
                                      expression_kind(q.question, scene.objects[q.targets[0]])))
                    total += 1
                    first += guess is not None and guess // 10 == truth // 10
                    if guess is not None:
                        errors[slot % 2].append(abs(guess - truth) / 100)
                        if slot % 4 < 2:
                            first_corner.append((slot % 2, truth, guess, len(scene.objects)))
        mae = [round(sum(e) / max(len(e), 1), 4) for e in errors]
        out[task] = {"first_decimal_accuracy": round(first / max(total, 1), 4),
                     "mean_abs_error": round(sum(map(sum, errors)) / max(len(errors[0]) + len(errors[1]), 1), 4),
                     "mean_abs_error_x": mae[0], "mean_abs_error_y": mae[1], "coordinates": total}
        if task in ("rec", "detection") and first_corner:
            out[task].update(corner_stats([r[:3] for r in first_corner]))
            out[task]["first_corner_by_objects"] = _stats_by(
                first_corner, lambda r: _objects_key(r[3]), lambda rows: corner_stats([r[:3] for r in rows]))
        if named:
            out[task].update(named_stats(named))
            out[task]["named_object_by_objects"] = _stats_by(
                named, lambda r: _objects_key(r[2]), named_stats)
            out[task]["named_object_by_expression_3plus"] = _stats_by(
                named, lambda r: r[3] if r[2] >= 3 else None, named_stats)
    return out


def _objects_key(objects: int) -> str:
    return "3+" if objects >= 3 else str(objects)


def _stats_by(rows: list, key, stats) -> dict:
    "``{key: stats(its rows)}`` over the rows grouped by ``key(row)`` (rows keyed None left out)."
    groups: dict = {}
    for row in rows:
        k = key(row)
        if k is not None:
            groups.setdefault(k, []).append(row)
    return {k: stats(v) for k, v in sorted(groups.items())}


def named_stats(named: list[tuple]) -> dict:
    """``named_object_nearest``, its chance and the number of questions of ``(hit, chance, ...)``
    rows."""
    return {"named_object_nearest": round(sum(r[0] for r in named) / len(named), 4),
            "named_object_nearest_chance": round(sum(r[1] for r in named) / len(named), 4),
            "named_object_questions": len(named)}


def pilot_quality(model, seed: int, n: int, min_objects: int = 3) -> dict:
    """A pilot's measures on ``n`` fresh shapes scenes: teacher-forced REC and detection (with
    ``named_object_nearest`` and the first-corner error split by objects) and REC Acc@0.5 on the
    REC questions of the scenes with ``min_objects`` or more objects (``rec_acc50_3plus``)."""
    from sphinx_tools.pipelines.autolabel import evaluate

    t0 = time.time()
    res = {"seed": seed, "scenes": n,
           "teacher_forced": teacher_forced(model, seed, n, tasks=TEACHER_FORCED[:2])}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_dataset(tmp, n, seed=seed, kinds=("shapes",), progress=False)
        objects = {}
        for a in json.loads((tmp / "coco.json").read_text())["annotations"]:
            objects[a["image_id"]] = objects.get(a["image_id"], 0) + 1
        items = [r for r in json.loads((tmp / "rec.json").read_text())
                 if objects[int(r["question_id"][:6]) + 1] >= min_objects]
        (tmp / "rec_many.json").write_text(json.dumps(items))
        pred = label(model, tmp / "rec_many.json", ["rec"], tmp / "pred.json", 64)
        res["rec_acc50_3plus"] = evaluate(pred, items)["rec"]["accuracy"]
        res["rec_questions_3plus"] = len(items)
        res["rec_misses_3plus"] = rec_misses(pred, items, json.loads((tmp / "coco.json").read_text()))
    res["seconds"] = round(time.time() - t0, 1)
    return res


def rec_misses(pred, items: list, coco: dict, iou: float = 0.5) -> dict:
    """Where the REC answers that miss (IoU < ``iou``) went, by the scene's object their box
    overlaps most: another object (``wrong_object``: the question's object was not found), the
    named object with a box too far off (``box_off``), no object at all (``no_object``), or no
    parsed box (``no_answer``). ``items``: RefCOCO-style ground truth whose ``image`` is a file of
    ``coco`` (by file name); ``pred``: what ``label`` wrote for them."""
    from sphinx_tools.pipelines.autolabel.evaluate import box_iou, rec_predictions

    boxes, objects = rec_predictions(pred), {}
    ids = {im["id"]: Path(im["file_name"]).name for im in coco["images"]}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        objects.setdefault(ids[a["image_id"]], []).append([x, y, x + w, y + h])
    out = dict.fromkeys(("misses", "wrong_object", "box_off", "no_object", "no_answer"), 0)
    for item in items:
        box = boxes.get(str(item["question_id"]))
        if box is not None and box_iou(box, item["answer"]) >= iou:
            continue
        out["misses"] += 1
        if box is None:
            out["no_answer"] += 1
            continue
        scene = objects.get(Path(item["image"]).name, [])
        overlaps = [box_iou(box, o) for o in scene]
        if not overlaps or max(overlaps) == 0:
            out["no_object"] += 1
            continue
        best = scene[overlaps.index(max(overlaps))]
        named = max(scene, key=lambda o: box_iou(o, item["answer"]))
        out["box_off" if best == named else "wrong_object"] += 1
    return out


def expression_kind(question: str, obj) -> str:
    """What a REC question's referring expression uses to name ``obj``: its shape alone (``"the
    star"``), its colour and shape (``"the blue triangle"``), or those and its place next to a
    twin (``"the blue triangle at the top"``): ``shape``, ``colour+shape`` or
    ``colour+shape+place``."""
    expression = question.rsplit(":", 1)[-1].strip().rstrip(".")
    if expression == f"the {obj.category}":
        return "shape"
    if expression == f"the {obj.color} {obj.category}":
        return "colour+shape"
    return "colour+shape+place"


def nearest_is_named(guess: int, xs: list[int], named: int) -> bool:
    "Whether a guessed coordinate is at least as near object ``named``'s as any other's ``xs``."
    return abs(xs[named] - guess) <= min(abs(x - guess) for j, x in enumerate(xs) if j != named)


def corner_stats(rows: list[tuple[int, int, int]]) -> dict:
    """How well guessed first corners ``(axis, truth, guess)`` (hundredths; axis 0 = x1, 1 = y1)
    follow the truth: their mean absolute error next to that of always answering the median
    truth of each axis, and the correlation of guess with truth per axis (``None`` when the
    guesses or truths of an axis do not vary: a model that always answers the same corner)."""
    out = {"first_corners": len(rows)}
    median = {a: statistics.median_low(t for b, t, _ in rows if b == a) for a in {r[0] for r in rows}}
    out["first_corner_mae"] = round(sum(abs(g - t) for _, t, g in rows) / 100 / len(rows), 4)
    out["first_corner_mae_median_guess"] = round(
        sum(abs(median[a] - t) for a, t, _ in rows) / 100 / len(rows), 4)
    for axis, name in ((0, "x1"), (1, "y1")):
        pairs = [(t, g) for a, t, g in rows if a == axis]
        corr = None
        if len(pairs) > 1 and len({t for t, _ in pairs}) > 1 and len({g for _, g in pairs}) > 1:
            corr = round(statistics.correlation(*zip(*pairs)), 3)
        out[f"first_corner_corr_{name}"] = corr
    return out


@torch.inference_mode()
def image_reliance(model, seed: int, n: int) -> dict:
    """Mean answer-token loss per task with each scene's own image and with the next scene's image.

    A model that reads the image loses much more with the wrong one; a blind one (answering from
    the question and the answer prior alone) loses the same."""
    import torch.nn.functional as F

    t, tok = model.transformer, model.tokenizer
    t.clear_caches()
    sums = {}  # task -> [own loss, other loss, tokens]
    for kind in ("shapes", "pose", "document", "words"):
        scenes = [generate_scene(kind, seed * 1000 + 500 + k) for k in range(n)]
        images = [model.encode_images(model.preprocess(s.image)[None]) for s in scenes]
        for k, scene in enumerate(scenes):
            for q in scene_qas(scene):
                ids, labels = tokenize_conversation(
                    tok, [{"from": "human", "value": q.question}, {"from": "gpt", "value": q.answer}])
                target = torch.tensor(labels[1:], device=images[k].device)
                acc = sums.setdefault(q.task, [0.0, 0.0, 0])
                for slot, img in enumerate((images[k], images[(k + 1) % n])):
                    h = t.embed(torch.tensor([ids], device=img.device), img)
                    logits = t(h, torch.arange(h.shape[1], device=img.device)[None], keep_last=len(ids))[0]
                    acc[slot] += float(F.cross_entropy(logits[:-1].float(), target, ignore_index=IGNORE,
                                                       reduction="sum"))
                acc[2] += int((target != IGNORE).sum())
    return {task: {"loss_own_image": round(own / m, 4), "loss_other_image": round(other / m, 4),
                   "tokens": m} for task, (own, other, m) in sorted(sums.items())}


def measure(model, checkpoint: str, n: int, seed: int, max_gen_len: int | None, device: str) -> dict:
    "Every measure of the module docstring for ``model``, as the JSON-ready dict the command writes."
    from sphinx_tools.pipelines.autolabel import evaluate

    res, t0 = {"checkpoint": checkpoint, "scenes_per_kind": n, "seed": seed, "device": device}, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = {}
        for kind in ("shapes", "pose", "words", "document"):
            sets[kind] = tmp / kind
            write_dataset(sets[kind], n, seed=seed, kinds=(kind,), progress=False)
        gt = {k: json.loads((d / "coco.json").read_text()) for k, d in sets.items()}

        det = label(model, sets["shapes"] / "images", ["detection"], tmp / "det.json", max_gen_len)
        m = evaluate(det, gt["shapes"], iou_types=("bbox",))
        const = evaluate(constant_scores(det), gt["shapes"], iou_types=("bbox",))
        res["detection_ap50"] = ap50(m)
        res["detection_ap"] = (m.get("bbox") or {}).get("AP")
        res["detection_ap50_constant_scores"] = ap50(const)
        res["detection_ap_constant_scores"] = (const.get("bbox") or {}).get("AP")
        listed = label(model, sets["shapes"] / "images", ["detection"], tmp / "det_categories.json",
                       max_gen_len, categories=gt["shapes"]["categories"])
        res["detection_ap50_with_categories"] = ap50(evaluate(listed, gt["shapes"], iou_types=("bbox",)))
        rec = label(model, sets["shapes"] / "rec.json", ["rec"], tmp / "rec.json", 64)
        rec_gt = json.loads((sets["shapes"] / "rec.json").read_text())
        res["rec_acc50"] = evaluate(rec, rec_gt)["rec"]["accuracy"]
        res["rec_misses"] = rec_misses(rec, rec_gt, gt["shapes"])
        pose = label(model, sets["pose"] / "images", ["detection", "pose"], tmp / "pose.json", max_gen_len)
        scored = evaluate(pose, gt["pose"], iou_types=("keypoints",))
        res["pose_keypoint_ap"] = (scored.get("keypoints") or {}).get("AP")
        res["pose_pck"] = scored.get("pck")
        ocr = label(model, sets["words"] / "images", ["ocr"], tmp / "ocr.json", max_gen_len)
        res["ocr_word_accuracy"] = ocr_word_accuracy(ocr, gt["words"])
        lay = label(model, sets["document"] / "images", ["layout"], tmp / "layout.json", max_gen_len)
        res["layout_ap50"] = ap50(evaluate(lay, gt["document"], iou_types=("bbox",)))
    res["teacher_forced"] = teacher_forced(model, seed, n)
    res["image_reliance"] = image_reliance(model, seed, min(n, 12))
    res["seconds"] = time.time() - t0
    res["targets"] = TARGETS
    res["met"] = {k: (res.get(k) or 0) >= v for k, v in TARGETS.items()}
    res["logprob_scores_beat_constant"] = (res["detection_ap"] or 0) > (
        res["detection_ap_constant_scores"] or 0)
    return res


@click.command("quality")
@click.option("--checkpoint", default="demo", show_default=True)
@click.option("--n", default=24, show_default=True, help="scenes per kind")
@click.option("--seed", default=777, show_default=True, help="a seed the model was not trained on")
@click.option("--max-gen-len", type=int, default=None, help="default: each task's own budget")
@click.option("--out", type=click.Path(path_type=Path),
              help="result JSON  [default: quality.json in the checkpoint folder]")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N")
@click.option("--pilot", is_flag=True,
              help="a pilot's measures (REC and detection on shapes scenes with 3+ objects) on --n "
                   "scenes, written to pilot.json")
def quality_command(checkpoint, n, seed, max_gen_len, out, device, pilot):
    "Measure a model's label quality on fresh synthetic scenes."
    from . import resolve
    from ..sphinx_model import SphinxModel

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    model = SphinxModel.from_pretrained(checkpoint, device=device)
    if pilot:
        res = pilot_quality(model, seed=seed, n=n)
    else:
        res = measure(model, str(checkpoint), n, seed, max_gen_len, device)
    name = "pilot.json" if pilot else "quality.json"
    out = Path(out) if out is not None else resolve(checkpoint) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    click.echo(json.dumps(res, indent=1))
