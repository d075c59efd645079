"""Prompt building and SphinxStableDiffusionPipeline with tiny SD components (tokenizer counts)."""

import numpy as np
import pytest
from conftest import count_pipeline_calls, gray_image

from sphinx_tools.pipelines import (
    DEFAULT_NEGATIVE_PROMPT,
    SphinxStableDiffusionPipeline,
    build_sd_prompt,
    generate_images,
    split_clauses,
)
from sphinx_tools.pipelines.diffusion import count_tokens

LONG = (
    "A brown dog runs across a wide green park on a sunny afternoon. It carries a red ball in "
    "its mouth, its ears flapping in the wind; children play on the swings behind it, and tall "
    "oak trees line the path."
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A dog.", ["A dog"]),  # one sentence
        (
            "A dog runs. It is brown, small",
            ["A dog runs", "It is brown", "small"],
        ),  # sentences, commas
        ("Tall trees; a lake.", ["Tall trees", "a lake"]),  # semicolon
        ("About 1,000 birds, flying", ["About 1,000 birds", "flying"]),  # comma inside a number
        ("  spaced \n  out ,  words ", ["spaced out", "words"]),  # whitespace
        ("", []),  # empty
    ],
)
def test_split_clauses(text, expected):
    assert split_clauses(text) == expected


def test_short_prompt_is_kept_whole(sd_components):
    tok = sd_components["tokenizer"]
    assert build_sd_prompt("A dog.", tok, style="photo, 4k") == "A dog, photo, 4k"


def test_long_prompt_drops_trailing_clauses_to_fit(sd_components):
    tok = sd_components["tokenizer"]  # one token per character: 77 tokens ~ 75 characters
    prompt = build_sd_prompt(LONG, tok, style="photo, 4k")
    assert count_tokens(tok, prompt) <= 77 < count_tokens(tok, LONG)
    clauses = split_clauses(prompt)
    assert clauses == split_clauses(LONG)[: len(clauses) - 2] + ["photo", "4k"]  # whole clauses


def test_style_dropped_after_description_is_one_clause(sd_components):
    tok = sd_components["tokenizer"]
    description = "a very small brown dog with a red collar sleeping, in a basket"
    prompt = build_sd_prompt(
        description, tok, style="photo, cinematic lighting, ultra detailed, 4k"
    )
    assert prompt.startswith("a very small brown dog with a red collar sleeping")
    assert "in a basket" not in prompt and count_tokens(tok, prompt) <= 77


def test_one_long_clause_is_cut_at_a_word_boundary(sd_components):
    tok = sd_components["tokenizer"]
    description = " ".join(["elephant"] * 20)
    prompt = build_sd_prompt(description, tok, style="")
    assert count_tokens(tok, prompt) <= 77
    assert set(prompt.split()) == {"elephant"}  # no half word
    assert count_tokens(tok, prompt + " elephant") > 77  # and not cut more than needed


def test_custom_budget_and_template(sd_components):
    tok = sd_components["tokenizer"]
    prompt = build_sd_prompt(LONG, tok, style="", template="photo of {description}", max_tokens=40)
    assert prompt.startswith("photo of A brown dog") and count_tokens(tok, prompt) <= 40


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"description": "", "style": ""}, "no words"),  # nothing at all
        ({"description": "dog", "template": "{style}"}, r"\{description\}"),  # template
        ({"description": "dog", "template": "{description} " + "x" * 100}, "does not fit"),
    ],
)
def test_prompt_errors(sd_components, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_sd_prompt(tokenizer=sd_components["tokenizer"], **kwargs)


# -- pipeline ----------------------------------------------------------------------------------
def run(pipe, image, **kwargs):
    defaults = {"num_inference_steps": 2, "height": 32, "width": 32}
    return pipe(image, **{**defaults, **kwargs})


def test_caption_to_images(fake_model, sd_pipeline, monkeypatch):
    calls = count_pipeline_calls(sd_pipeline, monkeypatch)
    fake_model.enqueue("A dog plays with a ball.").enqueue("A red house.")
    pipe = SphinxStableDiffusionPipeline(fake_model, sd_pipeline)
    out = run(pipe, [gray_image(40, 30), gray_image(20, 50)], num_images_per_prompt=2, seed=5)
    assert out.descriptions == ["A dog plays with a ball.", "A red house."]
    assert [img.size for img in out.images] == [(32, 32)] * 4
    assert out.seeds == [5, 6, 7, 8]
    assert out.prompts[0] == out.prompts[1] and out.prompts[0].startswith("A dog plays with a ball")
    assert out.negative_prompts == [DEFAULT_NEGATIVE_PROMPT] * 4
    assert len(calls) == 2 and calls[0]["num_images_per_prompt"] == 2  # one call per prompt
    assert "one-sentence caption" in fake_model.calls[0][0][0]


def test_same_seeds_same_images(fake_model, sd_pipeline):
    pipe = SphinxStableDiffusionPipeline(fake_model, sd_pipeline)
    images = []
    for seed in (3, 3, 4):
        fake_model.enqueue("A cat.")
        images.append(np.asarray(run(pipe, gray_image(16, 16), seed=seed).images[0]))
    np.testing.assert_array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])


def test_image_depends_on_its_seed_not_the_batch(sd_pipeline):
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32}
    alone = generate_images(sd_pipeline, ["a cat"], [11], **kwargs)[0]
    batch = generate_images(sd_pipeline, ["a cat", "a cat", "a dog"], [10, 11, 12], **kwargs)
    np.testing.assert_allclose(np.asarray(alone, float), np.asarray(batch[1], float), atol=1)


def test_detailed_description_is_fitted(fake_model, sd_pipeline):
    fake_model.enqueue(LONG)
    out = run(
        SphinxStableDiffusionPipeline(fake_model, sd_pipeline),
        gray_image(16, 16),
        source="detailed",
        style="",
    )
    assert "detailed description" in fake_model.calls[0][0][0]
    assert count_tokens(sd_pipeline.tokenizer, out.prompts[0]) <= 77
    assert out.descriptions == [LONG] and LONG.startswith(out.prompts[0])


def test_objects_source_adds_region_descriptions_largest_first(fake_model, sd_pipeline):
    fake_model.enqueue("A desk.")
    fake_model.enqueue("<p>cup</p> [0.10,0.10,0.20,0.20] <p>lamp</p> [0.30,0.10,0.90,0.90]")
    fake_model.enqueue("a tall lamp").enqueue("a blue cup")  # REG: largest region asked first
    out = run(
        SphinxStableDiffusionPipeline(fake_model, sd_pipeline),
        gray_image(64, 64),
        source="objects",
        style="",
    )
    assert out.descriptions == ["A desk, a tall lamp, a blue cup"]
    assert out.prompts == ["A desk, a tall lamp, a blue cup"]
    reg_prompts = fake_model.calls[2][0]
    assert len(reg_prompts) == 2 and "[0.30,0.10,0.90,0.90]" in reg_prompts[0]


def test_empty_description_warns_and_uses_the_style(fake_model, sd_pipeline):
    fake_model.enqueue("")
    with pytest.warns(RuntimeWarning, match="no description for image 0"):
        out = run(
            SphinxStableDiffusionPipeline(fake_model, sd_pipeline), gray_image(8, 8), style="photo"
        )
    assert out.prompts == ["photo"] and len(out.images) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"source": "poem"}, "`source` must be one of"),
        ({"height": 30}, "`height` must be divisible by 8, got 30"),
        ({"seed": [1, 2, 3]}, r"1 ints \(one per image\), got \[1, 2, 3\]"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
    ],
)
def test_bad_arguments(fake_model, sd_pipeline, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(SphinxStableDiffusionPipeline(fake_model, sd_pipeline), gray_image(8, 8), **kwargs)
    assert fake_model.calls == []
