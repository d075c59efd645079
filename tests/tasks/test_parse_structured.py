"""Parse tables for pose (sv.KeyPoints), grounded captions, relations (SceneGraph), caption/vqa."""

import numpy as np
import pytest
import supervision as sv

from sphinx_tools.annotations import Entity, GroundedCaption, SceneGraph
from sphinx_tools.registry import get_task

L, P = (640, 480), (480, 640)
FULL_POSE = (
    "<p>nose</p> [0.50,0.20] <p>left eye</p> [0.52,0.18] <p>right eye</p> [0.48,0.18] "
    "<p>left ear</p> [0.54,0.19] <p>right ear</p> [0.46,0.19] <p>left shoulder</p> [0.58,0.30] "
    "<p>right shoulder</p> [0.42,0.30] <p>left elbow</p> [0.62,0.42] <p>right elbow</p> [0.38,0.42] "
    "<p>left wrist</p> [0.64,0.52] <p>right wrist</p> [0.36,0.52] <p>left hip</p> [0.55,0.55] "
    "<p>right hip</p> [0.45,0.55] <p>left knee</p> [0.56,0.70] <p>right knee</p> [0.44,0.70] "
    "<p>left ankle</p> [0.56,0.84] <p>right ankle</p> [0.44,0.84]"
)


# -- pose ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, wh, n_people, visible",
    [
        (FULL_POSE, (1000, 1000), 1, [17]),  # every point
        (
            "<p>nose</p> [0.50,0.20] <p>left_eye</p>[0.52,0.18] <p>RIGHT EYE</p>[0.48,0.18]",
            L,
            1,
            [3],
        ),  # name forms
        ("<p>nose</p> [0.50,0.40] <p>left eye</p> [0.00,0.00]", L, 1, [1]),  # [0,0] = not visible
        (
            "<p>nose</p> [0.50,0.40] <p>left eye</p> [0.50,0.05]",
            L,
            1,
            [1],
        ),  # padding band = not visible
        (
            "<p>nose</p> [0.3,0.4] <p>nose</p> [0.7,0.4] <p>left eye</p> [0.71,0.38]",
            L,
            2,
            [1, 2],
        ),  # 2 people
        (FULL_POSE + " " + FULL_POSE, (1000, 1000), 1, [17]),  # repetition loop
        ("<p>nose</p> [0.50,0.40] <p>tail</p> [0.5,0.5]", L, 1, [1]),  # unknown name ignored
        ("<p>nose</p> [0.50,0.40] <p>left eye</p> [0.5", L, 1, [1]),  # truncated
        ("[" + ";".join(["0.5,0.5"] * 17) + "]", (100, 100), 1, [17]),  # unnamed, COCO order
        ("", L, 0, []),
        ("The person is standing.", L, 0, []),
        ("<p>left eye</p> [0.00,0.00]", L, 0, []),  # nothing visible
    ],
)
def test_pose(text, wh, n_people, visible):
    kp = get_task("pose").parse(text, wh)
    assert isinstance(kp, sv.KeyPoints)
    assert kp.xy.shape == (n_people, 17, 2) and kp.visible.shape == (n_people, 17)
    assert list(kp.visible.sum(axis=1)) == visible
    assert (
        kp.keypoint_confidence is None and kp.detection_confidence is None
    )  # no logprobs: no confidence
    assert np.isfinite(kp.xy).all()
    if n_people:
        w, h = wh
        assert (kp.xy[..., 0] >= 0).all() and (kp.xy[..., 0] <= w).all()
        assert (kp.xy[..., 1] >= 0).all() and (kp.xy[..., 1] <= h).all()
        assert list(kp.data["class_name"]) == ["person"] * n_people
        assert kp.data["raw_text"][0] == text


def test_pose_coordinates_and_order():
    kp = get_task("pose").parse("<p>right ankle</p> [0.25,0.75] <p>nose</p> [0.5,0.5]", P)
    np.testing.assert_allclose(kp.xy[0, 0], [240.0, 320.0])  # nose: pad_x = 80
    np.testing.assert_allclose(kp.xy[0, 16], [80.0, 480.0])  # right ankle is index 16
    assert kp.visible[0].tolist() == [True] + [False] * 15 + [True]


def test_pose_notes_point_outside_requested_region():
    kp = get_task("pose").parse("<p>nose</p> [0.9,0.5]", L, box=(0, 100, 100, 300))
    assert "outside the requested region" in kp.data["parse_notes"][0]
    np.testing.assert_allclose(kp.data["person_box"][0], [0, 100, 100, 300])


def test_pose_confidence_from_logprobs():
    text = "<p>nose</p> [0.50,0.40]"
    offsets = list(range(len(text)))
    kp = get_task("pose").parse(text, L, logprobs=[-0.1] * len(text), offsets=offsets)
    assert kp.keypoint_confidence.shape == (1, 17)
    assert kp.keypoint_confidence[0, 0] == pytest.approx(np.exp(-0.1))
    assert (kp.keypoint_confidence[0, 1:] == 0).all()  # missing points: 0
    assert kp.detection_confidence[0] == pytest.approx(np.exp(-0.1))


# -- grounded caption ------------------------------------------------------------------------------
RAW_CAPTION = (
    "<p>Three world leaders</p> [0.04,0.47,0.39,0.84;0.35,0.41,0.67,0.84;0.62,0.45,0.94,0.84] "
    "are shown in front of <p>a building</p>[0.23,0.26,0.78,0.68] ."
)


@pytest.mark.parametrize(
    "text, caption, phrases, boxes_per_entity",
    [
        (
            RAW_CAPTION,
            "Three world leaders are shown in front of a building .",
            ["Three world leaders", "a building"],
            [3, 1],
        ),
        (
            "<p>A dog</p> chases <p>a ball</p> [0.4,0.5,0.5,0.6].",
            "A dog chases a ball.",
            ["a ball"],
            [1],
        ),  # ungrounded
        (
            "&lt;p&gt;A cat&lt;/p&gt; [0.1,0.3,0.5,0.7] sleeps.",
            "A cat sleeps.",
            ["A cat"],
            [1],
        ),  # escaped
        (
            "<p>A cat</p> [0.1,0.3,0.5,0.7] on <p>a mat</p> [0.1,0.6,0.",
            "A cat on a mat",
            ["A cat"],
            [1],
        ),  # truncated
        (
            "<p>A cat</p> [0.1,0.3,0.5,0.7] and <p>A cat</p> [0.1,0.3,0.5,0.7]",
            "A cat and A cat",
            ["A cat"],
            [1],
        ),  # loop
        ("A plain caption.", "A plain caption.", [], []),
        ("", "", [], []),
        ("<p><p></p>[]]][;", "[]]][;", [], []),  # garbled
    ],
)
def test_grounded_caption(text, caption, phrases, boxes_per_entity):
    result = get_task("grounded_caption").parse(text, L)
    assert isinstance(result, GroundedCaption)
    assert result.text == caption
    assert [e.phrase for e in result.entities] == phrases
    assert [len(e.xyxy) for e in result.entities] == boxes_per_entity
    for phrase, (start, end), _ in result.entities:
        assert result.text[start:end] == phrase
    assert len(result.detections) == sum(boxes_per_entity)
    assert result.detections.metadata["raw_text"] == text


def test_grounded_caption_boxes_in_pixels():
    result = get_task("grounded_caption").parse(RAW_CAPTION, L)
    np.testing.assert_allclose(result.entities[1].xyxy, [[147.2, 86.4, 499.2, 355.2]])
    assert list(result.detections.data["entity_index"]) == [0, 0, 0, 1]
    assert list(result.detections.data["class_name"]) == ["Three world leaders"] * 3 + [
        "a building"
    ]


def test_grounded_caption_validates_spans():
    with pytest.raises(ValueError, match="span"):
        GroundedCaption("a dog", [Entity("cat", (2, 5), np.zeros((1, 4)))])
    with pytest.raises(ValueError, match=r"\(k, 4\)"):
        GroundedCaption("a dog", [("dog", (2, 5), np.zeros((4,)))])


# -- relations -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, options, n_objects, triples",
    [
        (
            "<p>people</p> [0.1,0.3,0.2,0.6;0.3,0.3,0.4,0.6] on <p>car</p> [0.1,0.5,0.6,0.8]",
            {},
            3,
            [("people", "on", "car"), ("people", "on", "car")],
        ),
        (
            "<p>man</p>[0.1,0.3,0.4,0.8] riding <p>horse</p>[0.1,0.5,0.6,0.8]. <p>dog</p> [0.7,0.6,0.8,0.7]",
            {},
            3,
            [("man", "riding", "horse")],
        ),  # sentence break: no triple with dog
        ("[0.1,0.3,0.2,0.6]", {"expression": "people on car"}, 1, []),  # REC-like bare box
        ("[0.1,0.3,0.2,0.6]", {"subject": "man", "predicate": "on", "object": "car"}, 1, []),
        (
            "<p>cup</p> [0.1,0.3,0.2,0.6] is to the left of the <p>plate</p> [0.5,0.3,0.6,0.6]",
            {},
            2,
            [("cup", "is to the left of the", "plate")],
        ),
        (
            "<p>cup</p> [0.1,0.3,0.2,0.6] which is quite far away and not near at all from the <p>plate</p> "
            "[0.5,0.3,0.6,0.6]",
            {},
            2,
            [],
        ),  # too long to be a predicate
        ("", {}, 0, []),
        ("no relations here", {}, 0, []),
    ],
)
def test_relation(text, options, n_objects, triples):
    graph = get_task("relation").parse(text, L, **options)
    assert isinstance(graph, SceneGraph)
    assert len(graph.detections) == n_objects
    assert graph.named_triples() == triples


def test_scene_graph_validates_triples():
    detections = sv.Detections(xyxy=np.zeros((2, 4)))
    assert SceneGraph(detections, [(0, "on", 1)]).triples == [(0, "on", 1)]
    with pytest.raises(ValueError, match="refers to object 2"):
        SceneGraph(detections, [(0, "on", 2)])
    with pytest.raises(ValueError, match="subject_index, predicate, object_index"):
        SceneGraph(detections, [(0, 1)])
    with pytest.raises(ValueError, match="sv.Detections"):
        SceneGraph([[0, 0, 1, 1]], [])


# -- caption / vqa ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("A dog on a beach.", "A dog on a beach."),
        ("A dog on a beach.\n### Human:", "A dog on a beach."),
        (
            "The image features a calendar.There are two people",
            "The image features a calendar.There are two people",
        ),
        ("<p>A dog</p> [0.1,0.2,0.3,0.4] on a beach.", "A dog on a beach."),
        ("", ""),
    ],
)
def test_caption(text, expected):
    assert get_task("caption").parse(text) == expected


@pytest.mark.parametrize(
    "text, options, expected",
    [
        ("Yes.", {"normalize": True}, "yes"),
        ("No, it is not.", {"normalize": True}, "no"),
        ("Yes.", {}, "Yes."),  # normalization is opt-in
        ("Paris.", {"normalize": True}, "Paris"),
        ("B.", {"normalize": True, "choices": ["cat", "dog"]}, "B"),
        ("(A) cat", {"normalize": True, "choices": ["cat", "dog"]}, "A"),
        ("The answer is B.", {"normalize": True, "choices": ["cat", "dog"]}, "B"),
        ("dog", {"normalize": True, "choices": ["cat", "dog"]}, "B"),  # choice text
        ("E", {"normalize": True, "choices": ["cat", "dog"]}, "E"),  # no such option: no guess
        ("I am not sure.", {"normalize": True, "choices": ["cat", "dog"]}, "I am not sure"),
        ("", {"normalize": True}, ""),
    ],
)
def test_vqa(text, options, expected):
    assert get_task("vqa").parse(text, **options) == expected
