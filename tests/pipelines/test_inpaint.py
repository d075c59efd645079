"""Grounded editing: REC box -> SAM mask -> tiny SD inpainting, replace and remove."""

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import count_pipeline_calls, gray_image
from PIL import Image

from sphinx_tools.pipelines import (
    SphinxSamInpaintPipeline,
    dilate_mask,
    feather_mask,
    inpaint_with_mask,
)
from sphinx_tools.pipelines.inpaint import REMOVE_PROMPT, size_multiple, working_size
from sphinx_tools.demo.synth import fmt_box

W, H = 50, 37  # not multiples of 8: the pipeline resizes for SD and back
BOX = (10, 8, 30, 25)


def rec_answer(box=BOX, wh=(W, H)) -> str:
    return f"[{fmt_box(box, wh)}]"


def box_mask(box=BOX, wh=(W, H)) -> np.ndarray:
    x1, y1, x2, y2 = box
    mask = np.zeros(wh[::-1], bool)
    mask[y1:y2, x1:x2] = True
    return mask


# -- masks -------------------------------------------------------------------------------------
def test_dilate_grows_by_the_radius():
    mask = box_mask()
    grown = dilate_mask(mask, 3)
    assert grown[mask].all() and grown.sum() > mask.sum()
    ys, xs = np.nonzero(grown)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (7, 5, 32, 27)
    np.testing.assert_array_equal(dilate_mask(mask, 0), mask)


def test_feather_is_soft_and_bounded():
    soft = feather_mask(box_mask(), 4)
    assert soft.dtype == np.float32 and 0 <= soft.min() and soft.max() <= 1
    assert soft[16, 20] > 0.99 and soft[0, 0] == 0 and 0 < soft[8, 20] < 1  # edge is blended
    np.testing.assert_array_equal(feather_mask(box_mask(), 0), box_mask().astype(np.float32))


def test_working_size_keeps_aspect_and_multiple():
    assert working_size((1000, 750), 512, 64) == (512, 384)
    assert working_size((50, 37), 32, 8) == (32, 24)
    assert working_size((10, 1000), 512, 64) == (64, 512)  # never below one multiple


def test_size_multiple_of_the_tiny_and_real_pipelines(inpaint_pipeline):
    assert size_multiple(inpaint_pipeline) == 8  # VAE x2, UNet x2 -> 4, and SD needs 8
    real = SimpleNamespace(  # SD 1.5: VAE x8, four UNet levels (x8)
        vae_scale_factor=8,
        unet=SimpleNamespace(config=SimpleNamespace(block_out_channels=(320, 640, 1280, 1280))),
    )
    assert size_multiple(real) == 64


# -- inpaint_with_mask -------------------------------------------------------------------------
def test_only_masked_pixels_change(inpaint_pipeline):
    image = gray_image(W, H)
    out = inpaint_with_mask(
        inpaint_pipeline, image, box_mask(), "a red fox", size=32, num_inference_steps=2
    )
    result = np.asarray(out)
    assert out.size == (W, H) and out.mode == "RGB"
    np.testing.assert_array_equal(result[~box_mask()], image[~box_mask()])
    assert not np.array_equal(result[box_mask()], image[box_mask()])


def test_mask_of_another_size_is_rejected(inpaint_pipeline):
    with pytest.raises(ValueError, match=r"\(36, 50\).*\(H, W\) = \(37, 50\)"):
        inpaint_with_mask(inpaint_pipeline, gray_image(W, H), np.zeros((36, 50), bool), "x")


# -- pipeline ----------------------------------------------------------------------------------
def edit(pipe, image, phrase, prompt=None, **kwargs):
    defaults = {"size": 32, "num_inference_steps": 2, "feather": 0, "dilate": 2}
    return pipe(image, phrase, prompt, **{**defaults, **kwargs})


def test_replace(fake_model, box_sam, inpaint_pipeline, monkeypatch):
    calls = count_pipeline_calls(inpaint_pipeline, monkeypatch)
    fake_model.enqueue(rec_answer())
    pipe = SphinxSamInpaintPipeline(fake_model, box_sam, inpaint_pipeline)
    image = Image.fromarray(gray_image(W, H))
    out = edit(pipe, image, "the dog", "a red fox", seed=4)
    assert out.found and out.image.size == (W, H) and out.seed == 4
    assert out.mask.shape == (H, W) and out.mask.sum() > box_mask().sum()  # dilated
    edited, original = np.asarray(out.image), np.asarray(image)
    np.testing.assert_array_equal(edited[~out.mask], original[~out.mask])
    assert len(out.detections) == 1 and out.detections.mask.shape == (1, H, W)
    assert "sentence describes: the dog." in fake_model.calls[0][0][0]
    ((call),) = calls
    assert call["prompt"] == "a red fox" and (call["width"], call["height"]) == (32, 24)
    assert out.prompt == "a red fox" and "blurry" in out.negative_prompt


def test_replace_is_deterministic_given_the_seed(fake_model, box_sam, inpaint_pipeline):
    pipe = SphinxSamInpaintPipeline(fake_model, box_sam, inpaint_pipeline)
    results = []
    for seed in (1, 1, 2):
        fake_model.enqueue(rec_answer())
        results.append(
            np.asarray(edit(pipe, gray_image(W, H), "the dog", "a fox", seed=seed).image)
        )
    np.testing.assert_array_equal(results[0], results[1])
    assert not np.array_equal(results[0], results[2])


def test_remove_mode_prompts(fake_model, box_sam, inpaint_pipeline, monkeypatch):
    calls = count_pipeline_calls(inpaint_pipeline, monkeypatch)
    fake_model.enqueue(rec_answer())
    pipe = SphinxSamInpaintPipeline(fake_model, box_sam, inpaint_pipeline)
    out = edit(pipe, gray_image(W, H), "the dog", mode="remove")
    assert out.found and out.prompt == REMOVE_PROMPT
    assert out.negative_prompt.startswith("the dog, object")
    assert calls[0]["negative_prompt"] == out.negative_prompt


def test_phrase_not_found_leaves_the_image(fake_model, box_sam, inpaint_pipeline, monkeypatch):
    calls = count_pipeline_calls(inpaint_pipeline, monkeypatch)
    fake_model.enqueue("I cannot find it.")
    image = gray_image(W, H)
    out = edit(
        SphinxSamInpaintPipeline(fake_model, box_sam, inpaint_pipeline),
        image,
        "a unicorn",
        "a horse",
    )
    assert not out.found and not out.mask.any() and out.mask.shape == (H, W)
    np.testing.assert_array_equal(np.asarray(out.image), image)
    assert calls == [] and box_sam.encoder_calls == 0


@pytest.mark.parametrize(
    "phrase, prompt, kwargs, match",
    [
        ("the dog", None, {}, "mode 'replace' needs a replacement `prompt`"),
        ("the dog", "x", {"mode": "erase"}, "`mode` must be one of"),
        ("", "x", {}, "`phrase` must name"),
        ("the dog", "x", {"dilate": -1}, "`dilate` must be an int >= 0"),
        ("the dog", "x", {"feather": 1.5}, "`feather` must be an int >= 0"),
    ],
)
def test_bad_arguments(fake_model, box_sam, inpaint_pipeline, phrase, prompt, kwargs, match):
    pipe = SphinxSamInpaintPipeline(fake_model, box_sam, inpaint_pipeline)
    with pytest.raises(ValueError, match=match):
        edit(pipe, gray_image(W, H), phrase, prompt, **kwargs)
    assert fake_model.calls == []
