"""Prompts: defaults, option validation, per-call templates, the user config file."""

import json

import pytest

from sphinx_tools.errors import SphinxToolsError
from sphinx_tools.registry import get_task


@pytest.mark.parametrize(
    "task, options, expected",
    [
        (
            "rec",
            {"expression": "blue backpack"},
            "Please provide the bounding box coordinate of the region this sentence describes: blue backpack.",
        ),
        (
            "rec",
            {"expression": "Jisoo."},  # no doubled period
            "Please provide the bounding box coordinate of the region this sentence describes: Jisoo.",
        ),
        (
            "grounded_caption",
            {},
            "Describe the image concisely. Include the bounding box for each mentioned object.",
        ),
        ("detection", {}, "Detect all objects shown in the image."),
        ("detection", {"classes": ["person"]}, "Detect all people shown in the image."),
        (
            "detection",
            {"classes": ["dog", "bus", "box"]},
            "Detect all dogs, buses and boxes shown in the image.",
        ),
        ("ocr", {}, "Please detect all texts and provide their bounding box coordinate."),
        (
            "relation",
            {"expression": "people on car"},
            "Please provide the bounding box coordinate of the region this sentence describes: people on car.",
        ),
        (
            "relation",
            {"subject": "man", "predicate": "riding", "object": "horse"},
            "Please provide the bounding box coordinate of the region this sentence describes: man riding horse.",
        ),
        ("caption", {}, "Provide a one-sentence caption for the provided image."),
        ("caption", {"variant": "detailed"}, "Generate a detailed description about the image."),
        ("caption", {"variant": "general"}, "What's in the image?"),
        (
            "vqa",
            {"question": "Is it raining?"},
            "Is it raining?\nAnswer the question using a single word or phrase.",
        ),
        (
            "vqa",
            {"question": "Is it raining? Please answer yes or no.", "variant": "open"},
            "Is it raining? Please answer yes or no.",
        ),
        (
            "vqa",
            {"question": "Which animal?", "choices": ["cat", "dog"]},
            "Which animal?\nA. cat\nB. dog\nAnswer with the option's letter from the given choices directly.",
        ),
    ],
)
def test_default_prompts(task, options, expected):
    assert get_task(task).prompt(**options) == expected


@pytest.mark.parametrize(
    "task, options, expected",
    [
        # landscape 640x480: S=640, pad_y=80
        (
            "pose",
            {"box": (25.6, 220.8, 256.0, 451.2), "image_size": (640, 480)},
            "Detect the key points of the person in the region [0.04,0.47,0.40,0.83].",
        ),
        # portrait 480x640: pad_x=80
        (
            "pose",
            {"box": (0, 0, 480, 640), "image_size": (480, 640)},
            "Detect the key points of the person in the region [0.12,0.00,0.88,1.00].",
        ),
        (
            "pose",
            {"image_size": (640, 480)},  # no box: the whole image
            "Detect the key points of the person in the region [0.00,0.12,1.00,0.88].",
        ),
        (
            "reg",
            {"region": (25.6, 220.8, 256.0, 451.2), "image_size": (640, 480)},
            "Please provide a short description for this region: [0.04,0.47,0.40,0.83]",
        ),
        # odd padding: 101x50 -> pad_y = 25 (floor)
        (
            "reg",
            {"region": (0, 0, 101, 50), "image_size": (101, 50)},
            "Please provide a short description for this region: [0.00,0.25,1.00,0.74]",
        ),
    ],
)
def test_region_prompts_use_padded_square_two_decimals_no_spaces(task, options, expected):
    assert get_task(task).prompt(**options) == expected


@pytest.mark.parametrize(
    "task, options, match",
    [
        ("rec", {}, "expression"),  # missing required value
        ("rec", {"expresion": "x"}, "unknown option 'expresion'"),  # typo
        ("rec", {"expression": "x", "all_boxes": "maybe"}, "all_boxes"),  # wrong type
        ("rec", {"expression": "x", "max_objects": 0}, "max_objects"),
        ("detection", {"classes": "person"}, "classes"),  # a str is not a list
        ("detection", {"classes": []}, "classes"),
        ("reg", {"region": (1, 2, 3, 4)}, "image_size"),
        ("reg", {"region": (5, 5, 1, 1), "image_size": (10, 10)}, "x1 < x2"),
        ("reg", {"region": (1, 2, 3), "image_size": (10, 10)}, "region"),
        ("pose", {"box": (0, 0, 10, 10)}, "image_size"),
        ("vqa", {}, "question"),
        ("caption", {"variant": "poem"}, "no prompt variant 'poem'"),
        ("layout", {"vocabulary": "coco"}, "vocabulary"),
        ("caption", {"template": "Describe {thing}."}, r"\{thing\}"),
        ("caption", {"template": "Describe {"}, "malformed"),
    ],
)
def test_bad_options_raise_value_error_naming_them(task, options, match):
    with pytest.raises(ValueError, match=match):
        get_task(task).prompt(**options)


def test_parse_rejects_unknown_options_too():
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        get_task("rec").parse("[0.1,0.1,0.2,0.2]", (10, 10), colour="red")


@pytest.mark.parametrize("image_size", [None, (0, 10), (10,), "10x10", (-5, 5)])
def test_parse_rejects_bad_image_size(image_size):
    with pytest.raises(ValueError, match="image_size"):
        get_task("rec").parse("[0.1,0.1,0.2,0.2]", image_size)


def test_text_tasks_need_no_image_size():
    assert get_task("caption").parse("A dog.") == "A dog."


def test_per_call_template_override():
    prompt = get_task("rec").prompt(
        expression="the cat", template="Where is {expression}? Give a box."
    )
    assert prompt == "Where is the cat? Give a box."


def test_config_file_yaml_overrides_default_and_variants(tmp_path, monkeypatch):
    path = tmp_path / "prompts.yaml"
    path.write_text("rec: 'Box for: {expression}'\ncaption:\n  detailed: 'Describe everything.'\n")
    monkeypatch.setenv("SPHINX_TOOLS_CONFIG", str(path))
    assert get_task("rec").prompt(expression="a dog") == "Box for: a dog"
    assert get_task("caption").prompt(variant="detailed") == "Describe everything."
    assert get_task("caption").prompt() == "Provide a one-sentence caption for the provided image."
    # the per-call template still wins
    assert get_task("rec").prompt(expression="a dog", template="{expression}?") == "a dog?"


def test_config_file_json(tmp_path, monkeypatch):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"ocr": {"read": "Transcribe the page."}}))
    monkeypatch.setenv("SPHINX_TOOLS_CONFIG", str(path))
    assert get_task("ocr").prompt(variant="read") == "Transcribe the page."


def test_default_config_location_under_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("SPHINX_TOOLS_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "sphinx-tools").mkdir()
    (tmp_path / "sphinx-tools" / "prompts.yaml").write_text(
        "grounded_caption: 'Caption with boxes.'\n"
    )
    assert get_task("grounded_caption").prompt() == "Caption with boxes."


@pytest.mark.parametrize("content", ["[unclosed", "- a\n- b\n", "rec: [1, 2]\n"])
def test_bad_config_file_is_a_clear_error(tmp_path, monkeypatch, content):
    path = tmp_path / "prompts.yaml"
    path.write_text(content)
    monkeypatch.setenv("SPHINX_TOOLS_CONFIG", str(path))
    with pytest.raises(SphinxToolsError, match="prompts.yaml"):
        get_task("rec").prompt(expression="x")


def test_config_template_with_unknown_field_names_it(tmp_path, monkeypatch):
    path = tmp_path / "prompts.yaml"
    path.write_text("rec: 'Find {object}.'\n")
    monkeypatch.setenv("SPHINX_TOOLS_CONFIG", str(path))
    with pytest.raises(ValueError, match=r"\{object\}.*expression"):
        get_task("rec").prompt(expression="x")


# -- templates are plain {field} places, options and prompts are bounded ---------------------------
@pytest.mark.parametrize(
    "task, options, match",
    [
        ("detection", {"template": "{classes:>50000000}"}, r"\{classes:>50000000\} has a format"),
        ("rec", {"expression": "x", "template": "{expression!r}"}, "has a conversion"),
        ("rec", {"expression": "x", "template": "{expression.upper}"}, "not a plain field name"),
        ("rec", {"expression": "x", "template": "{expression[0]}"}, "not a plain field name"),
        ("rec", {"expression": "x", "template": "Find {0}."}, "not a plain field name"),
        ("rec", {"expression": "x", "template": "Find {}."}, "not a plain field name"),
        ("rec", {"expression": "x", "template": "{expression:{expression}}"}, "format spec"),
        ("vqa", {"question": "q", "template": "{question:^9}"}, r"fields: choices, question"),
    ],  # a 70-byte template must not ask for a 50-million-character prompt
)
def test_templates_allow_only_plain_field_names(task, options, match):
    with pytest.raises(ValueError, match=match):
        get_task(task).prompt(**options)


def test_a_refused_template_names_the_task_and_its_fields():
    with pytest.raises(ValueError) as info:
        get_task("detection").prompt(template="Detect {classes!s:>9}.")
    message = str(info.value)
    assert "'detection'" in message and "{classes!s:>9}" in message and "fields: classes" in message


def test_template_from_the_config_file_is_checked_too(tmp_path, monkeypatch):
    path = tmp_path / "prompts.yaml"
    path.write_text("detection: 'Detect {classes:>50000000}.'\n")
    monkeypatch.setenv("SPHINX_TOOLS_CONFIG", str(path))
    with pytest.raises(ValueError, match="format spec"):
        get_task("detection").prompt()
    with pytest.raises(ValueError, match="format spec"):
        get_task("detection").template(get_task("detection").options())


def test_plain_templates_and_escaped_braces_still_work():
    rec = get_task("rec")
    assert rec.prompt(expression="a dog", template="{{box}} for {expression}: {expression}") == (
        "{box} for a dog: a dog"
    )
    assert get_task("caption").prompt(template="Caption {{this}}.") == "Caption {this}."


@pytest.mark.parametrize(
    "task, options, match",
    [
        ("vqa", {"question": "q" * 9000}, "option 'question' is 9,000 characters long; at most"),
        ("rec", {"expression": "x", "template": "{expression}" + " " * 9000}, "option 'template'"),
        ("detection", {"classes": ["cat"] * 2000}, "option 'classes' has 2,000 items; at most"),
        ("detection", {"classes": ["c" * 2000]}, "option 'classes': item 0 is 2,000 characters"),
        ("vqa", {"question": "q", "choices": ["a", "b" * 5000]}, "option 'choices': item 1"),
        ("layout", {"synonyms": {f"k{i}": "text" for i in range(1100)}}, "option 'synonyms'"),
        ("pose", {"boxes": [(0, 0, 1, 1)] * 1100}, "option 'boxes' has 1,100 items"),
    ],
)
def test_oversized_options_are_refused_naming_the_option_and_its_length(task, options, match):
    with pytest.raises(ValueError, match=match):
        get_task(task).prompt(**options)
    with pytest.raises(ValueError, match=match):  # parse reads the same options
        get_task(task).parse("", (10, 10), **options)


def test_a_prompt_over_the_limit_is_refused_before_it_is_built():
    from sphinx_tools.tasks import MAX_PROMPT_CHARS

    many = [f"class number {i}" for i in range(1000)]  # each option within its limits
    with pytest.raises(ValueError, match=f"at most {MAX_PROMPT_CHARS:,}"):
        get_task("detection").prompt(classes=many)
    repeated = "{expression}" * 600  # a short template repeating a long field
    with pytest.raises(ValueError, match="would be .* characters long"):
        get_task("rec").prompt(expression="e" * 8000, template=repeated)


def test_real_sized_options_still_work():
    classes = [f"object class {i}" for i in range(300)]  # a few hundred names
    prompt = get_task("detection").prompt(classes=classes)
    assert prompt.startswith("Detect all object class 0s, object class 1s")
    question = "Is it? " * 500  # a few thousand characters
    assert get_task("vqa").prompt(question=question, variant="open") == question.strip()
