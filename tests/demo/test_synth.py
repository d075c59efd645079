"""The synthetic scene generator: determinism, exact ground truth, answers the built-in parsers read."""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("SPHINX_TOOLS_LOAD_PLUGINS", "none")  # only the built-in tasks

from sphinx_tools.demo import synth  # noqa: E402
from sphinx_tools.registry import get_task  # noqa: E402

SEEDS = range(12)
SCENES = [(kind, seed) for kind in synth.KINDS for seed in SEEDS]


@pytest.fixture(autouse=True)
def _no_user_prompts(tmp_path, monkeypatch):
    monkeypatch.setenv("SPHINX_TOOLS_CONFIG", str(tmp_path / "prompts.yaml"))


def tolerance(scene):
    "2-decimal quantization of the padded square side, plus a pixel."
    return 0.005 * max(scene.size) + 1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    counts = synth.write_dataset(out, 16, seed=5, progress=False)
    return out, counts


# -- determinism -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", synth.KINDS)
def test_same_seed_same_bytes(kind):
    a, b = synth.generate_scene(kind, 7), synth.generate_scene(kind, 7)
    assert a.image.tobytes() == b.image.tobytes()
    assert [(o.category, o.xyxy, o.area, o.text, o.color) for o in a.objects] == \
           [(o.category, o.xyxy, o.area, o.text, o.color) for o in b.objects]
    assert synth.make_conversations(a) == synth.make_conversations(b)


@pytest.mark.parametrize("kind", synth.KINDS)
def test_different_seeds_differ(kind):
    images = {synth.generate_scene(kind, s).image.tobytes() for s in range(4)}
    assert len(images) == 4


def test_write_dataset_is_byte_identical(tmp_path):
    synth.write_dataset(tmp_path / "a", 8, seed=3, progress=False)
    synth.write_dataset(tmp_path / "b", 8, seed=3, progress=False)
    synth.write_dataset(tmp_path / "c", 8, seed=4, progress=False)
    for name in ["conversations.json", "coco.json", "rec.json"] + [f"images/{i:06d}.png" for i in range(8)]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a/images/000000.png").read_bytes() != (tmp_path / "c/images/000000.png").read_bytes()


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown scene kind"):
        synth.generate_scene("clouds", 0)


# -- geometry --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,seed", SCENES)
def test_boxes_inside_image_and_on_ink(kind, seed):
    scene = synth.generate_scene(kind, seed)
    w, h = scene.size
    assert w != h and 160 <= min(w, h) and max(w, h) <= 320
    assert scene.objects
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.xyxy
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert 0 < obj.area <= (x2 - x1) * (y2 - y1)


def test_both_orientations():
    sizes = [synth.generate_scene(kind, s).size for kind in synth.KINDS for s in SEEDS]
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    assert len(set(sizes)) > 20


@pytest.mark.parametrize("seed", SEEDS)
def test_keypoints_match_drawn_figures(seed):
    scene = synth.generate_scene("pose", seed)
    pixels = np.asarray(scene.image)
    background = pixels[0, 0].astype(int)
    for person in scene.objects:
        kp = person.keypoints
        assert kp.shape == (17, 3) and (kp[:, 2] == 2).all()
        x1, y1, x2, y2 = person.xyxy
        assert ((kp[:, 0] > x1) & (kp[:, 0] < x2) & (kp[:, 1] > y1) & (kp[:, 1] < y2)).all()
        ink = pixels[int(kp[5, 1]), int(kp[5, 0])].astype(int)
        for x, y, _ in kp:  # a dot of the figure's colour on every key point
            assert np.abs(pixels[int(y), int(x)].astype(int) - ink).max() <= 2
        assert np.abs(ink - background).max() > 60
        names = synth.KEYPOINT_NAMES
        left, right = kp[[names.index(f"left {p}") for p in ("eye", "ear", "shoulder", "hip")]], \
            kp[[names.index(f"right {p}") for p in ("eye", "ear", "shoulder", "hip")]]
        assert (left[:, 0] > right[:, 0]).all()  # front-facing: the person's left is image right
        assert kp[0, 1] < kp[5, 1] < kp[11, 1] < kp[13, 1] < kp[15, 1]  # nose, shoulder, hip, knee, ankle


@pytest.mark.parametrize("seed", SEEDS)
def test_relations_hold(seed):
    scene = synth.generate_scene("shapes", seed)
    for s, predicate, o in scene.relations:
        a, b = scene.objects[s].xyxy, scene.objects[o].xyxy
        check = {"to the left of": a[2] <= b[0], "to the right of": b[2] <= a[0],
                 "above": a[3] <= b[1], "below": b[3] <= a[1]}
        assert check[predicate]


def test_referring_expressions_are_unique():
    for seed in range(40):
        scene = synth.generate_scene("shapes", seed)
        expressions = [o.expression for o in scene.objects]
        assert len(set(expressions)) == len(expressions)


# -- answers parse back to the ground truth --------------------------------------------------------
def parse(scene, qa):
    options = {k: v for k, v in qa.options.items() if k != "image_size"}
    return get_task(qa.task).parse(qa.answer, image_size=scene.size, **options)


def assert_boxes(scene, xyxy, targets):
    expected = np.array([scene.objects[i].xyxy for i in targets]).reshape(-1, 4)
    assert np.asarray(xyxy).shape == expected.shape
    if len(expected):
        assert np.abs(np.asarray(xyxy) - expected).max() <= tolerance(scene)


def check_answer(scene, qa):
    result = parse(scene, qa)
    objs = scene.objects
    if qa.task in ("caption", "vqa"):
        assert result == qa.answer
    elif qa.task == "rec":
        assert_boxes(scene, result.xyxy, qa.targets)
    elif qa.task == "reg":
        assert list(result.data["caption"]) == [objs[qa.targets[0]].expression]
        assert_boxes(scene, result.xyxy, qa.targets)
    elif qa.task == "detection":
        assert_boxes(scene, result.xyxy, qa.targets)
        assert list(result.data["class_name"]) == [objs[i].category for i in qa.targets]
    elif qa.task == "layout":
        assert_boxes(scene, result.xyxy, qa.targets)
        assert list(result.data["class_name"]) == [objs[i].category for i in qa.targets]
    elif qa.task == "ocr" and qa.options.get("variant") == "read":
        assert list(result.data["text"]) == [" ".join(o.text for o in objs)]
    elif qa.task == "ocr":
        assert_boxes(scene, result.xyxy, qa.targets)
        assert list(result.data["text"]) == [objs[i].text for i in qa.targets]
    elif qa.task == "grounded_caption":
        assert_boxes(scene, result.detections.xyxy, qa.targets)
        assert result.text.endswith(f"on a {scene.background} background.")
        assert all(result.text[a:b] == p for p, (a, b), _ in result.entities)
    elif qa.task == "relation":
        assert_boxes(scene, result.detections.xyxy, qa.targets)
        pairs = list(zip(qa.targets[::2], qa.targets[1::2]))
        expected = [(objs[s].expression, p, objs[o].expression)
                    for s, p, o in scene.relations if (s, o) in pairs]
        assert sorted(result.named_triples()) == sorted(expected)
    elif qa.task == "pose":
        (i,) = qa.targets
        assert result.xy.shape == (1, 17, 2) and result.visible.all()
        assert np.abs(result.xy[0] - objs[i].keypoints[:, :2]).max() <= tolerance(scene)
    else:
        raise AssertionError(f"no check for task {qa.task!r}")


@pytest.mark.parametrize("kind,seed", SCENES)
def test_answers_parse_back_to_ground_truth(kind, seed):
    scene = synth.generate_scene(kind, seed)
    qas = synth.scene_qas(scene)
    assert qas
    for qa in qas:
        check_answer(scene, qa)


@pytest.mark.parametrize("kind,seed", [(k, s) for k in synth.CLASS_LIST_KINDS for s in SEEDS])
def test_class_list_questions_ask_as_a_labeling_job_with_a_category_file(kind, seed):
    from pipelines.autolabel.ontology import Ontology

    scene = synth.generate_scene(kind, seed)
    plain, listed = synth.scene_qas(scene), synth.scene_qas(scene, class_lists=True)
    assert listed[:len(plain)] == plain  # the other questions do not change
    extra = listed[len(plain):]
    assert extra and all(qa.task == "detection" for qa in extra)
    # the first names every category of a synthetic dataset's coco.json, as `label --categories` does
    classes = Ontology.from_categories(synth.CATEGORIES).prompt_classes()
    assert extra[0].question == get_task("detection").prompt(classes=classes)
    assert sorted(extra[0].targets) == list(range(len(scene.objects)))
    for qa in extra:
        check_answer(scene, qa)
        asked = qa.options["classes"]
        shown = [scene.objects[i].category for i in qa.targets]
        assert shown == sorted(shown, key=asked.index)  # in the order asked


def test_some_class_lists_name_absent_classes_in_a_random_order():
    subsets = [qa.options["classes"] for seed in range(40)
               for qa in synth.scene_qas(synth.generate_scene("shapes", seed), class_lists=True)[-1:]
               if len(qa.options["classes"]) < len(synth.CATEGORIES)]
    assert 10 < len(subsets) < 30  # half of the scenes
    assert any(s != sorted(s, key=synth.CATEGORY_NAMES.index) for s in subsets)


def test_class_lists_only_for_the_kinds_a_labeling_job_detects():
    for kind in set(synth.KINDS) - set(synth.CLASS_LIST_KINDS):
        scene = synth.generate_scene(kind, 2)
        assert synth.scene_qas(scene, class_lists=True) == synth.scene_qas(scene)


def test_write_dataset_class_lists(tmp_path):
    plain = synth.write_dataset(tmp_path / "a", 4, seed=3, kinds=("shapes",), turns=32, progress=False)
    listed = synth.write_dataset(tmp_path / "b", 4, seed=3, kinds=("shapes",), turns=32, progress=False,
                                 class_lists=True)
    a = json.loads((tmp_path / "a/conversations.json").read_text())
    b = json.loads((tmp_path / "b/conversations.json").read_text())
    assert plain["conversations"] == listed["conversations"] == 4
    assert all(len(y["tasks"]) > len(x["tasks"]) for x, y in zip(a, b))
    assert (tmp_path / "a/coco.json").read_bytes() == (tmp_path / "b/coco.json").read_bytes()


def test_every_builtin_task_is_covered():
    scenes = [synth.generate_scene(kind, seed) for kind in synth.KINDS for seed in SEEDS]
    tasks = {qa.task for scene in scenes for qa in synth.scene_qas(scene)}
    assert tasks == {"rec", "reg", "detection", "grounded_caption", "relation", "caption", "vqa", "ocr",
                     "pose", "layout"}


def test_questions_are_the_plugins_default_prompts():
    scene = synth.generate_scene("pose", 1)
    qa = next(q for q in synth.scene_qas(scene) if q.task == "pose")
    assert qa.question == get_task("pose").prompt(box=scene.objects[0].xyxy, image_size=scene.size)
    scene = synth.generate_scene("shapes", 1)
    for qa in synth.scene_qas(scene):
        assert qa.question == get_task(qa.task).prompt(**qa.options)


# -- dataset files ---------------------------------------------------------------------------------
def test_conversation_records(dataset):
    out, counts = dataset
    records = json.loads((out / "conversations.json").read_text())
    assert len(records) == counts["conversations"]
    for record in records:
        assert (out / record["image"]).is_file()
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * len(record["tasks"])
        assert all(isinstance(t["value"], str) and t["value"] for t in turns)
    scene = synth.generate_scene("shapes", 0)
    multi = synth.make_conversations(scene, "x.png", turns=4)
    assert len(multi[0]["conversations"]) == 8 and multi[0]["image"] == "x.png"


def test_coco_loads_in_pycocotools_and_supervision(dataset):
    from pycocotools.coco import COCO
    import supervision as sv

    out, counts = dataset
    coco = COCO(str(out / "coco.json"))
    assert len(coco.getImgIds()) == counts["images"] == 16
    assert len(coco.getAnnIds()) == counts["annotations"]
    person = coco.loadCats(coco.getCatIds(catNms=["person"]))[0]
    assert len(person["keypoints"]) == 17 and len(person["skeleton"]) == 19
    for ann in coco.loadAnns(coco.getAnnIds(catIds=[person["id"]])):
        assert len(ann["keypoints"]) == 51 and ann["num_keypoints"] == 17
    words = coco.loadAnns(coco.getAnnIds(catIds=coco.getCatIds(catNms=["word"])))
    assert words and all(a["text"] for a in words)
    assert coco.getAnnIds(catIds=coco.getCatIds(catNms=["table", "figure", "text", "title", "list"]))
    for image in coco.loadImgs(coco.getImgIds()):
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])):
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"]
    raw = json.loads((out / "coco.json").read_text())
    assert raw["relations"]
    for rel in raw["relations"]:
        subject, obj = coco.loadAnns([rel["subject_id"], rel["object_id"]])
        assert subject["image_id"] == obj["image_id"] == rel["image_id"] and subject["id"] != obj["id"]
        assert rel["predicate"] in ("to the left of", "to the right of", "above", "below")
    ds = sv.DetectionDataset.from_coco(images_directory_path=str(out / "images"),
                                       annotations_path=str(out / "coco.json"))
    assert len(ds) == 16
    assert sum(len(d) for _, _, d in ds) == counts["annotations"]
    assert "person" in ds.classes and "circle" in ds.classes


def test_rec_file(dataset):
    out, counts = dataset
    items = json.loads((out / "rec.json").read_text())
    assert len(items) == counts["rec"] > 0
    from PIL import Image

    for item in items:
        w, h = Image.open(out / item["image"]).size
        assert (item["width"], item["height"]) == (w, h)
        assert item["question_id"].endswith(f"height{h}_width{w}")
        x1, y1, x2, y2 = item["answer"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and item["question"].startswith("the ")


def test_cli(tmp_path):
    from click.testing import CliRunner

    result = CliRunner().invoke(synth.synth_command, [str(tmp_path / "d"), "--n", "3", "--seed", "1",
                                                      "--kinds", "pose,words"])
    assert result.exit_code == 0, result.output
    coco = json.loads((tmp_path / "d/coco.json").read_text())
    assert [i["kind"] for i in coco["images"]] == ["pose", "words", "pose"]
    bad = CliRunner().invoke(synth.synth_command, [str(tmp_path / "e"), "--kinds", "clouds"])
    assert bad.exit_code != 0 and "unknown kind" in bad.output
    listed = CliRunner().invoke(synth.synth_command, [str(tmp_path / "f"), "--n", "1", "--kinds", "pose",
                                                      "--class-lists"])
    assert listed.exit_code == 0, listed.output
    records = json.loads((tmp_path / "f/conversations.json").read_text())
    assert any(len(o.get("classes") or []) == len(synth.CATEGORIES) for r in records for o in r["options"])
