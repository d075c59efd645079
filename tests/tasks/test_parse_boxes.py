"""Parse tables for the box tasks: rec, detection, ocr, layout, reg (sv.Detections results).

Cases are ``(text, image_wh, options, expected_xyxy, expected_names)`` with a trailing label, as in
supervision's ``test_vlm.py``. 640x480 is landscape (S=640, pad_y=80), 480x640 portrait (pad_x=80).
"""

import numpy as np
import pytest
import supervision as sv

from sphinx_tools.registry import get_task

L, P = (640, 480), (480, 640)
EMPTY = np.empty((0, 4))


def check(detections, xyxy, names=None, field="class_name"):
    assert isinstance(detections, sv.Detections)
    np.testing.assert_allclose(
        detections.xyxy, np.asarray(xyxy, dtype=float).reshape(-1, 4), atol=1e-6
    )
    if names is not None:
        assert list(detections.data[field]) == list(names)
    # invariants every result keeps
    assert np.isfinite(detections.xyxy).all()
    assert len(detections.data["parse_notes"]) == len(detections)
    assert "raw_text" in detections.metadata


@pytest.mark.parametrize(
    "text, wh, options, xyxy, names",
    [
        (
            "[0.04,0.47,0.40,0.83]",
            L,
            {"expression": "Trump"},
            [25.6, 220.8, 256.0, 451.2],
            ["Trump"],
        ),  # real
        (
            "[0.04,0.47,0.40,0.83]",
            P,
            {"expression": "x"},
            [0.0, 300.8, 176.0, 531.2],
            ["x"],
        ),  # portrait, clipped x1
        (
            "[0.04, 0.47, 0.40, 0.83]",
            L,
            {},
            [25.6, 220.8, 256.0, 451.2],
            [""],
        ),  # spaces, no expression
        (
            "[0.04,0.47,0.40,0.83]\n###",
            L,
            {},
            [25.6, 220.8, 256.0, 451.2],
            None,
        ),  # raw with end signal
        (
            "The box is [0.04,0.47,0.40,0.83].",
            L,
            {},
            [25.6, 220.8, 256.0, 451.2],
            None,
        ),  # prose around
        (
            "<p>Biden</p> [0.61,0.45,0.95,0.83]",
            L,
            {},
            [390.4, 208.0, 608.0, 451.2],
            ["Biden"],
        ),  # tagged
        (
            "[0.04,0.47,0.40,0.83;0.61,0.45,0.95,0.83]",
            L,
            {},
            [25.6, 220.8, 256.0, 451.2],
            None,
        ),  # first only
        (
            "[04,47,40,83]",
            L,
            {},
            [25.6, 220.8, 256.0, 451.2],
            None,
        ),  # lost decimal points, recovered
        ("", L, {}, EMPTY, []),  # empty
        ("I cannot see that in the image.", L, {}, EMPTY, []),  # prose, no bracket (I92)
        ("[0.04,0.47,0.4", L, {}, EMPTY, []),  # truncated
        ("[x1, y1, x2, y2]", L, {}, EMPTY, []),  # placeholder
        ("[0.1,0.01,0.5,0.1]", L, {}, EMPTY, []),  # wholly in the padding band
        ("[0.5,0.5,0.5,0.5]", L, {}, EMPTY, []),  # degenerate
        ("[[[[;;;,,,]]]]", L, {}, EMPTY, []),  # garbled
    ],
)
def test_rec(text, wh, options, xyxy, names):
    check(get_task("rec").parse(text, wh, **options), xyxy, names)


def test_rec_all_boxes_and_notes():
    text = "[0.04,0.47,0.40,0.83;0.61,0.45,0.95,0.83]"
    one = get_task("rec").parse(text, L, expression="person")
    assert any("kept the first" in n for n in one.metadata["parse_notes"])
    both = get_task("rec").parse(text, L, expression="person", all_boxes=True)
    assert len(both) == 2 and list(both.data["class_name"]) == ["person", "person"]


def test_rec_lost_decimal_points_are_a_flagged_recovery():
    detections = get_task("rec").parse("[4,47,40,83]", L)
    assert len(detections) == 0  # 0.4..0.4 is degenerate
    detections = get_task("rec").parse("[04,47,40,83]", L)  # "04" -> 0.04
    np.testing.assert_allclose(detections.xyxy, [[25.6, 220.8, 256.0, 451.2]])
    assert "decimal point restored" in detections.data["parse_notes"][0]
    assert len(get_task("rec").parse("[04,47,40,83]", L, recover_decimals=False)) == 0


def test_rec_truncation_is_flagged():
    detections = get_task("rec").parse("[0.04,0.47,0.4", L)
    assert detections.metadata["truncated"] is True


@pytest.mark.parametrize(
    "text, wh, options, xyxy, names",
    [
        (
            "<p>people</p> [0.04,0.47,0.39,0.84;0.35,0.41,0.67,0.84;0.62,0.45,0.94,0.84]",
            L,
            {"classes": ["person"]},
            [
                [25.6, 220.8, 249.6, 457.6],
                [224.0, 182.4, 428.8, 457.6],
                [396.8, 208.0, 601.6, 457.6],
            ],
            ["person"] * 3,
        ),  # ; groups, demo shape
        (
            "There are <p>2 dogs</p>[0.1,0.2,0.3,0.4;0.5,0.5,0.6,0.6] and <p>a cat</p> [0.2,0.2,0.3,0.3] in the image.",
            (100, 100),
            {},
            [[10, 20, 30, 40], [50, 50, 60, 60], [20, 20, 30, 30]],
            ["dog", "dog", "cat"],
        ),  # prose
        (
            "<p>car</p> [0.1,0.2,0.3,0.4] <p>car</p> [0.1,0.2,0.3,0.4] <p>car</p> [0.1,0.2,0.3,0.4]",
            (100, 100),
            {},
            [[10, 20, 30, 40]],
            ["car"],
        ),  # repetition loop
        (
            "[0.1,0.2,0.3,0.4]",
            (100, 100),
            {"classes": ["bus"]},
            [[10, 20, 30, 40]],
            ["bus"],
        ),  # bare box, one class
        (
            "[0.1,0.2,0.3,0.4]",
            (100, 100),
            {},
            [[10, 20, 30, 40]],
            ["object"],
        ),  # bare box, all objects
        (
            "<p>person</p> [0.1,0.2,0.3,0.4;0.5,0.6",
            (100, 100),
            {},
            [[10, 20, 30, 40]],
            ["person"],
        ),  # truncated
        (
            "&lt;p&gt;dog&lt;/p&gt; [0.1,0.2,0.3,0.4]",
            (100, 100),
            {},
            [[10, 20, 30, 40]],
            ["dog"],
        ),  # escaped
        (
            "<p>dog</p> [0.3,0.4,0.1,0.2]",
            (100, 100),
            {},
            [[10, 20, 30, 40]],
            ["dog"],
        ),  # inverted corners
        ("<p>dog</p> [0.1,0.2]", (100, 100), {}, EMPTY, []),  # a point is not a box
        ("Detect all objects shown in the image.", L, {}, EMPTY, []),  # echo of the prompt
        ("", P, {}, EMPTY, []),
    ],
)
def test_detection(text, wh, options, xyxy, names):
    check(get_task("detection").parse(text, wh, **options), xyxy, names)


def test_detection_class_ids_index_requested_then_new_classes():
    text = "<p>dogs</p> [0.1,0.1,0.2,0.2] <p>3 people</p> [0.3,0.3,0.4,0.4] <p>kite</p> [0.5,0.5,0.6,0.6]"
    d = get_task("detection").parse(text, (100, 100), classes=["person", "dog"])
    assert d.metadata["classes"] == ["person", "dog", "kite"]
    assert list(d.class_id) == [1, 0, 2]
    assert list(d.data["class_name"]) == ["dog", "person", "kite"]
    assert list(d.data["phrase"]) == ["dogs", "3 people", "kite"]


def test_detection_max_objects_caps_loops():
    text = "".join(f"<p>dot</p> [0.{i:02d},0.10,0.{i + 1:02d},0.20]" for i in range(1, 60))
    d = get_task("detection").parse(text, (100, 100), max_objects=10)
    assert len(d) == 10
    assert any("max_objects" in n for n in d.metadata["parse_notes"])


@pytest.mark.parametrize(
    "text, options, xyxy, texts",
    [
        (
            "<p>STOP</p> [0.1,0.2,0.3,0.4] <p>Main St.</p>[0.5,0.5,0.9,0.6]",
            {},
            [[10, 20, 30, 40], [50, 50, 90, 60]],
            ["STOP", "Main St."],
        ),
        (
            "<p>SALE 50%</p> [0.1,0.2,0.3,0.4;0.5,0.2,0.7,0.4]",
            {},
            [[10, 20, 30, 40], [50, 20, 70, 40]],
            ["SALE 50%", "SALE 50%"],
        ),  # repeated string shares a list
        (
            "<p>a [1] b; c</p> [0.1,0.2,0.3,0.4]",
            {},
            [[10, 20, 30, 40]],
            ["a [1] b; c"],
        ),  # specials in text
        ("<p>0.25</p> [0.1,0.2,0.3,0.4]", {}, [[10, 20, 30, 40]], ["0.25"]),  # digits as text
        ("[0.1,0.2,0.3,0.4]", {}, [[10, 20, 30, 40]], [""]),  # box without text
        ("No text found.", {}, EMPTY, []),
        (
            "HELLO WORLD\nsecond line",
            {"variant": "read"},
            [[0, 0, 100, 100]],
            ["HELLO WORLD\nsecond line"],
        ),
        ("", {"variant": "read"}, EMPTY, []),
    ],
)
def test_ocr(text, options, xyxy, texts):
    check(get_task("ocr").parse(text, (100, 100), **options), xyxy, texts, field="text")


@pytest.mark.parametrize(
    "text, options, names, raw",
    [
        (
            "<p>title</p> [0.1,0.05,0.9,0.1] <p>text</p> [0.1,0.2,0.9,0.5;0.1,0.5,0.9,0.8] <p>figure</p>[0.2,0.8,0.8,0.9]",
            {},
            ["title", "text", "text", "figure"],
            ["title", "text", "text", "figure"],
        ),
        (
            "<p>Section-header</p> [0.1,0.05,0.9,0.1] <p>Picture</p>[0.2,0.8,0.8,0.9] <p>List-item</p>[0.1,0.2,0.9,0.3]",
            {},
            ["title", "figure", "list"],
            ["Section-header", "Picture", "List-item"],
        ),  # DocLayNet -> PubLayNet
        (
            "<p>figure</p>[0.2,0.8,0.8,0.9] <p>paragraphs</p> [0.1,0.2,0.9,0.5] <p>page_header</p>[0.1,0.0,0.9,0.04]",
            {"vocabulary": "doclaynet"},
            ["Picture", "Text", "Page-header"],
            ["figure", "paragraphs", "page_header"],
        ),
        ("<p>stamp</p> [0.1,0.1,0.2,0.2]", {}, ["stamp"], ["stamp"]),  # unknown label kept, noted
        ("<p>stamp</p> [0.1,0.1,0.2,0.2]", {"drop_unknown": True}, [], []),
        (
            "<p>stamp</p> [0.1,0.1,0.2,0.2]",
            {"synonyms": {"stamps": "figure"}},
            ["figure"],
            ["stamp"],
        ),
        ("<p>Stamp</p> [0.1,0.1,0.2,0.2]", {"vocabulary": "raw"}, ["stamp"], ["Stamp"]),
        ("", {}, [], []),
    ],
)
def test_layout(text, options, names, raw):
    d = get_task("layout").parse(text, (100, 100), **options)
    assert list(d.data["class_name"]) == names
    assert list(d.data["raw_class_name"]) == raw
    if len(d):
        classes = d.metadata["classes"]
        assert [classes[i] for i in d.class_id] == names


@pytest.mark.parametrize(
    "text, wh, region, xyxy, caption",
    [
        (
            "A man in a black suit.",
            L,
            (10, 20, 110, 220),
            [10, 20, 110, 220],
            "A man in a black suit.",
        ),
        ("  a red car\n###", P, (0, 0, 480, 640), [0, 0, 480, 640], "a red car"),
        (
            "<p>a dog</p> [0.1,0.2,0.3,0.4]",
            (100, 100),
            (1, 2, 3, 4),
            [1, 2, 3, 4],
            "a dog",
        ),  # markup removed
        ("a tree", (100, 100), (-10, -10, 50, 500), [0, 0, 50, 100], "a tree"),  # region clipped
        ("a tree", (100, 100), None, [0, 0, 100, 100], "a tree"),  # no region: whole image
        ("", L, (10, 20, 110, 220), EMPTY, None),
    ],
)
def test_reg(text, wh, region, xyxy, caption):
    d = get_task("reg").parse(text, wh, region=region)
    check(d, xyxy, None if caption is None else [caption], field="caption")


# -- round trip: pixels -> prompt -> (model echoes the region) -> parse ----------------------------
@pytest.mark.parametrize(
    "wh", [(640, 480), (480, 640), (1000, 1000), (333, 101), (101, 333), (1, 7)]
)
@pytest.mark.parametrize(
    "frac", [(0.1, 0.2, 0.6, 0.9), (0.0, 0.0, 1.0, 1.0), (0.25, 0.5, 0.5, 0.75)]
)
def test_round_trip_pixels_prompt_parse(wh, frac):
    w, h = wh
    box = (frac[0] * w, frac[1] * h, frac[2] * w, frac[3] * h)
    prompt = get_task("reg").prompt(region=box, image_size=wh)
    region = prompt[prompt.index("[") :]
    assert " " not in region and all(len(v.split(".")[1]) == 2 for v in region[1:-1].split(","))
    d = get_task("rec").parse(region, wh)
    assert len(d) == 1
    # 2 decimals of the padded side: at most 0.005 * S off, plus clipping
    np.testing.assert_allclose(d.xyxy[0], box, atol=0.005 * max(w, h) + 1e-9)
