"""The shared grammar helpers: cleaning, numbers, brackets, phrases, geometry, confidence."""

import math
from contextlib import nullcontext as does_not_raise

import numpy as np
import pytest

from sphinx_tools.parsing import (
    Answer,
    box_to_pixels,
    find_brackets,
    find_mentions,
    normalize_label,
    parse_value,
    plural,
    point_to_pixels,
    strip_markup,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("[0.1,0.2,0.3,0.4]", "[0.1,0.2,0.3,0.4]"),
        ("  [0.1,0.2,0.3,0.4]\n", "[0.1,0.2,0.3,0.4]"),  # surrounding whitespace
        ("answer\n### Human: more", "answer"),  # response end signal
        ("answer###", "answer"),  # benchmark-style cut
        ("answer</s>", "answer"),  # raw decoding
        (
            "&lt;p&gt;dog&lt;/p&gt; [0.1,0.2,0.3,0.4]",
            "<p>dog</p> [0.1,0.2,0.3,0.4]",
        ),  # HTML-escaped
        ("", ""),
        ("###", ""),
    ],
)
def test_answer_cleaning(raw, expected):
    assert Answer.from_generation(raw).text == expected


def test_answer_maps_clean_spans_back_to_raw():
    raw = "  &lt;p&gt;dog&lt;/p&gt; [0.1]"
    answer = Answer.from_generation(raw)
    start = answer.text.index("dog")
    a, b = answer.raw_span((start, start + 3))
    assert raw[a:b] == "dog"
    a, b = answer.raw_span((0, 3))  # "<p>" came from "&lt;p&gt;"
    assert raw[a:b] == "&lt;p&gt;"


@pytest.mark.parametrize(
    "token, recover, expected, note",
    [
        ("0.26", True, 0.26, None),
        ("0.260", True, 0.26, None),  # any precision
        (".5", True, 0.5, None),
        ("1", True, 1.0, None),  # a lone integer is a value, not dropped
        ("0", True, 0.0, None),
        ("5e-1", True, 0.5, None),  # exponent
        ("-0.02", True, -0.02, None),  # slightly out: kept, clipped later
        ("1.1", True, 1.1, None),
        ("37", True, 0.37, "decimal point restored"),  # lost decimal point
        ("370", True, 0.37, "decimal point restored"),
        ("37", False, None, "out of [0, 1]"),
        ("3.7", True, None, "out of [0, 1]"),  # has a point: not a lost one
        ("-5", True, None, "out of [0, 1]"),
        ("1e999", True, None, "non-finite"),
        ("abc", True, None, "not a number"),
        ("0.1.2", True, None, "not a number"),
    ],
)
def test_parse_value(token, recover, expected, note):
    value, got_note = parse_value(token, recover)
    if expected is None:
        assert value is None
    else:
        assert value == pytest.approx(expected)
    if note is None:
        assert got_note is None
    else:
        assert note in got_note


@pytest.mark.parametrize(
    "text, expected_groups, closed",
    [
        ("[0.26,0.23,0.52,0.82]", [(0.26, 0.23, 0.52, 0.82)], [True]),
        ("[0.37, 0.51, 0.52, 0.61]", [(0.37, 0.51, 0.52, 0.61)], [True]),  # spaces after commas
        (
            "[ 0.1 ,0.2 ; 0.3,0.4 ]",
            [(0.1, 0.2), (0.3, 0.4)],
            [True],
        ),  # spaces around ; and brackets
        ("[0.1,0.2,0.3,0.4;0.5,0.6]", [(0.1, 0.2, 0.3, 0.4), (0.5, 0.6)], [True]),  # mixed counts
        ("[0,0.5,1,0.9]", [(0.0, 0.5, 1.0, 0.9)], [True]),  # integers kept (the demo drops them)
        ("[x1, y1, x2, y2]", [], []),  # placeholder echoed from the prompt
        ("[see above]", [], []),
        ("[]", [], []),
        (
            "[0.1,0.2,0.3,0.4;0.5,0.6,0.7",
            [(0.1, 0.2, 0.3, 0.4), ()],
            [False],
        ),  # truncated: last dropped
        ("[0.1,0.2,0.3,0.4 and more", [(0.1, 0.2, 0.3, 0.4)], [False]),  # missing ]
        ("[3 items] here", [], []),  # prose in brackets
        ("[1e-1,2e-1,3e-1,4e-1]", [(0.1, 0.2, 0.3, 0.4)], [True]),
        ("[0.1,0.2,0.3,abc]", [], []),  # letters: not a coordinate bracket
        ("[0.1,0.2,-,0.4]", [()], [True]),  # malformed group
    ],
)
def test_find_brackets(text, expected_groups, closed):
    brackets = find_brackets(text)
    groups = [g.values for b in brackets for g in b.groups]
    assert [tuple(pytest.approx(v) for v in g) for g in groups] == [
        tuple(g) for g in expected_groups
    ]
    assert [b.closed for b in brackets] == closed


def test_mentions_bind_phrase_to_following_bracket():
    text = "There are <p>2 dogs</p> [0.1,0.1,0.2,0.2;0.3,0.3,0.4,0.4] near <p>a tree</p> and [0.5,0.5,0.6,0.6]"
    mentions = find_mentions(text)
    assert [(m.phrase.text if m.phrase else None, m.bracket is not None) for m in mentions] == [
        ("2 dogs", True),
        ("a tree", False),
        (None, True),
    ]


@pytest.mark.parametrize(
    "text, phrase",
    [
        ("<p>left eye</p>[0.1,0.2]", "left eye"),  # no space
        ("<p>left eye</p>   [0.1,0.2]", "left eye"),
        ("<p>left eye</p>: [0.1,0.2]", "left eye"),
        ("<P>Left Eye</P> [0.1,0.2]", "Left Eye"),  # tag case
        ("<p>STOP [2]</p> [0.1,0.2]", "STOP [2]"),  # brackets inside OCR text
        ("<p>a <b>b</p> [0.1,0.2]", "a <b>b"),
        ("<p>left eye [0.1,0.2]", "left eye"),  # missing </p>
        ("<p>x <p>left eye</p> [0.1,0.2]", "left eye"),  # the nearest <p>
    ],
)
def test_phrase_extraction(text, phrase):
    bound = [m for m in find_mentions(text) if m.phrase and m.bracket]
    assert len(bound) == 1 and bound[0].phrase.text == phrase


@pytest.mark.parametrize(
    "values, image_wh, expected, note",
    [
        # docs/formats.md §2 example: 640x480, S=640, pad_y=80
        ((0.04, 0.47, 0.40, 0.83), (640, 480), (25.6, 220.8, 256.0, 451.2), None),
        # portrait 480x640: pad_x=80
        ((0.5, 0.0, 0.75, 0.5), (480, 640), (240.0, 0.0, 400.0, 320.0), None),
        # square: no padding
        ((0.1, 0.2, 0.3, 0.4), (100, 100), (10.0, 20.0, 30.0, 40.0), None),
        # odd difference: 101x50 -> pad_y = 25 (floor)
        ((0.0, 0.5, 1.0, 0.6), (101, 50), (0.0, 25.5, 101.0, 35.6), None),
        ((0.40, 0.83, 0.04, 0.47), (640, 480), (25.6, 220.8, 256.0, 451.2), "swapped"),  # inverted
        ((-0.05, 0.0, 1.05, 1.0), (640, 480), (0.0, 0.0, 640.0, 480.0), "clipped"),  # out of [0,1]
        ((0.1, 0.0, 0.9, 0.1), (640, 480), None, "padding band"),  # wholly in the top band
        ((0.3, 0.3, 0.3, 0.5), (640, 480), None, "degenerate"),  # zero width
    ],
)
def test_box_to_pixels(values, image_wh, expected, note):
    xyxy, notes = box_to_pixels(values, image_wh)
    if expected is None:
        assert xyxy is None
    else:
        np.testing.assert_allclose(xyxy, expected, atol=1e-6)
    assert (note is None and not notes) or (note is not None and any(note in n for n in notes))


@pytest.mark.parametrize(
    "values, image_wh, xy, visible",
    [
        ((0.5, 0.5), (640, 480), (320.0, 240.0), True),
        ((0.5, 0.5), (480, 640), (240.0, 320.0), True),
        ((0.0, 0.0), (640, 480), (0.0, 0.0), False),  # [0,0] is "not visible"
        ((0.5, 0.05), (640, 480), (320.0, 0.0), False),  # in the padding band
    ],
)
def test_point_to_pixels(values, image_wh, xy, visible):
    got, got_visible, _ = point_to_pixels(values, image_wh)
    np.testing.assert_allclose(got, xy)
    assert got_visible is visible


# -- confidence from token log-probs ---------------------------------------------------------------
def _pieces(text, pieces):
    assert "".join(pieces) == text
    offsets, pos = [], 0
    for piece in pieces:
        offsets.append(pos)
        pos += len(piece)
    return offsets


def test_confidence_is_exp_mean_logprob_of_overlapping_tokens():
    pieces = ["<p>", "dog", "</p>", " [", "0", ".", "1", ",", "0", ".", "2", "]", " and"]
    text = "".join(pieces)
    lps = [-9.0, -0.2, -9.0, -9.0, -0.1, -0.1, -0.3, -0.1, -0.1, -0.1, -0.5, -9.0, -9.0]
    answer = Answer.from_generation(text, lps, _pieces(text, pieces))
    phrase = (text.index("dog"), text.index("dog") + 3)
    group = (text.index("0.1"), text.index("0.2") + 3)
    expected = math.exp(np.mean([-0.2, -0.1, -0.1, -0.3, -0.1, -0.1, -0.1, -0.5]))
    assert answer.confidence([phrase, group]) == pytest.approx(expected)


def test_confidence_absent_without_logprobs():
    assert Answer.from_generation("[0.1,0.2,0.3,0.4]").confidence([(0, 5)]) is None


def test_confidence_survives_leading_whitespace_and_cut():
    raw = "  [0.1,0.2,0.3,0.4]\n### Human"
    offsets = list(range(len(raw)))  # one token per character
    lps = [-1.0] * 2 + [-0.5] * 17 + [-3.0] * (len(raw) - 19)
    answer = Answer.from_generation(raw, lps, offsets)
    assert answer.text == "[0.1,0.2,0.3,0.4]"
    assert answer.confidence([(1, 16)]) == pytest.approx(math.exp(-0.5))


@pytest.mark.parametrize(
    "logprobs, offsets, ctx",
    [
        ([-0.1], None, pytest.raises(ValueError, match="go together")),
        (None, [0], pytest.raises(ValueError, match="go together")),
        ([-0.1, -0.2], [0], pytest.raises(ValueError, match="one value per token")),
        ([-0.1], [0], does_not_raise()),
    ],
)
def test_logprobs_offsets_must_match(logprobs, offsets, ctx):
    with ctx:
        Answer.from_generation("x", logprobs, offsets)


# -- label helpers ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "phrase, label",
    [
        ("3 people", "person"),
        ("Two dogs", "dog"),
        ("the traffic_lights", "traffic light"),
        ("13 ships", "ship"),
        ("boxes", "box"),
        ("buses", "bus"),
        ("glasses", "glasses"),
        ("List-item", "list item"),
        ("", ""),
    ],
)
def test_normalize_label(phrase, label):
    assert normalize_label(phrase) == label


@pytest.mark.parametrize(
    "word, expected",
    [
        ("person", "people"),
        ("dog", "dogs"),
        ("bus", "buses"),
        ("box", "boxes"),
        ("traffic light", "traffic lights"),
        ("cars", "cars"),
        ("butterfly", "butterflies"),
    ],
)
def test_plural(word, expected):
    assert plural(word) == expected


def test_strip_markup():
    assert strip_markup("<p>A dog</p> [0.1,0.2,0.3,0.4] runs [fast].") == "A dog runs [fast]."
