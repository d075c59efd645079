"""Ids that stay put (images across re-runs that add or remove images, categories from a given
COCO file or the work log) and the merge's score / NMS filter."""

import json

import pytest
from PIL import Image

from sphinx_tools.pipelines.autolabel import Labeler, open_source, write_coco
from sphinx_tools.pipelines.autolabel import label_dataset
from sphinx_tools.pipelines.autolabel.coco import Categories
from sphinx_tools.pipelines.autolabel.filters import AnnotationFilter

from . import conftest
from .conftest import ScriptedModel


def _image(path, color) -> None:
    Image.new("RGB", (48, 40), color).save(path)


def run(src, out, tasks=("detection",), **merge):
    labeler = Labeler(ScriptedModel(), list(tasks), model_id="scripted")
    source = open_source(src)
    label_dataset(labeler, source, out, progress=False)
    merged = write_coco(out, source, labeler, **merge)
    return merged, json.loads(out.read_text())


def ids(coco) -> dict:
    return {im["file_name"]: im["id"] for im in coco["images"]}


def test_an_image_keeps_its_id_when_images_are_added_or_removed(tmp_path):
    src, out = tmp_path / "src", tmp_path / "o.json"
    src.mkdir()
    for name, color in (("a.png", (200, 0, 0)), ("c.png", (0, 200, 0))):
        _image(src / name, color)
    _, first = run(src, out)
    assert ids(first) == {"a.png": 1, "c.png": 2}  # a fresh run: source order, as before
    _image(src / "b.png", (0, 0, 200))  # sorts between the two
    _, added = run(src, out)
    assert ids(added) == {"a.png": 1, "b.png": 3, "c.png": 2}
    by_image = {a["image_id"] for a in added["annotations"]}
    assert by_image == {1, 2, 3}
    (src / "a.png").unlink()
    _, removed = run(src, out)
    assert ids(removed) == {"b.png": 3, "c.png": 2}
    _image(src / "a.png", (200, 0, 0))  # back again: its old id
    _, back = run(src, out)
    assert ids(back) == {"a.png": 1, "b.png": 3, "c.png": 2}
    _, fresh = run(src, tmp_path / "fresh.json")  # another output numbers afresh
    assert ids(fresh) == {"a.png": 1, "b.png": 2, "c.png": 3}


def test_given_categories_keep_their_names_and_ids(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _image(src / "a.png", (200, 0, 0))
    given = [{"id": 8, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 3, "name": "car"}]
    _, coco = run(src, tmp_path / "o.json", tasks=("detection", "pose"), categories=given)
    assert [(c["id"], c["name"]) for c in coco["categories"]] == \
        [(8, "person"), (18, "dog"), (3, "car")]  # the scripted answer: a person and 2 dogs
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert sorted(names[a["category_id"]] for a in coco["annotations"]) == \
        ["dog", "dog", "person"]
    assert "keypoints" in coco["categories"][0]


def test_category_ids_recorded_for_new_names_are_reused():
    categories = Categories([{"id": 4, "name": "cat"}], recorded={"dog": 7, "bus": 4})
    assert categories.id("dog") == 7  # recorded before
    assert categories.id("bus") == 8  # its recorded id is given to cat now
    assert categories.id("tree") == 9 and categories.new == {"tree": 9}
    assert Categories().id("x") == 1


def test_min_score_and_nms_in_the_merge(tmp_path, monkeypatch):
    monkeypatch.setitem(conftest.ANSWERS, "Detect all",
                        "<p>dog</p> [0.10,0.10,0.50,0.50;0.11,0.10,0.50,0.50] "
                        "<p>cat</p> [0.10,0.10,0.50,0.50]")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        _image(src / f"{i}.png", (60 * i, 0, 0))
    merged, plain = run(src, tmp_path / "plain.json")
    assert len(plain["annotations"]) == 9 and merged.dropped == {}
    assert "filters" not in plain["info"]
    merged, nms = run(src, tmp_path / "nms.json", annotation_filter=AnnotationFilter(nms=0.5))
    assert len(nms["annotations"]) == 6 and merged.dropped["nms"] == 3
    assert [a["id"] for a in nms["annotations"]] == list(range(1, 7))  # no gaps
    assert nms["info"]["filters"]["dropped"]["nms"] == 3
    merged, agnostic = run(src, tmp_path / "agnostic.json",
                           annotation_filter=AnnotationFilter(nms=0.5, class_agnostic=True))
    assert len(agnostic["annotations"]) == 3 and merged.dropped["nms"] == 6
    top = max(a["score"] for a in plain["annotations"])
    merged, scored = run(src, tmp_path / "scored.json",
                         annotation_filter=AnnotationFilter(min_score=top))
    assert all(a["score"] >= top for a in scored["annotations"])
    assert merged.dropped["min_score"] == 9 - len(scored["annotations"])


def test_filter_checks_its_settings_and_keeps_holes():
    with pytest.raises(ValueError, match="nms must be in"):
        AnnotationFilter(nms=1.5)
    flt = AnnotationFilter(min_score=0.5)
    anns = [None, {"bbox": [0, 0, 1, 1], "score": 0.4}, {"bbox": [0, 0, 1, 1], "score": None}]
    assert flt.keep(anns) == [True, False, True]  # no score counts as 1.0
    assert flt.dropped["min_score"] == 1


def test_label_command_takes_categories_and_filters(synth_dir, tiny_ckpt, tmp_path):
    from click.testing import CliRunner

    from sphinx_tools.cli import main

    gt = json.loads((synth_dir / "coco.json").read_text())
    (tmp_path / "gt.json").write_text(json.dumps({"categories": gt["categories"]}))
    out = tmp_path / "o.json"
    result = CliRunner().invoke(main, [
        "label", str(synth_dir / "images"), "-c", str(tiny_ckpt), "--out", str(out),
        "--tasks", "detection", "--max-gen-len", "6", "--limit", "2", "--no-progress",
        "--categories", str(tmp_path / "gt.json"), "--min-score", "0.2", "--nms", "0.6"])
    assert result.exit_code == 0, result.output
    assert "boxes below --min-score" in result.output
    coco = json.loads(out.read_text())
    n = len(gt["categories"])
    assert coco["categories"][:n] == gt["categories"]
    assert coco["info"]["filters"]["min_score"] == 0.2 and coco["info"]["filters"]["nms"] == 0.6
    help_text = CliRunner().invoke(main, ["label", "--help"]).output
    assert "--min-score" in help_text and "--nms" in help_text and "off" in help_text


def test_task_filter_keeps_detections_that_pose_or_reg_added_to():
    flt = AnnotationFilter(tasks=("pose",))
    anns = [{"task": "detection", "keypoints": [0] * 51}, {"task": "detection"},
            {"task": "pose"}, {"task": "detection", "caption": "a dog"}]
    assert flt.keep(anns) == [True, False, True, False]
    assert AnnotationFilter(tasks=("reg",)).keep(anns) == [False, False, False, True]
