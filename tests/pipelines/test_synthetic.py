"""Synthetic data loop: prompts/classes -> tiny SD -> scripted SPHINX labels -> COCO on disk."""

import json

import numpy as np
import pytest
import supervision as sv
from pycocotools.coco import COCO

from sphinx_tools.pipelines import SphinxLabeler, SphinxSyntheticDataPipeline, build_coco
from sphinx_tools.pipelines.synthetic import class_prompt

SD = {"num_inference_steps": 2, "height": 32, "width": 32}


def test_class_prompt_article():
    assert (
        class_prompt("dog") == "a photo of a dog" and class_prompt("apple") == "a photo of an apple"
    )


def test_classes_to_coco_with_provenance(fake_model, sd_pipeline, tmp_path):
    fake_model.enqueue("<p>dog</p> [0.10,0.10,0.50,0.60]")
    fake_model.enqueue("<p>dog</p> [0.00,0.00,0.40,0.40;0.50,0.50,0.90,0.90]")
    fake_model.enqueue("Nothing here.")
    fake_model.enqueue("<p>cat</p> [0.20,0.20,0.80,0.80] <p>ball</p> [0.60,0.70,0.70,0.80]")
    pipe = SphinxSyntheticDataPipeline(fake_model, sd_pipeline)
    out = pipe(classes=["dog", "cat"], out_dir=tmp_path, images_per_prompt=2, seed=10, **SD)
    coco = COCO(str(out.coco_path))  # reads back with pycocotools
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["dog", "cat", "ball"]
    images = coco.loadImgs(coco.getImgIds())
    assert [i["seed"] for i in images] == [10, 11, 12, 13]
    assert [i["prompt"].startswith("a photo of a dog") for i in images] == [
        True,
        True,
        False,
        False,
    ]
    assert all(
        i["model"] == "StableDiffusionPipeline" and i["labeler"] == "sphinx-tools detection"
        for i in images
    )
    assert all(
        (tmp_path / i["file_name"]).is_file() and (i["width"], i["height"]) == (32, 32)
        for i in images
    )
    assert [len(coco.getAnnIds(imgIds=i["id"])) for i in images] == [1, 2, 0, 2]
    ann_ids = [a["id"] for a in coco.dataset["annotations"]]
    assert ann_ids == list(range(1, 6))
    first = coco.loadAnns(1)[0]
    assert (
        first["bbox"] == [3.2, 3.2, 12.8, 16.0] and first["iscrowd"] == 0 and first["area"] == 204.8
    )
    assert "Detect all dogs and cats" in fake_model.calls[0][0][0]  # the labeler asks the classes


def test_same_seed_same_dataset(fake_model, sd_pipeline, tmp_path):
    pipe = SphinxSyntheticDataPipeline(fake_model, sd_pipeline)
    outs = []
    for run in ("a", "b"):
        fake_model.enqueue("<p>boat</p> [0.10,0.10,0.50,0.60]")
        outs.append(pipe(["a boat on a lake"], out_dir=tmp_path / run, seed=3, **SD))
    assert outs[0].image_paths[0].read_bytes() == outs[1].image_paths[0].read_bytes()
    a, b = (json.loads(o.coco_path.read_text()) for o in outs)
    assert a["images"] == b["images"] and a["annotations"] == b["annotations"]
    assert a["images"][0]["prompt"] == "a boat on a lake"


def test_pluggable_labeler_with_masks(fake_model, sd_pipeline, tmp_path):
    def labeler(image):
        mask = np.zeros((1, image.height, image.width), bool)
        mask[0, 4:10, 2:8] = True
        return sv.Detections(
            xyxy=np.array([[2.0, 4, 8, 10]]),
            mask=mask,
            confidence=np.array([0.75]),
            data={"class_name": ["kite"]},
        )

    labeler.name = "my-labeler"
    out = SphinxSyntheticDataPipeline(fake_model, sd_pipeline, labeler=labeler)(
        ["a kite"], out_dir=tmp_path, **SD
    )
    coco = COCO(str(out.coco_path))
    (ann,) = coco.dataset["annotations"]
    assert ann["area"] == 36 and ann["score"] == 0.75
    assert coco.annToMask(ann).sum() == 36  # RLE round trip
    assert coco.dataset["images"][0]["labeler"] == "my-labeler" and fake_model.calls == []


def test_build_coco_names_without_classes():
    d = sv.Detections(
        xyxy=np.array([[0.0, 0, 2, 2], [1, 1, 3, 3]]), data={"class_name": ["b", "a"]}
    )
    coco = build_coco([{"id": 1, "file_name": "x.png", "width": 4, "height": 4}], [d])
    assert [c["name"] for c in coco["categories"]] == ["b", "a"]
    assert [a["category_id"] for a in coco["annotations"]] == [1, 2]
    assert "score" not in coco["annotations"][0]


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (["a dog"], {"classes": ["dog"]}, "either `prompts` or `classes`"),
        ([], {}, "`prompts` must be a non-empty list"),
        ("a dog", {}, "`prompts` must be a non-empty list"),
        (None, {"classes": ["dog", " "]}, "`classes` must be a non-empty list"),
        (["a dog"], {"images_per_prompt": 0}, "images_per_prompt"),
        (["a dog"], {"out_dir": None}, "`out_dir` is required"),
        (["a dog"], {"task": "caption"}, "`task` must be one of"),
    ],
)
def test_bad_arguments(fake_model, sd_pipeline, tmp_path, args, kwargs, match):
    kwargs = {"out_dir": tmp_path, **kwargs}
    with pytest.raises(ValueError, match=match):
        SphinxSyntheticDataPipeline(fake_model, sd_pipeline)(args, **kwargs, **SD)
    assert not (tmp_path / "images").exists()


def test_labeler_task_check():
    with pytest.raises(ValueError, match="'pose'"):
        SphinxLabeler(object(), task="pose")
