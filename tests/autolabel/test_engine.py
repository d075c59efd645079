"""The engine with a scripted model: batching, stages, keys, failures."""

import numpy as np
import pytest
from PIL import Image

from sphinx_tools.errors import UnknownTaskError
from sphinx_tools.pipelines.autolabel import Labeler, Ontology
from sphinx_tools.pipelines.autolabel.engine import Work
from sphinx_tools.pipelines.autolabel.sources import ImageItem

from .conftest import ScriptedModel

TASKS = ["detection", "pose", "ocr", "caption", "layout", "reg"]


def works(n=2, tasks=TASKS, labeler=None, size=(200, 100)):
    out = []
    for i in range(n):
        item = ImageItem(i, None, f"{i}.png", i + 1)
        keys = labeler.keys(f"h{i}", item) if labeler else {}
        out.append(Work(item, Image.new("RGB", size), f"h{i}", keys, list(keys or tasks)))
    return out


def by_task(records):
    return {(r["image_id"], r["task"]): r["result"] for r in records if r["kind"] == "result"}


def test_one_generate_multi_per_stage(scripted):
    labeler = Labeler(scripted, TASKS)
    records = labeler.label(works(3, labeler=labeler))
    assert len(records) == 3 * len(TASKS)
    (n1, q1), (n2, q2) = scripted.calls  # stage 1 (4 tasks), stage 2 (pose + reg on the boxes)
    assert n1 == n2 == 3
    assert [len(q) for q in q1] == [4, 4, 4]
    assert [len(q) for q in q2] == [1 + 3, 1 + 3, 1 + 3]  # one person box; three boxes for REG


def test_each_task_gets_its_own_budget(scripted):
    from sphinx_tools import get_task

    labeler = Labeler(scripted, ["detection", "caption", "pose"])
    labeler.label(works(2, labeler=labeler))
    (_, q1), (_, q2) = scripted.calls
    want = [get_task("detection").max_gen_len, get_task("caption").max_gen_len]
    assert want[0] != want[1]
    assert scripted.budgets[0] == [want, want]
    assert scripted.budgets[1] == [[get_task("pose").max_gen_len] * len(q) for q in q2]
    # an explicit budget holds for every question, and is part of the work keys
    fixed = Labeler(ScriptedModel(), ["detection", "caption"], max_gen_len=40)
    fixed.label(works(1, labeler=fixed))
    assert fixed.model.budgets == [[[40, 40]]]
    item = ImageItem(0, None, "0.png", 1)
    assert fixed.keys("h", item)["detection"] != Labeler(None, ["detection"]).keys("h", item)["detection"]
    with pytest.raises(ValueError, match="max_gen_len must be >= 1, got 0"):
        Labeler(None, ["detection"], max_gen_len=0)


def test_pose_asks_about_person_boxes_only(scripted):
    labeler = Labeler(scripted, ["detection", "pose"])
    result = by_task(labeler.label(works(1, labeler=labeler)))
    pose = result[(1, "pose")]
    assert len(pose["people"]) == 1
    np.testing.assert_allclose(pose["people"][0]["box"], [20, 0, 80, 100], atol=0.5)
    kps = np.reshape(pose["people"][0]["keypoints"], (17, 3))
    assert kps[:, 2].tolist().count(2) == 4
    assert "region [" in scripted.calls[1][1][0][0]


def test_ontology_picks_persons_and_classes(scripted):
    onto = Ontology.parse("human=person,dog")
    labeler = Labeler(scripted, ["detection", "pose"], ontology=onto)
    by_task(labeler.label(works(1, labeler=labeler)))
    assert "humans and dogs" in scripted.calls[0][1][0][0]
    assert len(scripted.calls[1][1][0]) == 0 or "region" in scripted.calls[1][1][0][0]


def test_pose_alone_uses_the_whole_image(scripted):
    labeler = Labeler(scripted, ["pose"])
    by_task(labeler.label(works(1, labeler=labeler)))
    assert len(scripted.calls) == 1
    assert "[0.00,0.25,1.00,0.75]" in scripted.calls[0][1][0][0]  # 200x100 padded to a square


def test_keys_change_with_prompt_model_and_content(scripted):
    item = ImageItem(0, None, "a.png", 1)
    a = Labeler(scripted, ["detection", "pose"], model_id="m1")
    b = Labeler(scripted, ["detection", "pose"], model_id="m2")
    c = Labeler(scripted, ["detection", "pose"], model_id="m1",
                task_options={"detection": {"classes": ["cat"]}})
    ka, kb, kc = a.keys("h", item), b.keys("h", item), c.keys("h", item)
    assert ka == Labeler(scripted, ["pose", "detection"], model_id="m1").keys("h", item)
    assert ka["detection"] != kb["detection"] and ka["detection"] != kc["detection"]
    assert ka["pose"] != kc["pose"]  # pose depends on detection's boxes
    assert ka != a.keys("other-content", item)


def test_the_model_s_trained_options_apply_and_given_ones_win():
    model = ScriptedModel()
    model.task_options = {"layout": {"variant": "classes"}, "relation": {"variant": "default"}}
    trained = Labeler(model, ["layout"])  # relation is not run: its entry is not an error
    given = Labeler(model, ["layout"], task_options={"layout": {"variant": "default"}})
    explicit = Labeler(None, ["layout"], trained_options=model.task_options)
    assert trained.options["layout"]["variant"] == explicit.options["layout"]["variant"] == "classes"
    assert given.options["layout"]["variant"] == "default"
    item = ImageItem(0, None, "a.png", 1)
    assert trained.keys("h", item) == explicit.keys("h", item) != given.keys("h", item)
    trained.label(works(1, ["layout"], trained))
    (question,) = model.calls[0][1][0]
    assert "### Human: Detect all layout regions (text, title, list, table or figure)" in question


@pytest.mark.parametrize(
    "tasks, options, error",
    [
        ([], None, ValueError),  # no task
        (["nope"], None, UnknownTaskError),  # unknown task
        (["vqa"], None, ValueError),  # vqa needs a question
        (["reg"], None, ValueError),  # REG without boxes to describe
        (["caption"], {"detection": {}}, ValueError),  # options for a task that is not run
        (["detection"], {"detection": {"bogus": 1}}, ValueError),  # unknown option
    ],
)
def test_bad_configuration_fails_before_any_image(scripted, tasks, options, error):
    with pytest.raises(error):
        Labeler(scripted, tasks, task_options=options)


def test_batch_error_retries_image_by_image():
    model = ScriptedModel(fail_when=lambda images: any(im.size == (7, 7) for im in images))
    labeler = Labeler(model, ["caption"])
    batch = works(2, ["caption"], labeler) + works(1, ["caption"], labeler, size=(7, 7))
    batch[2].item = ImageItem(2, None, "bad.png", 3)
    records = labeler.label(batch)
    kinds = [(r["file_name"], r["kind"]) for r in records]
    assert kinds == [("0.png", "result"), ("1.png", "result"), ("bad.png", "failure")]


def test_rec_questions_come_from_the_item(scripted):
    labeler = Labeler(scripted, ["rec"])
    item = ImageItem(0, None, "a.png", 1, [("q1", "the person"), ("q2", "the dog")])
    work = Work(item, Image.new("RGB", (100, 100)), "h", labeler.keys("h", item), ["rec"])
    (record,) = labeler.label([work])
    items = record["result"]["items"]
    assert [(i["question_id"], i["expression"]) for i in items] == [("q1", "the person"),
                                                                     ("q2", "the dog")]
    assert items[0]["boxes"] == [[10.0, 10.0, 40.0, 90.0]]


# -- held images ---------------------------------------------------------------------------------
def big_image(tmp_path, size=(3000, 2000), name="big.png"):
    "A PNG with some structure (a gradient and a rectangle), and its item."
    w, h = size
    array = np.zeros((h, w, 3), np.uint8)
    array[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
    array[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    array[h // 4: h // 2, w // 3: w // 2] = 255
    path = tmp_path / name
    Image.fromarray(array).save(path)
    return Image.fromarray(array), ImageItem(0, path, name, 1)


def test_held_image_is_bounded_and_coordinates_stay_original(scripted, tmp_path):
    from sphinx_tools.pipelines.autolabel.run import load_work

    full, item = big_image(tmp_path)
    labeler = Labeler(scripted, ["detection", "pose"])
    work = load_work(item, labeler, set())
    assert work.wh == (3000, 2000) and max(work.image.size) == 2 * labeler.input_side
    assert work.image.size == (896, 597) and work.sam_image is None
    held = labeler.label([work])
    # the same labels as from the full image
    whole = Work(item, full, work.hash, work.keys, list(work.pending))
    assert [r["result"] for r in held] == [r["result"] for r in labeler.label([whole])]
    assert all(r["wh"] == [3000, 2000] for r in held)
    boxes = by_task(held)[(1, "detection")]["boxes"]
    np.testing.assert_allclose(boxes[0], [300, 0, 1200, 2000], atol=0.5)  # pixels of 3000x2000


def test_model_with_preprocess_gets_its_tensor(tiny_model, tmp_path):
    from sphinx_tools.pipelines.autolabel.run import load_work

    full, item = big_image(tmp_path, (1200, 700))
    labeler = Labeler(tiny_model, ["caption"])
    work = load_work(item, labeler, set())
    s = tiny_model.cfg.image_size
    assert tuple(work.image.shape) == (3, s, s) and work.wh == (1200, 700)
    assert np.array_equal(work.image.numpy(), tiny_model.preprocess(full).numpy())


def test_sam_on_the_held_image_gives_the_masks_of_the_full_image(tmp_path):
    from segment_anything import SamPredictor
    from tiny_sam import tiny_sam

    from sphinx_tools.pipelines.autolabel.run import load_work
    from sphinx_tools.coco import decode_rle
    from sphinx_tools.pipelines.autolabel.segmenting import masks_for_boxes

    full, item = big_image(tmp_path, (300, 200))
    predictor = SamPredictor(tiny_sam())
    labeler = Labeler(ScriptedModel(), ["detection"], sam_predictor=predictor, sam_id="t")
    work = load_work(item, labeler, set())
    assert max(work.sam_image.size) == labeler.sam_side < 300
    boxes = {"detection": np.array([[10.5, 20, 200, 150], [0, 0, 300, 200], [150, 50, 160, 60]])}
    held = masks_for_boxes(predictor, work.sam_image, boxes, size=work.wh)
    predictor.reset_image()
    predictor.set_image(np.asarray(full))  # SAM as it runs on the original image
    want = []
    for box in boxes["detection"]:
        logits, scores, _ = predictor.predict(box=box, multimask_output=True, return_logits=True)
        want.append(logits[scores.argmax()])
    got = [decode_rle(r) if r is not None else np.zeros((200, 300), bool)
           for r in held["masks"]["detection"]]
    assert all(g.shape == (200, 300) for g in got)
    for g, w in zip(got, want):
        differ = g != (w > predictor.model.mask_threshold)
        # the same masks, but for a pixel whose logit sits on the threshold: the boxes are decoded
        # together there and one by one here, which rounds apart in the last bits
        assert differ.sum() <= 3
        assert np.abs(w[differ] - predictor.model.mask_threshold).max(initial=0) < 1e-4


def test_pixel_budget_bounds_the_pixels_decoded_at_once(scripted, tmp_path):
    import threading

    from sphinx_tools.pipelines.autolabel.run import PixelBudget, load_work

    budget = PixelBudget(100)
    seen, lock = [], threading.Lock()

    def decode(n):
        with budget(n):
            with lock:
                seen.append(budget.used)
            threading.Event().wait(0.01)

    threads = [threading.Thread(target=decode, args=(n,)) for n in (80, 80, 30, 500, 10, 60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 6 and max(seen) <= 100 and budget.used == 0
    with pytest.raises(ValueError, match="pixel budget must be >= 1, got 0"):
        PixelBudget(0)
    _, item = big_image(tmp_path, (400, 300))  # larger than the whole budget: decoded alone
    work = load_work(item, Labeler(scripted, ["caption"]), set(), budget=PixelBudget(1000))
    assert work.error is None and work.wh == (400, 300) and budget.used == 0


def test_continuous_batching_keeps_the_labels(tiny_model):
    # questions decoded a few rows at a time (a finished answer's row goes to the next question)
    # give the labels of all questions at once, in the same order
    calls = []
    real = tiny_model.generate_multi

    def spy(*args, **kwargs):
        calls.append(kwargs.get("max_rows"))
        return real(*args, **kwargs)

    tiny_model.generate_multi = spy
    try:
        tasks = ["detection", "ocr", "caption"]
        ims = [Image.new("RGB", (200, 100), (30 * i, 80, 200 - 30 * i)) for i in range(3)]

        def run(max_rows):
            labeler = Labeler(tiny_model, tasks, max_gen_len=12, max_rows=max_rows)
            items = [ImageItem(i, None, f"{i}.png", i + 1) for i in range(len(ims))]
            batch = [Work(it, tiny_model.preprocess(im), f"h{i}", labeler.keys(f"h{i}", it),
                          list(tasks), size=im.size) for i, (it, im) in enumerate(zip(items, ims))]
            return labeler.label(batch)

        assert run(2) == run(None)
        assert calls == [2, None]
    finally:
        del tiny_model.generate_multi
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        Labeler(tiny_model, ["caption"], max_rows=0)
