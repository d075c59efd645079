"""Every real SPHINX output in tests/data parses with its task, with the expected geometry.

The REC images are landscape (BLACKPINK red carpet, the three-leaders collage); the exact size is
not recorded, so geometry is checked against the padded-square map on a 640x480 and a 1920x1080
stand-in. The grounded caption is the demo's display string (tags removed), see its note.
"""

import numpy as np
import pytest

from sphinx_tools.annotations import GroundedCaption
from sphinx_tools.parsing import find_brackets
from sphinx_tools.registry import get_task
from sphinx_tools.transforms import PaddedResize

TASKS = {
    "REC": "rec",
    "grounded_caption": "grounded_caption",
    "VQA": "vqa",
    "detailed_caption": "caption",
}


@pytest.fixture(params=[(640, 480), (1920, 1080)], ids=["640x480", "1920x1080"])
def image_wh(request):
    return request.param


def test_every_task_in_the_data_is_known(real_outputs):
    assert {r["task"] for r in real_outputs} <= set(TASKS)
    assert len(real_outputs) >= 10


def test_rec_outputs(real_outputs, image_wh):
    rows = [r for r in real_outputs if r["task"] == "REC"]
    assert len(rows) == 5
    for row in rows:
        expression = row["prompt"].split("describes: ", 1)[1].rstrip(".")
        d = get_task("rec").parse(row["output"], image_wh, expression=expression)
        values = find_brackets(row["output"])[0].groups[0].values
        expected = np.clip(
            PaddedResize().to_pixels_xyxy([values], image_wh), 0, [*image_wh, *image_wh]
        )
        np.testing.assert_allclose(d.xyxy, expected)
        assert list(d.data["class_name"]) == [expression]
        assert d.metadata["raw_text"] == row["output"]
        assert d.confidence is None  # no logprobs, no fake score


def test_rec_prompt_matches_the_real_prompt(real_outputs):
    for row in (r for r in real_outputs if r["task"] == "REC"):
        expression = row["prompt"].split("describes: ", 1)[1].rstrip(".")
        assert get_task("rec").prompt(expression=expression) == row["prompt"]


def test_worked_example_trump_640x480(real_outputs):
    row = next(r for r in real_outputs if r["output"] == "[0.04,0.47,0.40,0.83]")
    d = get_task("rec").parse(row["output"], (640, 480))
    np.testing.assert_allclose(d.xyxy, [[25.6, 220.8, 256.0, 451.2]])  # docs/formats.md §2


def test_grounded_caption_display_string(real_outputs, image_wh):
    row = next(r for r in real_outputs if r["task"] == "grounded_caption")
    result = get_task("grounded_caption").parse(row["output"], image_wh)
    assert isinstance(result, GroundedCaption)
    assert result.text == "Three world leaders are shown in front of a building ."
    assert [(e.phrase, len(e.xyxy)) for e in result.entities] == [
        ("Three world leaders", 3),
        ("a building", 1),
    ]
    assert all("phrase guessed" in n for n in result.detections.data["parse_notes"])
    assert row["prompt"].rstrip(".") == get_task("grounded_caption").prompt().rstrip(".")


@pytest.mark.parametrize("kind", ["VQA", "detailed_caption"])
def test_free_text_outputs_are_kept_verbatim(real_outputs, kind):
    for row in (r for r in real_outputs if r["task"] == kind):
        task = get_task(TASKS[kind])
        assert task.parse(row["output"]) == row["output"].strip()
