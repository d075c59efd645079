"""SAM masks added to, or changed on, a finished run: the mask stage reads the logged boxes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sphinx_tools.pipelines.autolabel import Labeler, label_dataset, open_source, write_coco
from sphinx_tools.pipelines.autolabel.engine import Work
from sphinx_tools.pipelines.autolabel.run import load_work
from sphinx_tools.pipelines.autolabel.sources import ImageItem
from sphinx_tools.records import record_boxes

from .conftest import ScriptedModel

TASKS = ["detection", "layout", "grounded_caption", "relation", "caption"]
MASKED = ("detection", "layout", "grounded_caption", "relation")


def run(src, out, sam=None, sam_id=None, model=None, tasks=TASKS):
    labeler = Labeler(model or ScriptedModel(), tasks, model_id="s", sam_predictor=sam,
                      sam_id=sam_id)
    source = open_source(src)
    summary = label_dataset(labeler, source, out, progress=False, limit=3, batch_size=2)
    write_coco(out, source, labeler, limit=3)
    return summary, json.loads(out.read_text())


def masked(coco) -> list:
    return [a for a in coco["annotations"] if a["task"] in MASKED]


@pytest.fixture
def half_sam(box_sam):
    "A box SAM that keeps only the left half of each box: another checkpoint, other masks."
    half = type(box_sam)(box_sam.model)
    inner = half.predict_torch

    def predict_torch(point_coords, point_labels, boxes=None, **kwargs):
        masks, iou, low = inner(point_coords, point_labels, boxes=boxes, **kwargs)
        masks = masks.clone()
        for i in range(len(masks)):
            cols = torch.nonzero(masks[i].any(dim=(0, 1))).flatten()
            if len(cols):
                masks[i, :, :, int(cols[0]) + (len(cols) + 1) // 2:] = False
        return masks, iou, low

    half.predict_torch = predict_torch
    return half


def test_adding_sam_to_a_finished_run_makes_every_mask(synth_dir, tmp_path, box_sam):
    src, out = synth_dir / "images", tmp_path / "labels.json"
    _, plain = run(src, out)
    assert masked(plain) and not any("segmentation" in a for a in plain["annotations"])

    model = ScriptedModel()
    summary, resumed = run(src, out, box_sam, "tiny", model)
    assert summary.labeled == 3 and not summary.failed
    assert model.calls == []  # no task ran again: the boxes came from the work log
    anns = masked(resumed)
    assert len(anns) == len(masked(plain)) and all("segmentation" in a for a in anns)

    _, one_shot = run(src, tmp_path / "one.json", box_sam, "tiny")
    assert resumed["annotations"] == one_shot["annotations"]
    for a in anns:  # the box SAM's mask is the box the annotation carries
        assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3], rel=0.1, abs=30)


def test_a_new_sam_checkpoint_makes_new_masks(synth_dir, tmp_path, box_sam, half_sam):
    src, out = synth_dir / "images", tmp_path / "labels.json"
    _, first = run(src, out, box_sam, "sam-a")
    model = ScriptedModel()
    summary, second = run(src, out, half_sam, "sam-b", model)
    assert summary.labeled == 3 and model.calls == []
    a, b = masked(first), masked(second)
    assert len(a) == len(b) and all("segmentation" in x for x in b)
    assert [x["bbox"] for x in a] == [x["bbox"] for x in b]
    for old, new in zip(a, b):
        assert new["area"] == pytest.approx(old["area"] / 2, rel=0.2, abs=30)


def test_a_task_whose_logged_result_cannot_be_read_runs_again(synth_dir, box_sam):
    labeler = Labeler(ScriptedModel(), ["detection", "caption"], sam_predictor=box_sam,
                      sam_id="tiny")
    item = next(open_source(synth_dir / "images").items())
    plain = Labeler(None, ["detection", "caption"])
    done = set(plain.keys(load_work(item, plain, set()).hash, item).values())
    listed = load_work(item, labeler, done)  # no reader: only the pending work
    assert listed.pending == ["segment"] and listed.logged == {}
    work = load_work(item, labeler, done, logged=lambda key: None)
    assert work.pending == ["detection", "segment"]
    records = labeler.label([work])
    assert [r["task"] for r in records] == ["detection", "segment"]
    assert len(records[1]["result"]["masks"]["detection"]) == 3


def test_the_mask_stage_without_boxes_fails_the_image(box_sam):
    labeler = Labeler(ScriptedModel(), ["detection"], sam_predictor=box_sam, sam_id="tiny")
    item = ImageItem(0, None, "a.png", 1)
    keys = labeler.keys("h", item)
    work = Work(item, Image.new("RGB", (100, 80)), "h", keys, ["segment"])
    (record,) = labeler.label([work])
    assert record["kind"] == "failure" and "no boxes of task 'detection'" in record["reason"]
    work = Work(item, Image.new("RGB", (100, 80)), "h", keys, ["segment"],
                logged={"detection": {"type": "detections", "boxes": [[10, 10, 50, 40]],
                                      "scores": [None], "class_name": ["x"]}})
    (record,) = labeler.label([work])
    (rle,) = record["result"]["masks"]["detection"]
    assert rle["size"] == [80, 100]


def test_record_boxes_follow_the_merge_order():
    det = {"boxes": [[1, 2, 3, 4], [5, 6, 7, 8]]}
    assert record_boxes({"type": "detections", **det}).tolist() == det["boxes"]
    assert record_boxes({"type": "scene_graph", "detections": det}).tolist() == det["boxes"]
    assert record_boxes({"type": "grounded_caption", "detections": det}).shape == (2, 4)
    rec = {"type": "rec", "items": [{"boxes": [[1, 1, 2, 2]]}, {"boxes": []},
                                    {"boxes": [[3, 3, 4, 4]]}]}
    assert record_boxes(rec).tolist() == [[1, 1, 2, 2], [3, 3, 4, 4]]
    assert record_boxes({"type": "rec", "items": []}).shape == (0, 4)
    with pytest.raises(ValueError, match="a 'text' record has no boxes"):
        record_boxes({"type": "text", "text": "hi"})
    assert np.asarray(record_boxes({"type": "detections", "boxes": []})).shape == (0, 4)
