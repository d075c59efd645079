"""End to end with a scripted model: the one COCO file, its loaders, resume, failures, SAM."""

import json
import shutil

import numpy as np
import pytest
import supervision as sv
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sphinx_tools.pipelines.autolabel import Labeler, Ontology, label_dataset, open_source
from sphinx_tools.pipelines.autolabel import write_coco
from sphinx_tools.pipelines.autolabel.coco import ID_KINDS
from sphinx_tools.pipelines.autolabel.worklog import log_dir_for

from .conftest import ScriptedModel

TASKS = ["detection", "pose", "ocr", "caption", "layout", "reg", "relation", "grounded_caption"]


def run(model, src, out, tasks=TASKS, **kwargs):
    labeler = Labeler(model, tasks, model_id="scripted", **kwargs.pop("labeler", {}))
    source = open_source(src)
    summary = label_dataset(labeler, source, out, progress=False, batch_size=4, **kwargs)
    merged = write_coco(out, source, labeler, limit=kwargs.get("limit"))
    return summary, merged, json.loads(out.read_text())


@pytest.fixture
def labeled(synth_dir, tmp_path):
    out = tmp_path / "labels.json"
    return run(ScriptedModel(), synth_dir / "images", out), out


def test_one_coco_file_with_every_section(labeled, synth_dir):
    (summary, merged, coco), out = labeled
    assert summary.labeled == 6 and not summary.failed and merged.missing == 0
    assert [im["file_name"] for im in coco["images"]] == [f"{i:06d}.png" for i in range(6)]
    tasks = {a["task"] for a in coco["annotations"]}
    assert tasks == {"detection", "ocr", "layout", "relation", "grounded_caption"}
    person = next(c for c in coco["categories"] if c["name"] == "person")
    assert len(person["keypoints"]) == 17 and len(person["skeleton"]) == 19
    people = [a for a in coco["annotations"] if "keypoints" in a]
    assert len(people) == 6 and all(a["task"] == "detection" for a in people)  # pose attached
    assert all(a["num_keypoints"] == 4 for a in people)
    dogs = [a for a in coco["annotations"] if a["task"] == "detection"
            and a["category_id"] != person["id"]]
    assert all(a["caption"] == "a brown dog" for a in dogs)  # REG on detection's boxes
    assert {a["text"] for a in coco["annotations"] if a["task"] == "ocr"} == {"HELLO"}
    assert all(0 < a["score"] <= 1 for a in coco["annotations"])
    assert {c["task"] for c in coco["captions"]} == {"caption", "grounded_caption"}
    ids = {a["id"] for a in coco["annotations"]}
    assert len(coco["relations"]) == 6
    assert all(r["subject_id"] in ids and r["object_id"] in ids for r in coco["relations"])
    assert coco["info"]["tasks"] == TASKS and coco["info"]["prompts"]["detection"]
    assert not list(out.parent.glob(".labels.json*"))  # no temp file left behind


def test_loads_in_pycocotools_supervision_and_cocoeval(labeled, synth_dir):
    (_, _, coco), out = labeled
    gt = COCO(str(out))
    assert len(gt.getAnnIds()) == len(coco["annotations"])
    ds = sv.DetectionDataset.from_coco(str(synth_dir / "images"), str(out))
    assert len(ds) == 6 and "person" in ds.classes
    dt = gt.loadRes([{k: a[k] for k in ("image_id", "category_id", "bbox", "score")}
                     for a in coco["annotations"]])
    ev = COCOeval(gt, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_rerun_is_a_noop_and_overwrite_redoes(labeled, synth_dir):
    (_, _, first), out = labeled
    model = ScriptedModel()
    summary, _, again = run(model, synth_dir / "images", out)
    assert model.calls == [] and summary.skipped == 6 and summary.labeled == 0
    assert again["annotations"] == first["annotations"] and again["images"] == first["images"]
    summary, _, redone = run(model, synth_dir / "images", out, overwrite=True)
    assert summary.labeled == 6 and len(model.calls) == 4  # 2 batches x 2 stages
    assert redone["annotations"] == first["annotations"]


def test_torn_last_line_loses_only_that_item(labeled, synth_dir):
    (_, _, first), out = labeled
    log = next(log_dir_for(out).glob("*.jsonl"))
    lines = log.read_bytes().splitlines(keepends=True)
    ids = [line for line in lines if json.loads(line)["kind"] in ID_KINDS]
    data = b"".join(line for line in lines if line not in ids)  # the merge's id records last
    log.write_bytes(b"".join(ids) + data[: data.rstrip(b"\n").rfind(b"\n") + 1 + 25])
    model = ScriptedModel()
    summary, _, again = run(model, synth_dir / "images", out)
    assert summary.labeled == 1 and summary.skipped == 5
    assert again["annotations"] == first["annotations"] and again["images"] == first["images"]
    after = log.read_text().splitlines()
    torn = next(k for k, line in enumerate(after) if len(line) == 25)
    assert json.loads(after[torn + 1])["task"] == TASKS[-1]  # appended on a fresh line


def test_changed_prompt_redoes_only_what_depends_on_it(labeled, synth_dir):
    _, out = labeled
    model = ScriptedModel()
    summary, _, coco = run(model, synth_dir / "images", out,
                           labeler={"task_options": {"caption": {"variant": "detailed"}}})
    assert summary.labeled == 6
    asked = [q for _, qs in model.calls for per_image in qs for q in per_image]
    assert len(asked) == 6 and all("detailed description" in q for q in asked)


def test_bad_images_are_recorded_not_fatal(synth_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(synth_dir / "images", src)
    (src / "zero.png").write_bytes(b"")
    (src / "junk.jpg").write_bytes(b"not an image at all")
    good = (src / "000000.png").read_bytes()
    (src / "truncated.png").write_bytes(good[: len(good) // 2])
    summary, merged, coco = run(ScriptedModel(), src, tmp_path / "out.json", tasks=["caption"])
    reasons = {f["file_name"]: f["reason"] for f in coco["failures"]}
    assert set(reasons) == {"zero.png", "junk.jpg", "truncated.png"}
    assert "0 bytes" in reasons["zero.png"] and "decode" in reasons["junk.jpg"]
    assert len(coco["images"]) == 6 and len(summary.failed) == 3


def test_limit_and_data_parallel_shards_merge_to_the_same_file(labeled, synth_dir, tmp_path):
    (_, _, whole), _ = labeled
    out = tmp_path / "dp.json"
    labeler = Labeler(ScriptedModel(), TASKS, model_id="scripted")
    source = open_source(synth_dir / "images")
    for rank in (1, 0):
        label_dataset(labeler, source, out, rank=rank, world=2, progress=False)
    assert len(list(log_dir_for(out).glob("rank-*.jsonl"))) == 2
    write_coco(out, source, labeler)
    coco = json.loads(out.read_text())
    assert coco["annotations"] == whole["annotations"] and coco["images"] == whole["images"]
    _, merged, limited = run(ScriptedModel(), synth_dir / "images", tmp_path / "l.json", limit=2)
    assert len(limited["images"]) == 2 and merged.missing == 0


def test_coco_source_reuses_ids_and_categories(synth_dir, tmp_path):
    gt = json.loads((synth_dir / "coco.json").read_text())
    source = open_source(synth_dir / "coco.json")
    onto = Ontology.from_categories(source.categories)
    labeler = Labeler(ScriptedModel(), ["detection", "pose"], ontology=onto, model_id="s")
    out = tmp_path / "c.json"
    label_dataset(labeler, source, out, progress=False)
    write_coco(out, source, labeler)
    coco = json.loads(out.read_text())
    assert [c["id"] for c in coco["categories"][: len(gt["categories"])]] == \
        [c["id"] for c in gt["categories"]]
    assert [im["id"] for im in coco["images"]] == [im["id"] for im in gt["images"]]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert {names[a["category_id"]] for a in coco["annotations"]} == {"person", "dog"}


def test_drop_unmapped_phrases(synth_dir, tmp_path):
    onto = Ontology.parse("person", keep_unmapped=False)
    _, _, coco = run(ScriptedModel(), synth_dir / "images", tmp_path / "d.json",
                     tasks=["detection"], labeler={"ontology": onto})
    assert [c["name"] for c in coco["categories"]] == ["person"]
    assert len(coco["annotations"]) == 6


def _sam_labeled(synth_dir, out, box_sam, **coco_options):
    "Two images detected and segmented by the box SAM, merged into ``out``; (labeler, source)."
    labeler = Labeler(ScriptedModel(), ["detection"], model_id="s", sam_predictor=box_sam,
                      sam_id="tiny")
    source = open_source(synth_dir / "images")
    label_dataset(labeler, source, out, progress=False, limit=2)
    write_coco(out, source, labeler, limit=2, **coco_options)
    return labeler, source


def test_sam_masks_as_compressed_rle(synth_dir, tmp_path, box_sam):
    out = tmp_path / "sam.json"
    _sam_labeled(synth_dir, out, box_sam)
    coco = json.loads(out.read_text())
    anns = coco["annotations"]
    assert anns and all(isinstance(a["segmentation"]["counts"], str) for a in anns)
    for a in anns:  # the box SAM's mask is the box itself
        assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3], rel=0.1, abs=30)
    gt = COCO(str(out))
    ev = COCOeval(gt, gt.loadRes([{k: a[k] for k in ("image_id", "category_id",
                                                         "segmentation", "score")}
                                  for a in anns]), "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
    ds = sv.DetectionDataset.from_coco(str(synth_dir / "images"), str(out))
    assert ds[0][2].mask is not None


def test_rle_to_polygons_traces_each_part():
    from pycocotools import mask as mask_utils

    from sphinx_tools.coco import encode_rle, rle_to_polygons

    yy, xx = np.mgrid[:120, :160]
    disk = (xx - 50) ** 2 + (yy - 60) ** 2 <= 30 ** 2
    square = (xx >= 110) & (xx < 150) & (yy >= 20) & (yy < 50)
    polygons = rle_to_polygons(encode_rle(disk | square))
    assert len(polygons) == 2 and all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
    for want in (disk, square):  # each part comes back as one polygon covering it
        ious = [mask_utils.iou([mask_utils.encode(np.asfortranarray(want.astype(np.uint8)))],
                               mask_utils.frPyObjects([p], 120, 160), [0])[0][0] for p in polygons]
        assert max(ious) > 0.9
    speck = np.zeros((20, 20), bool)
    speck[5, 5] = True
    assert rle_to_polygons(encode_rle(speck)) == []


def test_sam_masks_as_polygons(synth_dir, tmp_path, box_sam):
    from sphinx_tools.pipelines.autolabel.export import export_label_studio

    out = tmp_path / "poly.json"
    labeler, source = _sam_labeled(synth_dir, out, box_sam, mask_format="polygon")
    with pytest.raises(ValueError, match="unknown mask format 'png'"):
        write_coco(out, source, labeler, limit=2, mask_format="png")
    coco = json.loads(out.read_text())
    anns = coco["annotations"]
    assert anns and all(isinstance(a["segmentation"], list) and a["segmentation"] for a in anns)
    for a in anns:  # the box SAM's mask is the box: one polygon around it
        xs, ys = a["segmentation"][0][::2], a["segmentation"][0][1::2]
        x, y, w, h = a["bbox"]
        assert min(xs) == pytest.approx(x, abs=2) and max(xs) == pytest.approx(x + w, abs=2)
        assert min(ys) == pytest.approx(y, abs=2) and max(ys) == pytest.approx(y + h, abs=2)
    # the polygons are the RLE masks up to the contour's half pixel: evaluated against them
    from sphinx_tools.pipelines.autolabel.evaluate import evaluate

    rle = tmp_path / "rle.json"
    _sam_labeled(synth_dir, rle, box_sam)
    metrics = evaluate(out, rle, iou_types=("segm",))
    assert metrics["segm"]["AP50"] == pytest.approx(1.0) and metrics["segm"]["AP75"] == pytest.approx(1.0)
    ds = sv.DetectionDataset.from_coco(str(synth_dir / "images"), str(out))
    assert ds[0][2].mask is not None
    # Label Studio gets each mask as a polygon in percent of the image, tied to its box
    tasks = json.loads(export_label_studio(out, tmp_path / "ls.json").read_text())
    polys = [r for t in tasks for r in t["predictions"][0]["result"] if r["type"] == "polygonlabels"]
    assert len(polys) == len(anns)
    for r in polys:
        assert r["parentID"].startswith("a") and r["value"]["polygonlabels"]
        assert all(0 <= v <= 100 for pt in r["value"]["points"] for v in pt)


# -- results are found by content, whatever the file is called --------------------------------
def _image(path, size, color) -> None:
    from PIL import Image

    Image.new("RGB", size, color).save(path)


def _by_name(coco) -> dict:
    "file name -> (width, height, its annotations without ids)."
    out = {}
    for im in coco["images"]:
        anns = [{k: v for k, v in a.items() if k not in ("id", "image_id")}
                for a in coco["annotations"] if a["image_id"] == im["id"]]
        out[im["file_name"]] = (im["width"], im["height"], anns)
    return out


def _log_lines(out) -> int:
    return sum(1 for p in log_dir_for(out).glob("*.jsonl") for _ in p.open())


def test_duplicates_and_renames_get_their_labels_on_a_rerun(tmp_path):
    src, out = tmp_path / "src", tmp_path / "o.json"
    src.mkdir()
    _image(src / "a.png", (64, 48), (200, 0, 0))
    _image(src / "c.png", (50, 40), (0, 200, 0))
    _, merged, first = run(ScriptedModel(), src, out, tasks=["detection", "caption"])
    assert merged.missing == 0 and len(first["images"]) == 2
    shutil.copy(src / "a.png", src / "b.png")  # a duplicate of labeled content
    (src / "c.png").rename(src / "z.png")  # a rename
    model = ScriptedModel()
    summary, merged, coco = run(model, src, out, tasks=["detection", "caption"])
    assert model.calls == [] and summary.skipped == 3 and merged.missing == 0
    names = _by_name(coco)
    assert sorted(names) == ["a.png", "b.png", "z.png"]
    assert names["b.png"] == names["a.png"] and names["b.png"][2]
    assert names["z.png"] == _by_name(first)["c.png"]
    lines = _log_lines(out)
    run(ScriptedModel(), src, out, tasks=["detection", "caption"])
    assert _log_lines(out) == lines  # a finished job re-run adds nothing to the log


def test_duplicates_split_by_a_crash_or_in_one_batch_all_get_labels(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _image(src / "a.png", (64, 48), (200, 0, 0))
    for name in ("b.png", "c.png", "d.png"):
        shutil.copy(src / "a.png", src / name)
    _image(src / "e.png", (30, 20), (0, 0, 200))
    # in one batch: every duplicate is labeled
    _, merged, coco = run(ScriptedModel(), src, tmp_path / "one.json", tasks=["caption"])
    assert merged.missing == 0 and len(coco["images"]) == 5
    # a crash after the first image: the re-run finds the duplicates' results by content
    out = tmp_path / "crash.json"
    labeler = Labeler(ScriptedModel(), ["caption"], model_id="scripted")
    label_dataset(labeler, open_source(src), out, progress=False, limit=1)
    _, merged, resumed = run(ScriptedModel(), src, out, tasks=["caption"])
    assert merged.missing == 0 and resumed["images"] == coco["images"]
    assert resumed["captions"] == coco["captions"]


def test_the_newest_content_of_a_file_name_wins(tmp_path):
    src, out = tmp_path / "src", tmp_path / "o.json"
    src.mkdir()
    _image(src / "a.png", (64, 48), (200, 0, 0))
    old = (src / "a.png").read_bytes()
    _image(src / "b.png", (30, 20), (0, 0, 200))
    (src / "c.png").write_bytes(b"not an image")
    run(ScriptedModel(), src, out, tasks=["caption"])
    _image(src / "a.png", (80, 60), (0, 200, 0))  # new content, labeled
    _, _, coco = run(ScriptedModel(), src, out, tasks=["caption"])
    assert _by_name(coco)["a.png"][:2] == (80, 60)
    (src / "a.png").write_bytes(old)  # back to the first content: its results, not relabeled
    shutil.copy(src / "b.png", src / "c.png")  # a failed name now holds labeled content
    model = ScriptedModel()
    _, merged, coco = run(model, src, out, tasks=["caption"])
    assert model.calls == [] and merged.missing == 0 and coco["failures"] == []
    names = _by_name(coco)
    assert names["a.png"][:2] == (64, 48) and names["c.png"] == names["b.png"]
