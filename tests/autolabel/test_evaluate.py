"""Evaluation: COCOeval by category name and file name, REC accuracy, the CLI table and JSON."""

import json

import pytest
from click.testing import CliRunner

from sphinx_tools.cli import main
from sphinx_tools.pipelines.autolabel.evaluate import box_iou, evaluate, format_table


def as_predictions(gt: dict, shift_ids: int = 100) -> dict:
    "The GT as predictions, with other category and image ids (matched back by name)."
    cats = [{**c, "id": c["id"] + shift_ids} for c in gt["categories"]]
    images = [{**im, "id": im["id"] + shift_ids} for im in gt["images"]]
    anns = [{**a, "category_id": a["category_id"] + shift_ids,
             "image_id": a["image_id"] + shift_ids, "score": 0.9} for a in gt["annotations"]]
    return {"images": images, "categories": cats[::-1], "annotations": anns}


@pytest.fixture
def gt(synth_dir):
    return json.loads((synth_dir / "coco.json").read_text())


def test_perfect_predictions_score_one_everywhere(gt):
    metrics = evaluate(as_predictions(gt), gt)
    assert metrics["matching"]["dropped"] == 0
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)  # the categories with polygons
    assert metrics["keypoints"]["AP"] == pytest.approx(1.0)
    assert metrics["text"]["accuracy"] == 1.0 and metrics["text"]["words"] > 0
    assert metrics["pck"]["pck@0.1"] == 1.0 and metrics["pck"]["persons_matched"] == metrics["pck"]["persons"] > 0
    table = format_table(metrics)
    assert "AP50" in table and "text     accuracy 1.0000" in table and "PCK@0.1 1.0000" in table


def test_unknown_categories_are_dropped_and_reported(gt):
    pred = as_predictions(gt)
    pred["categories"].append({"id": 999, "name": "unicorn"})
    pred["annotations"].append({**pred["annotations"][0], "category_id": 999})
    metrics = evaluate(pred, gt, iou_types=["bbox"])
    assert metrics["matching"]["dropped"] == 1 and set(metrics) == {"matching", "bbox", "text"}


def test_rec_accuracy_from_coco_or_list(synth_dir):
    gt = json.loads((synth_dir / "rec.json").read_text())
    perfect = [{"question_id": g["question_id"], "answer": g["answer"]} for g in gt]
    assert evaluate(perfect, gt)["rec"]["accuracy"] == 1.0
    half = [dict(p, answer=[0, 0, 1, 1]) if k % 2 else p for k, p in enumerate(perfect)]
    expected = sum(1 for k in range(len(gt)) if k % 2 == 0) / len(gt)
    assert evaluate(half, gt)["rec"]["accuracy"] == pytest.approx(expected, abs=1e-4)
    coco = {"images": [], "categories": [], "annotations": [
        {"task": "rec", "question_id": g["question_id"], "score": 0.5,
         "bbox": [g["answer"][0], g["answer"][1], g["answer"][2] - g["answer"][0],
                  g["answer"][3] - g["answer"][1]]} for g in gt[1:]]}
    rec = evaluate(coco, gt)["rec"]
    assert rec["missing"] == 1 and rec["correct"] == len(gt) - 1


@pytest.mark.parametrize(
    "a, b, iou",
    [([0, 0, 10, 10], [0, 0, 10, 10], 1.0), ([0, 0, 10, 10], [5, 0, 15, 10], 1 / 3),
     ([0, 0, 1, 1], [2, 2, 3, 3], 0.0), ([0, 0, 0, 0], [0, 0, 0, 0], 0.0)],
)
def test_box_iou(a, b, iou):
    assert box_iou(a, b) == pytest.approx(iou)


def test_evaluate_command_prints_and_writes_json(gt, synth_dir, tmp_path):
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps(as_predictions(gt)))
    result = CliRunner().invoke(main, ["evaluate", str(pred), str(synth_dir / "coco.json"),
                                       "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    assert "bbox" in result.output and "keypoints" in result.output
    assert json.loads((tmp_path / "m.json").read_text())["bbox"]["AP"] == pytest.approx(1.0)
    bad = CliRunner().invoke(main, ["evaluate", str(pred), str(pred), "--iou-types", "nope"])
    assert bad.exit_code != 0 and "unknown IoU type" in bad.output


def one_image(anns):
    return {"images": [{"id": 1, "file_name": "a.png", "width": 300, "height": 300}],
            "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "word"}],
            "annotations": [{"id": k + 1, "image_id": 1, "iscrowd": 0, **a} for k, a in enumerate(anns)]}


def test_text_accuracy_needs_the_right_reading_in_the_right_box():
    words = [{"category_id": 2, "bbox": [10, 10, 40, 10], "area": 400, "text": "EXIT"},
             {"category_id": 2, "bbox": [10, 50, 40, 10], "area": 400, "text": "park"},
             {"category_id": 2, "bbox": [10, 90, 40, 10], "area": 400, "text": "42"}]
    pred = one_image([{**words[0], "text": " EXIT "},  # read, spaces aside
                      {**words[1], "text": "Park"},  # misread
                      {**words[2], "bbox": [60, 90, 40, 10]}])  # read where the word is not
    text = evaluate(pred, one_image(words), iou_types=())["text"]
    assert text == {"accuracy": 1 / 3, "read": 1, "words": 3, "iou_threshold": 0.5}


def test_pck_counts_key_points_within_a_share_of_their_person_s_size():
    box = [10, 10, 50, 100]  # longer side 100: 0.1 is 10 px, 0.2 is 20 px
    truth = [20, 20, 2, 40, 60, 2, 30, 90, 2, 0, 0, 0]  # the last point is not labelled
    person = {"category_id": 1, "bbox": box, "area": 5000, "keypoints": truth, "num_keypoints": 3}
    moved = [25, 20, 2, 40, 75, 2, 60, 90, 2, 0, 0, 0]  # 5, 15 and 30 px off
    pck = evaluate(one_image([{**person, "keypoints": moved, "score": 1.0}]), one_image([person]),
                   iou_types=("keypoints",))["pck"]
    assert pck == {"pck@0.1": 1 / 3, "pck@0.2": 2 / 3, "persons_matched": 1, "persons": 1,
                   "keypoints": 3}
    elsewhere = {**person, "bbox": [200, 200, 50, 100], "score": 1.0}  # right points, wrong person box
    pck = evaluate(one_image([elsewhere]), one_image([person]), iou_types=("keypoints",))["pck"]
    assert pck["pck@0.1"] == 0.0 and pck["persons_matched"] == 0
