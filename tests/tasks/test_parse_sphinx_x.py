"""SPHINX-X answers (SPHINX-Tiny, SPHINX-MoE) next to SPHINX's, read by the same parsers, no flag.

The texts are the examples printed in the SPHINX-X paper (its set-of-marks and OCR figure, display
strings without tags) and the shapes the checkpoints answer in: a flat key-point list, ``- Mark k:``
lines, tag-less ``word[box]`` lists and a lower-case option letter. A 1000x1000 image makes pixels
1000x the written fractions.
"""

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sphinx_tools.parsing import BARE_PHRASE_NOTE, MAX_PHRASES, words_before
from sphinx_tools.registry import get_task

WH = (1000, 1000)
LAYOUT = (
    "There are seven text[0.16,0.50,0.48,0.64;0.16,0.64,0.48,0.74;0.16,0.73,0.48,0.85;0.16,0.85, "
    "0.48,0.98;0.50,0.43,0.83,0.59;0.50,0.59,0.83,0.67;0.50,0.72,0.83,0.98], "
    "figure[0.51,0.06,0.82,0.31], list[0.16,0.06,0.48,0.49], and title[0.50,0.69,0.71,0.71] "
    "in the image."
)
OCR = (
    "There are \u201cVirtual[0.25,0.30,0.52,0.38], Office[0.53,0.31,0.72,0.38], "
    "of[0.23,0.39,0.30,0.46], the[0.34,0.39,0.47,0.46], \u201dFuture\u201c[0.49,0.39,0.72,0.45], "
    "1st[0.25,0.68,0.30,0.72], floor[0.32,0.68,0.39,0.72], Deutsches[0.61,0.48,0.74,0.52], "
    "Forschungszentrum[0.61,0.52,0.79,0.56], for[0.61,0.56,0.64,0.59], "
    "Kunstliche[0.65,0.56,0.77,0.60], Intelligenz[0.61,0.59,0.76,0.63], "
    "GmbH[0.74,0.59,0.78,0.62], 1.21[0.76,0.67,0.80,0.71], and Competence[0.24,0.20,0.50,0.25] "
    "in the image."
)
MARKS_SHORT = "- Mark 1: Cat wearing a collar\n- Mark 2: Beer bottle on a ledge"
MARKS_DETAILED = (
    "- Mark 1: The object is a cat, specifically a calico, characterized by its tricolor fur "
    "pattern of white, black, and orange. The cat is wearing a collar, which is a common "
    "accessory for domestic cats to help identify\n\nthem and keep them safe.\n\n"
    "- Mark 2: This is a beer bottle, likely made of glass, with a label that is\n\n"
    "partially visible."
)
MARK_POINTS = [(560, 240), (760, 500)]  # the paper's marks, [0.56, 0.24] and [0.76, 0.50]
# 17 COCO points of one person, (0, 0) for the hidden left ear
POINTS = np.array(
    [[0.64, 0.32], [0.66, 0.30], [0.62, 0.30], [0.00, 0.00], [0.59, 0.31], [0.70, 0.40],
     [0.57, 0.40], [0.73, 0.50], [0.55, 0.50], [0.74, 0.58], [0.53, 0.58], [0.67, 0.58],
     [0.60, 0.58], [0.68, 0.66], [0.60, 0.66], [0.68, 0.74], [0.59, 0.74]]
)


def flat(points) -> str:
    return "[" + ", ".join(f"{x:.2f},{y:.2f}" for x, y in points) + "]"


# -- layout ---------------------------------------------------------------------------------------
def test_layout_tagless_labels_come_from_the_words_before_each_bracket():
    d = get_task("layout").parse(LAYOUT, WH)
    assert list(d.data["class_name"]) == ["text"] * 7 + ["figure", "list", "title"]
    assert list(d.data["raw_class_name"]) == ["seven text"] * 7 + ["figure", "list", "title"]
    np.testing.assert_allclose(d.xyxy[7], [510, 60, 820, 310])
    np.testing.assert_allclose(d.xyxy[3], [160, 850, 480, 980])  # a space inside the group
    assert all(BARE_PHRASE_NOTE in n for n in d.data["parse_notes"])
    doclaynet = get_task("layout").parse(LAYOUT, WH, vocabulary="doclaynet")
    assert list(doclaynet.data["class_name"]) == ["Text"] * 7 + ["Picture", "List-item", "Title"]


def test_layout_default_prompt_is_sphinx_x_training_prompt():
    layout = get_task("layout")
    assert layout.prompt() == "Detect the layout of the document in the image."
    assert layout.prompt(variant="classes") == (
        "Detect all layout regions (text, title, list, table or figure) shown in the document "
        "image."
    )


# -- OCR ------------------------------------------------------------------------------------------
def test_ocr_tagless_text_is_the_word_before_each_bracket():
    d = get_task("ocr").parse(OCR, WH)
    assert list(d.data["text"]) == [
        "Virtual", "Office", "of", "the", "Future", "1st", "floor", "Deutsches",
        "Forschungszentrum", "for", "Kunstliche", "Intelligenz", "GmbH", "1.21", "Competence",
    ]
    np.testing.assert_allclose(d.xyxy[0], [250, 300, 520, 380])
    np.testing.assert_allclose(d.xyxy[-1], [240, 200, 500, 250])
    assert "box without text" not in "".join(d.data["parse_notes"])


def test_ocr_tagged_and_bare_without_words_are_read_as_before():
    d = get_task("ocr").parse("<p>STOP</p> [0.1,0.2,0.3,0.4] [0.5,0.5,0.9,0.6]", WH)
    assert list(d.data["text"]) == ["STOP", ""]
    assert d.data["parse_notes"][1] == "box without text"


# -- detection ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, options, names, phrases",
    [
        (
            "There are two people[0.10,0.10,0.30,0.90;0.40,0.10,0.60,0.90] and a dog"
            "[0.70,0.50,0.90,0.90] in the image.",
            {},
            ["person", "person", "dog"],
            ["two people", "two people", "a dog"],
        ),  # tag-less, all objects
        (
            "There are two people[0.10,0.10,0.30,0.90;0.40,0.10,0.60,0.90] and a dog"
            "[0.70,0.50,0.90,0.90] in the image.",
            {"classes": ["dog", "person"]},
            ["person", "person", "dog"],
            ["two people", "two people", "a dog"],
        ),  # tag-less, matched to the requested classes
        (
            "There are two people[0.10,0.10,0.30,0.90] in the image.",
            {"classes": ["man"]},
            ["man"],
            [""],
        ),  # one class asked: a bare box is that class, as before
        ("[0.10,0.10,0.30,0.90]", {}, ["object"], [""]),  # no words: as before
        (
            "There are <p>2 dogs</p>[0.10,0.10,0.30,0.90;0.40,0.10,0.60,0.90] in the image.",
            {},
            ["dog", "dog"],
            ["2 dogs", "2 dogs"],
        ),  # SPHINX's tagged form is unchanged
    ],
)
def test_detection_tagless_label_is_the_phrase_before_the_box(text, options, names, phrases):
    d = get_task("detection").parse(text, WH, **options)
    assert list(d.data["class_name"]) == names
    assert list(d.data["phrase"]) == phrases


def test_words_before_reads_only_since_the_previous_mention():
    text = "a cat[0.1,0.2,0.3,0.4]dog[0.5,0.5,0.6,0.6]"
    assert words_before(text, text.index("[0.5"), text.index("dog")) == (22, 25)
    assert words_before(text, text.index("[0.5"), text.index("[0.5")) is None
    assert words_before("There are [", 10) is None
    assert words_before("person: [", 8) == (0, 6)


# -- pose -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        f"There is one human keypoints {flat(POINTS)} in the image.",
        f"<p>human keypoints</p> {flat(POINTS)}",
        flat(POINTS).replace(", ", ","),
    ],
)
def test_pose_flat_list_in_coco_order(text):
    k = get_task("pose").parse(text, WH)
    assert len(k) == 1
    expected = POINTS * 1000
    expected[3] = 0
    np.testing.assert_allclose(k.xy[0], expected)
    assert k.visible[0].tolist() == [i != 3 for i in range(17)]
    assert "read in COCO order" in k.data["parse_notes"][0]
    assert "unknown key point" not in k.data["parse_notes"][0]


def test_pose_two_flat_lists_are_two_people_and_named_points_still_read():
    other = POINTS[::-1]
    k = get_task("pose").parse(f"human keypoints [{flat(POINTS)[1:-1]};{flat(other)[1:-1]}]", WH)
    assert len(k) == 2
    named = get_task("pose").parse("<p>nose</p> [0.64,0.32] <p>left eye</p> [0.66,0.30]", WH)
    np.testing.assert_allclose(named.xy[0, :2], [[640, 320], [660, 300]])
    assert named.visible[0].sum() == 2


# -- REG with marks -------------------------------------------------------------------------------
def test_reg_marks_prompt_as_sphinx_x_writes_it():
    reg = get_task("reg")
    assert reg.prompt(marks=MARK_POINTS, image_size=WH) == (
        "Provide a short description for each of the marks I've offered: <Mark 1> [0.56, 0.24], "
        "<Mark 2> [0.76, 0.50]"
    )
    assert reg.prompt(marks=MARK_POINTS, image_size=WH, variant="marks_detailed").startswith(
        "Provide a detailed description for each of the marks I've offered: <Mark 1>"
    )
    assert reg.prompt(marks=[(0, 0, 500, 250)], image_size=(1000, 500)).endswith(
        "<Mark 1> [0.00, 0.25, 0.50, 0.50]"
    )  # a box mark in the padded square
    with pytest.raises(ValueError, match="marks"):
        reg.prompt(variant="marks", image_size=WH)
    assert reg.split(marks=MARK_POINTS, image_size=WH) == [
        {"marks": MARK_POINTS, "image_size": WH}
    ]  # one question for every mark


@pytest.mark.parametrize(
    "text, captions",
    [
        (MARKS_SHORT, ["Cat wearing a collar", "Beer bottle on a ledge"]),
        (
            MARKS_DETAILED,
            [
                "The object is a cat, specifically a calico, characterized by its tricolor fur "
                "pattern of white, black, and orange. The cat is wearing a collar, which is a "
                "common accessory for domestic cats to help identify them and keep them safe.",
                "This is a beer bottle, likely made of glass, with a label that is partially "
                "visible.",
            ],
        ),
        ("Mark 2: a bottle. Mark 1: a cat.", ["a cat.", "a bottle."]),  # one line, any order
    ],
)
def test_reg_marks_one_description_per_mark(text, captions):
    d = get_task("reg").parse(text, WH, marks=MARK_POINTS)
    assert list(d.data["caption"]) == captions
    assert d.data["mark"].tolist() == [1, 2]
    np.testing.assert_allclose(d.xyxy, [[560, 240, 560, 240], [760, 500, 760, 500]])


def test_reg_marks_missing_repeated_and_unasked_marks_are_noted():
    text = "- Mark 2: a bottle\n- Mark 2: again\n- Mark 7: ghost"
    d = get_task("reg").parse(text, WH, marks=MARK_POINTS)
    assert list(d.data["caption"]) == ["a bottle"]
    notes = d.metadata["parse_notes"]
    assert "Mark 1 not described" in notes and "Mark 7 was not asked: ignored" in notes
    assert "Mark 2 described again: kept the first" in notes
    assert len(get_task("reg").parse("I see a cat.", WH, marks=MARK_POINTS)) == 0


def test_reg_single_region_is_read_as_before():
    d = get_task("reg").parse("- Mark 1: a cat", WH, region=(10, 20, 110, 220))
    assert list(d.data["caption"]) == ["- Mark 1: a cat"]
    assert "mark" not in d.data


# -- multiple choice ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("d.", "D"),
        ("(b)", "B"),
        ("c", "C"),
        ("D.", "D"),  # upper case, as before
        ("a dog", "B"),  # choice text, not the article "a"
        ("e.", "e"),  # no option E: cleaned, never guessed
    ],
)
def test_vqa_lower_case_option_letter(text, expected):
    choices = ["a cat", "a dog", "a bird", "a fish"]
    vqa = get_task("vqa")
    assert vqa.parse(text, question="Which animal?", choices=choices, normalize=True) == expected


# -- never raises on junk -------------------------------------------------------------------------
piece = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["- Mark 1: ", "Mark 2:", "<Mark 3>:", "mark 9 :", "\n", "- ", "[0.1,0.2]"]),
    st.lists(st.floats(0, 1).map(lambda v: f"{v:.2f}"), min_size=30, max_size=36).map(
        lambda vs: "[" + ",".join(vs) + "]"
    ),
    st.sampled_from(["There are ", "and ", "text", "figure", '"Virtual', "[0.1,0.2,0.3,0.4]"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(piece, max_size=12).map("".join))
def test_sphinx_x_forms_never_raise_on_junk(text):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the parse() safety net is not hit
        marks = get_task("reg").parse(text, WH, marks=MARK_POINTS)
        assert len(marks) <= 2 and all(c.strip() for c in marks.data["caption"])
        assert len(get_task("reg").parse(text, WH, variant="marks")) <= MAX_PHRASES
        key_points = get_task("pose").parse(text, WH)
        assert np.isfinite(key_points.xy).all()
        for name in ("detection", "layout", "ocr"):
            d = get_task(name).parse(text, WH)
            assert (d.xyxy[:, :2] < d.xyxy[:, 2:]).all()


def test_reg_marks_end_to_end_ask_one_question(fake_model):
    from PIL import Image

    from sphinx_tools.run import run_task

    fake_model.enqueue(MARKS_SHORT)
    d = run_task(fake_model, Image.new("RGB", (640, 480)), "reg", marks=[(320, 240), (0, 0)])
    ((prompts, _, _),) = fake_model.calls
    assert len(prompts) == 1
    assert "<Mark 1> [0.50, 0.50], <Mark 2> [0.00, 0.12]" in prompts[0]  # pad_y = 80
    assert list(d.data["caption"]) == ["Cat wearing a collar", "Beer bottle on a ledge"]
    np.testing.assert_allclose(d.xyxy, [[320, 240, 320, 240], [0, 0, 0, 0]])
