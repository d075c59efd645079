"""run_task end to end with a scripted fake model: prompt building, generate kwargs, parsing."""

import math

import numpy as np
import pytest
import supervision as sv
from PIL import Image

from sphinx_tools.annotations import SceneGraph
from sphinx_tools.conversation import build_prompt
from sphinx_tools.errors import SphinxToolsError, UnknownTaskError
from sphinx_tools.registry import get_task
from sphinx_tools.run import run_task
from sphinx_tools.tasks import image_size_of


@pytest.fixture
def landscape():
    return Image.new("RGB", (640, 480))


def test_rec_end_to_end(fake_model, landscape):
    fake_model.enqueue("[0.04,0.47,0.40,0.83]")
    d = run_task(fake_model, landscape, "rec", expression="Trump")
    np.testing.assert_allclose(d.xyxy, [[25.6, 220.8, 256.0, 451.2]])
    assert list(d.data["class_name"]) == ["Trump"]
    ((prompts, images, kwargs),) = fake_model.calls
    assert prompts == [
        build_prompt(
            [
                [
                    "Please provide the bounding box coordinate of the region this sentence describes: Trump.",
                    None,
                ]
            ]
        )
    ]
    assert images == [landscape]
    # greedy unless the caller asks otherwise, like generate, ask, label and the web demo
    assert kwargs == {"max_gen_len": get_task("rec").max_gen_len, "temperature": 0.0, "top_p": 0.95}


def test_sampling_pass_through_and_overrides(fake_model, landscape):
    fake_model.enqueue("A dog.")
    run_task(
        fake_model,
        landscape,
        get_task("caption"),
        max_gen_len=7,
        temperature=0.0,
        sampling={"top_p": 0.5, "seed": 3},
    )
    assert fake_model.calls[0][2] == {"max_gen_len": 7, "temperature": 0.0, "top_p": 0.5, "seed": 3}


def test_confidence_from_generation_logprobs(fake_model, landscape):
    text = "<p>dog</p> [0.10,0.20,0.30,0.40]"
    offsets = list(range(len(text)))
    logprobs = [-0.2] * len(text)
    fake_model.enqueue(text, logprobs=logprobs, offsets=offsets)
    d = run_task(fake_model, landscape, "detection")
    assert d.confidence[0] == pytest.approx(math.exp(-0.2))


def test_no_logprobs_no_confidence(fake_model, landscape):
    fake_model.enqueue("<p>dog</p> [0.10,0.20,0.30,0.40]")
    assert run_task(fake_model, landscape, "detection").confidence is None


def test_pose_asks_once_per_person_box_in_one_batch(fake_model, landscape):
    fake_model.enqueue("<p>nose</p> [0.10,0.40] <p>left eye</p> [0.11,0.39]")
    fake_model.enqueue("<p>nose</p> [0.60,0.40]")
    kp = run_task(fake_model, landscape, "pose", boxes=[(0, 100, 200, 400), (300, 100, 500, 400)])
    assert isinstance(kp, sv.KeyPoints) and len(kp) == 2
    np.testing.assert_allclose(kp.xy[:, 0], [[64.0, 176.0], [384.0, 176.0]])
    assert kp.visible.sum(axis=1).tolist() == [2, 1]
    np.testing.assert_allclose(kp.data["person_box"], [[0, 100, 200, 400], [300, 100, 500, 400]])
    ((prompts, images, _),) = fake_model.calls  # one generate call with two rows
    assert len(prompts) == 2 and len(images) == 2
    assert "[0.00,0.28,0.31,0.75]" in prompts[0] and "[0.47,0.28,0.78,0.75]" in prompts[1]


def test_pose_skips_people_without_points(fake_model, landscape):
    fake_model.enqueue("<p>nose</p> [0.10,0.40]")
    fake_model.enqueue("I cannot see a person there.")
    kp = run_task(fake_model, landscape, "pose", boxes=[(0, 100, 200, 400), (300, 100, 500, 400)])
    assert len(kp) == 1


def test_reg_several_regions(fake_model, landscape):
    fake_model.enqueue("a man")
    fake_model.enqueue("a woman\n### Human:")
    d = run_task(fake_model, landscape, "reg", regions=[(0, 0, 100, 100), (100, 100, 300, 300)])
    assert list(d.data["caption"]) == ["a man", "a woman"]
    np.testing.assert_allclose(d.xyxy, [[0, 0, 100, 100], [100, 100, 300, 300]])
    assert d.metadata["raw_text"] == ["a man", "a woman\n### Human:"]


def test_relation_and_grounded_caption(fake_model, landscape):
    fake_model.enqueue("<p>man</p> [0.1,0.3,0.4,0.8] riding <p>horse</p> [0.1,0.5,0.6,0.8]")
    graph = run_task(fake_model, landscape, "relation", expression="man riding horse")
    assert isinstance(graph, SceneGraph) and graph.named_triples() == [("man", "riding", "horse")]
    fake_model.enqueue("<p>A horse</p> [0.1,0.5,0.6,0.8] in a field.")
    caption = run_task(fake_model, landscape, "grounded_caption")
    assert caption.text == "A horse in a field."


def test_vqa_with_normalization(fake_model):
    fake_model.enqueue("Yes.")
    image = np.zeros((480, 640, 3), dtype=np.uint8)  # HWC array
    assert run_task(fake_model, image, "vqa", question="Is it dark?", normalize=True) == "yes"


def test_junk_answer_gives_empty_result(fake_model, landscape):
    fake_model.enqueue("\x00\x01 ]]][[ <p>")
    d = run_task(fake_model, landscape, "rec", expression="x")
    assert len(d) == 0 and d.metadata["raw_text"] == "\x00\x01 ]]][[ <p>"


def test_bad_options_fail_before_generation(fake_model, landscape):
    with pytest.raises(ValueError, match="unknown option 'expresion'"):
        run_task(fake_model, landscape, "rec", expresion="x")
    with pytest.raises(UnknownTaskError):
        run_task(fake_model, landscape, "nope")
    assert fake_model.calls == []


def test_model_returning_wrong_number_of_answers(landscape):
    class Short:
        def generate(self, prompts, images, **kwargs):
            return []

    with pytest.raises(SphinxToolsError, match="0 answers for 1 prompts"):
        run_task(Short(), landscape, "caption")


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("RGB", (640, 480)), (640, 480)),
        (np.zeros((480, 640, 3)), (640, 480)),
        (np.zeros((10, 20)), (20, 10)),
    ],
)
def test_image_size_of(image, expected):
    assert image_size_of(image) == expected


def test_image_size_of_rejects_unknown():
    with pytest.raises(ValueError, match="cannot tell the size"):
        image_size_of(object())


def test_detect_then_pose_with_detection_boxes(fake_model, landscape):
    "The usual chain: person boxes from detection (an (n, 4) array) feed the per-person pose questions."
    fake_model.enqueue("<p>2 people</p> [0.00,0.28,0.31,0.75;0.47,0.28,0.78,0.75]")
    people = run_task(fake_model, landscape, "detection", classes=["person"])
    fake_model.enqueue("<p>nose</p> [0.10,0.40]")
    fake_model.enqueue("<p>nose</p> [0.60,0.40]")
    kp = run_task(fake_model, landscape, "pose", boxes=people.xyxy)
    assert len(kp) == 2
    np.testing.assert_allclose(kp.data["person_box"], people.xyxy)
    assert "[0.00,0.28,0.31,0.75]" in fake_model.calls[1][0][0]


@pytest.mark.parametrize("task, key", [("pose", "boxes"), ("reg", "regions")])
def test_no_regions_means_no_question(fake_model, landscape, task, key):
    result = run_task(fake_model, landscape, task, **{key: np.empty((0, 4))})
    assert len(result) == 0 and fake_model.calls == []


def test_generation_that_hit_max_gen_len_is_flagged(fake_model, landscape):
    fake_model.enqueue("<p>dog</p> [0.10,0.20,0.30,0.40] <p>cat</p> [0.5,0.5,0.6,0.6] <p>do")
    fake_model.queue[-1].finish_reason = "length"
    d = run_task(fake_model, landscape, "detection")
    assert len(d) == 2 and d.metadata["truncated"] is True
    assert "generation stopped at max_gen_len" in d.metadata["parse_notes"]


def test_run_task_refuses_an_oversized_list_before_asking_anything(fake_model, landscape):
    boxes = [(0, 0, 10, 10)] * 5000  # would be 5000 questions
    with pytest.raises(ValueError, match="option 'boxes' has 5,000 items"):
        run_task(fake_model, landscape, "pose", boxes=boxes)
    with pytest.raises(ValueError, match="format spec"):
        run_task(fake_model, landscape, "detection", template="{classes:>50000000}")
    assert fake_model.calls == []
