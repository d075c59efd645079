"""The demo model's quality measures (sphinx_tools.demo.quality): localization under teacher forcing."""

import pytest

from sphinx_tools.demo import quality as bench
from sphinx_tools.train import IGNORE


def test_coordinates_read_one_token_and_digit_answers():
    # one-token coordinates: the guess for pieces[i] is pred[i - 1]
    pieces = ["Q", "[", "0.10", ",", "0.20", ",", "0.30", ",", "0.40", "]"]
    labels = [IGNORE] + [1] * 9
    pred = ["[", "0.12", ",", "x", ",", "0.30", ",", "0.41", "]", "</s>"]
    assert list(bench._coordinates(pieces, labels, pred)) == [
        (0, 10, 12), (1, 20, None), (2, 30, 30), (3, 40, 41)]
    # digit by digit: "0 . 4 1", the two decimals guessed after "." and after the first decimal
    pieces = ["[", "0", ".", "4", "1", "]"]
    pred = ["0", ".", "3", "9", "]", "</s>"]
    assert list(bench._coordinates(pieces, [1] * 6, pred)) == [(0, 41, 39)]


def test_corner_stats_tell_a_locating_model_from_a_constant_one():
    truths = [(a, t) for t in (10, 30, 50, 70) for a in (0, 1)]
    exact = bench.corner_stats([(a, t, t) for a, t in truths])
    assert exact["first_corner_mae"] == 0 and exact["first_corner_corr_x1"] == pytest.approx(1.0)
    assert exact["first_corner_mae_median_guess"] == pytest.approx(0.2)  # median_low 30: |-20|,0,20,40
    constant = bench.corner_stats([(a, t, 40) for a, t in truths])
    assert constant["first_corner_corr_x1"] is None and constant["first_corner_corr_y1"] is None
    assert constant["first_corner_mae"] == pytest.approx(0.2) and constant["first_corners"] == 8
    flipped = bench.corner_stats([(a, t, 80 - t) for a, t in truths])
    assert flipped["first_corner_corr_y1"] == pytest.approx(-1.0)


def test_nearest_is_named_tells_the_named_object_from_the_others():
    xs = [10, 50, 52]
    assert bench.nearest_is_named(12, xs, 0) and not bench.nearest_is_named(12, xs, 1)
    assert bench.nearest_is_named(51, xs, 1) and bench.nearest_is_named(51, xs, 2)  # a tie counts
    assert not bench.nearest_is_named(60, xs, 1) and bench.nearest_is_named(60, xs, 2)


def test_the_readme_quality_table_is_the_shipped_quality_json():
    import json
    from pathlib import Path

    from sphinx_tools.demo import DEMO_DIR

    measured = json.loads((DEMO_DIR / "quality.json").read_text())
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## The embedded demo model"):readme.index("## Benchmarks")]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")][1:]
    values = [float(value) for _, value, _ in rows]
    keys = ["detection_ap50", "rec_acc50", "pose_keypoint_ap", "ocr_word_accuracy", "layout_ap50"]
    assert values == [round(measured[k], 3) for k in keys]
    assert [float(t) for *_, t in rows] == [measured["targets"][k] for k in keys]


def test_expression_kind_names_what_a_rec_question_uses():
    from sphinx_tools.demo.synth import generate_scene, scene_qas

    seen = {}
    for k in range(60):
        scene = generate_scene("shapes", 31000 + k)
        for q in scene_qas(scene):
            if q.task != "rec":
                continue
            obj = scene.objects[q.targets[0]]
            kind = bench.expression_kind(q.question, obj)
            seen.setdefault(kind, q.question)
            words = q.question.rsplit(":", 1)[-1].split()
            assert (obj.color in words) == (kind != "shape") and obj.category.rstrip(".") in q.question
            twins = [o for o in scene.objects if (o.color, o.category) == (obj.color, obj.category)]
            assert (kind == "colour+shape+place") == (len(twins) > 1 and kind != "shape")
    assert set(seen) == {"shape", "colour+shape", "colour+shape+place"}, seen


def test_rec_misses_tell_the_wrong_object_from_a_box_off_the_named_one():
    coco = {"images": [{"id": 7, "file_name": "000003.png"}],
            "annotations": [{"image_id": 7, "bbox": [0, 0, 10, 10]}, {"image_id": 7, "bbox": [50, 50, 10, 10]},
                            {"image_id": 7, "bbox": [80, 0, 10, 10]}]}
    items = [{"question_id": f"q{k}", "image": "images/000003.png", "answer": [50, 50, 60, 60]}
             for k in range(5)]
    pred = [{"question_id": "q0", "answer": [51, 51, 60, 60]},  # a hit
            {"question_id": "q1", "answer": [0, 0, 9, 9]},  # another object
            {"question_id": "q2", "answer": [45, 45, 75, 75]},  # the named object, too big a box
            {"question_id": "q3", "answer": [20, 20, 30, 30]}]  # on no object; q4: no answer
    assert bench.rec_misses(pred, items, coco) == {
        "misses": 4, "wrong_object": 1, "box_off": 1, "no_object": 1, "no_answer": 1}


def test_the_quality_command_measures_every_kind_and_the_category_list_wording(tmp_path):
    import json

    from click.testing import CliRunner

    from sphinx_tools import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "m", variant="sphinx")
    out = tmp_path / "quality.json"
    run = CliRunner().invoke(bench.quality_command, ["--checkpoint", str(ckpt), "--n", "1",
                                                     "--max-gen-len", "12", "--out", str(out)])
    assert run.exit_code == 0, run.output
    res = json.loads(out.read_text())
    for key in ("detection_ap50", "detection_ap50_with_categories", "rec_acc50", "pose_keypoint_ap",
                "ocr_word_accuracy", "layout_ap50"):
        assert key in res and (res[key] is None or -1 <= res[key] <= 1), key
    assert set(res["met"]) == set(bench.TARGETS)
    assert set(res["pose_pck"]) == {"pck@0.1", "pck@0.2", "persons_matched", "persons", "keypoints"}
