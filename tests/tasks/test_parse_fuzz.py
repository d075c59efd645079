"""Property-based fuzzing: no model text makes a parser raise, and geometry is always valid."""

import warnings

import numpy as np
import pytest
import supervision as sv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sphinx_tools.annotations import GroundedCaption, SceneGraph
from sphinx_tools.registry import get_task

GROUNDED = ["rec", "detection", "ocr", "layout", "reg", "grounded_caption", "relation", "pose"]
ALL = GROUNDED + ["caption", "vqa"]

number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(-2, 2).map(lambda v: f"{v:.2f}"),
    st.integers(-1000, 100000).map(str),
    st.sampled_from(["0", "1", ".", "1e999", "-", "+", "e", "0.", ".5", "nan", "inf", "1e-400"]),
)
group = st.lists(number, min_size=0, max_size=6).map(",".join)
bracket = st.lists(group, min_size=0, max_size=4).map(
    lambda gs: "[" + ";".join(gs) + st_choice_end(gs)
)
phrase = st.text(max_size=12).map(lambda t: f"<p>{t}</p>")
piece = st.one_of(
    st.text(max_size=20),
    bracket,
    phrase,
    st.sampled_from(
        [
            "<p>",
            "</p>",
            "[",
            "]",
            ";",
            ",",
            " ",
            "\n###",
            "</s>",
            "&lt;p&gt;",
            "&amp;",
            "&#0;",
            "<p>left eye</p>",
            "<p>nose</p>",
            "<p>person</p>",
            " on ",
            "[0.1,0.2]",
        ]
    ),
)
model_text = st.lists(piece, max_size=12).map("".join)
image_wh = st.tuples(st.integers(1, 5000), st.integers(1, 5000))


def st_choice_end(groups):
    return "]" if len(groups) % 3 else ""  # sometimes unclosed


def check_boxes(xyxy, wh):
    w, h = wh
    assert np.isfinite(xyxy).all()
    assert (xyxy[:, 0] < xyxy[:, 2]).all() and (xyxy[:, 1] < xyxy[:, 3]).all()
    assert (xyxy[:, [0, 2]] >= 0).all() and (xyxy[:, [0, 2]] <= w).all()
    assert (xyxy[:, [1, 3]] >= 0).all() and (xyxy[:, [1, 3]] <= h).all()


def check_result(result, wh):
    if isinstance(result, sv.Detections):
        check_boxes(result.xyxy, wh)
        assert result.confidence is None
    elif isinstance(result, GroundedCaption):
        check_boxes(result.detections.xyxy, wh)
        for phrase, (a, b), boxes in result.entities:
            assert result.text[a:b] == phrase
            check_boxes(boxes, wh)
    elif isinstance(result, SceneGraph):
        check_boxes(result.detections.xyxy, wh)
    elif isinstance(result, sv.KeyPoints):
        w, h = wh
        assert np.isfinite(result.xy).all()
        assert (result.xy[..., 0] >= 0).all() and (result.xy[..., 0] <= w).all()
        assert (result.xy[..., 1] >= 0).all() and (result.xy[..., 1] <= h).all()
    else:
        assert isinstance(result, str)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=model_text, wh=image_wh)
def test_arbitrary_text_never_raises(name, text, wh):
    task = get_task(name)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error", RuntimeWarning
        )  # the parse() safety net must never be needed
        result = task.parse(text, wh)
    assert isinstance(result, task.output)
    check_result(result, wh)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200), wh=image_wh)
def test_unicode_noise_never_raises(text, wh):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for name in GROUNDED:
            check_result(get_task(name).parse(text, wh), wh)


@settings(max_examples=100, deadline=None)
@given(
    text=model_text,
    wh=image_wh,
    data=st.data(),
)
def test_confidence_is_a_probability(text, wh, data):
    n = data.draw(st.integers(0, len(text) + 1))
    offsets = sorted(
        data.draw(st.lists(st.integers(0, max(len(text) - 1, 0)), min_size=n, max_size=n))
    )
    logprobs = data.draw(st.lists(st.floats(-50, 0), min_size=n, max_size=n))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        d = get_task("detection").parse(text, wh, logprobs=logprobs, offsets=offsets)
    check_boxes(d.xyxy, wh)
    if d.confidence is not None:
        finite = d.confidence[~np.isnan(d.confidence)]
        assert ((finite >= 0) & (finite <= 1)).all()


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.floats(-0.5, 1.5), min_size=4, max_size=4),
    wh=image_wh,
)
def test_any_numeric_box_gives_a_valid_box_or_none(values, wh):
    text = "[" + ",".join(f"{v:.3f}" for v in values) + "]"
    d = get_task("rec").parse(text, wh)
    assert len(d) <= 1
    check_boxes(d.xyxy, wh)
