"""Grounded editing: phrase -> SPHINX REC box -> SAM mask -> Stable Diffusion inpainting.

Two modes:

- ``replace``: the object is repainted from a replacement ``prompt`` ("a golden retriever").
- ``remove``: the hole is filled with background; the phrase goes into the negative prompt.
  SD tends to paint *something* into a hole; a large ``dilate`` and few steps help, and a
  dedicated eraser (LaMa) does better when it is available.

SAM masks hug the object, so SD would redraw the same silhouette: the mask given to SD is grown by
``dilate`` pixels, and the repainted pixels are blended back into the untouched original through
a mask softened by ``feather`` pixels. SD runs at a working size (longest side ``size``, a
multiple the UNet accepts) and the result is resized back, so any input size works::

    inpaint = StableDiffusionInpaintPipeline.from_pretrained("/ckpt/sd-inpaint",
                                                             local_files_only=True)
    pipe = SphinxSamInpaintPipeline(sphinx, load_sam("/ckpt/sam_vit_h.pth"), inpaint)
    out = pipe(photo, "the dog on the left", "a red fox", mode="replace", seed=3)
    out.image, out.mask
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import supervision as sv
import torch
from PIL import Image

from sphinx_tools.run import run_task

from .diffusion import DEFAULT_NEGATIVE_PROMPT
from .segment import as_rgb_array, segment_detections

MODES = ("replace", "remove")
REMOVE_PROMPT = "empty background, seamless natural continuation of the surroundings"
REMOVE_NEGATIVE_PROMPT = "{phrase}, object, person, animal, text, watermark, blurry"


# -- masks -----------------------------------------------------------------------------------------
def dilate_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow a mask by ``pixels`` in every direction (elliptical kernel).

    Args:
        mask: (H, W) bool.
        pixels: growth radius; 0 returns a copy.

    Returns:
        (H, W) bool.
    """
    mask = np.asarray(mask, bool)
    if pixels <= 0:
        return mask.copy()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def feather_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Soften a mask's edge over about ``pixels`` pixels (Gaussian blur).

    Args:
        mask: (H, W) bool.
        pixels: blur radius; 0 gives the hard mask as floats.

    Returns:
        (H, W) float32 in [0, 1].
    """
    soft = np.asarray(mask, np.float32)
    if pixels <= 0:
        return soft
    size = 2 * pixels + 1
    return np.clip(cv2.GaussianBlur(soft, (size, size), sigmaX=pixels / 2), 0.0, 1.0)


def working_size(image_wh, longest: int, multiple: int = 8) -> tuple[int, int]:
    "``(width, height)`` with the longest side near ``longest``, both multiples of ``multiple``."
    w, h = image_wh
    scale = longest / max(w, h)
    return tuple(max(multiple, int(round(v * scale / multiple)) * multiple) for v in (w, h))


def size_multiple(inpaint_pipeline) -> int:
    "The size granularity the pipeline accepts: VAE factor x UNet downsampling, and 8."
    unet_down = 2 ** (len(inpaint_pipeline.unet.config.block_out_channels) - 1)
    step = int(inpaint_pipeline.vae_scale_factor) * unet_down
    return step * 8 // math.gcd(step, 8)


# -- inpainting ------------------------------------------------------------------------------------
def inpaint_with_mask(
    inpaint_pipeline,
    image,
    mask: np.ndarray,
    prompt: str,
    *,
    negative_prompt: str = "",
    seed: int = 0,
    feather: int = 0,
    size: int = 512,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    strength: float = 1.0,
    **sd_kwargs,
) -> Image.Image:
    """Repaint ``mask`` of ``image`` with ``prompt`` and blend the result into the original.

    Args:
        inpaint_pipeline: a ``diffusers.StableDiffusionInpaintPipeline``.
        image: PIL image or HWC uint8 RGB array, any size.
        mask: (H, W) bool, true where to repaint; same size as ``image``.
        prompt: what to paint.
        negative_prompt: what not to paint ("" for none).
        seed: seed of the CPU ``torch.Generator``.
        feather: softening of the blend edge, in pixels of ``image``.
        size: SD working size (longest side, rounded to what the pipeline accepts).
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance scale.
        strength: how much of the masked area is re-noised (1.0 = all).
        **sd_kwargs: other arguments for the inpainting pipeline.

    Returns:
        RGB PIL image of the original size; pixels outside the (feathered) mask are unchanged.

    Raises:
        ValueError: if the mask is not (H, W) of the image.
    """
    original = as_rgb_array(image)
    h, w = original.shape[:2]
    mask = np.asarray(mask)
    if mask.shape != (h, w):
        raise ValueError(
            f"`mask` has shape {mask.shape} but the image is (H, W) = {(h, w)}; "
            "they must be the same size"
        )
    ww, wh = working_size((w, h), size, size_multiple(inpaint_pipeline))
    small = Image.fromarray(original).resize((ww, wh), Image.BICUBIC)
    small_mask = Image.fromarray(mask.astype(np.uint8) * 255).resize((ww, wh), Image.NEAREST)
    out = inpaint_pipeline(
        prompt=prompt,
        negative_prompt=negative_prompt or None,
        image=small,
        mask_image=small_mask,
        height=wh,
        width=ww,
        strength=strength,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator("cpu").manual_seed(int(seed)),
        output_type="pil",
        **sd_kwargs,
    )
    painted = np.asarray(out.images[0].convert("RGB").resize((w, h), Image.BICUBIC), np.float32)
    alpha = feather_mask(mask, feather)[:, :, None]  # (H, W, 1)
    blended = original.astype(np.float32) * (1 - alpha) + painted * alpha
    return Image.fromarray(np.clip(np.round(blended), 0, 255).astype(np.uint8))


@dataclass
class SphinxInpaintOutput:
    """Output of :class:`SphinxSamInpaintPipeline`.

    Attributes:
        image: the edited RGB PIL image, original size (a copy of the input when nothing was
            found).
        mask: (H, W) bool, the dilated mask that SD repainted (all false when nothing was found).
        detections: what SPHINX found for the phrase, with SAM masks (n, H, W).
        found: whether a non-empty mask was found and the image was edited.
        prompt: the SD prompt used.
        negative_prompt: the SD negative prompt used.
        seed: the generator seed.
    """

    image: Image.Image
    mask: np.ndarray
    detections: sv.Detections
    found: bool
    prompt: str
    negative_prompt: str
    seed: int


class SphinxSamInpaintPipeline:
    """Phrase -> REC box -> SAM mask -> SD inpainting (``replace`` or ``remove``).

    Args:
        sphinx: a model with ``generate(prompts, images, ...)`` (``sphinx_tools.SphinxModel``).
        sam_predictor: a ``segment_anything.SamPredictor``.
        inpaint_pipeline: a ``diffusers.StableDiffusionInpaintPipeline``.
    """

    def __init__(self, sphinx, sam_predictor, inpaint_pipeline):
        self.sphinx = sphinx
        self.sam_predictor = sam_predictor
        self.inpaint_pipeline = inpaint_pipeline

    def check_inputs(self, image, phrase, prompt, mode, dilate, feather) -> None:
        "Raises ValueError naming the bad value."
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
        if not isinstance(phrase, str) or not phrase.strip():
            raise ValueError(f"`phrase` must name the object to edit, got {phrase!r}")
        if mode == "replace" and (not isinstance(prompt, str) or not prompt.strip()):
            raise ValueError(f"mode 'replace' needs a replacement `prompt`, got {prompt!r}")
        for name, value in (("dilate", dilate), ("feather", feather)):
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"`{name}` must be an int >= 0 pixels, got {value!r}")
        as_rgb_array(image)

    def prompts(self, phrase, prompt, mode, negative_prompt) -> tuple[str, str]:
        "The SD prompt and negative prompt for the mode."
        if mode == "remove":
            default_negative = REMOVE_NEGATIVE_PROMPT.format(phrase=phrase.strip())
            return (
                prompt or REMOVE_PROMPT,
                default_negative if negative_prompt is None else negative_prompt,
            )
        return prompt, DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt

    def find(self, image, phrase: str, all_boxes=False, sphinx_kwargs=None) -> sv.Detections:
        "SPHINX's box for ``phrase`` (every box with ``all_boxes``): the ``rec`` task."
        return run_task(self.sphinx, image, "rec", expression=phrase, all_boxes=all_boxes,
                        **(sphinx_kwargs or {}))

    def segment(self, original: np.ndarray, boxes: sv.Detections, dilate: int):
        "``(detections with SAM masks, their union grown by dilate pixels)``."
        detections = segment_detections(self.sam_predictor, original, boxes)
        return detections, dilate_mask(detections.mask.any(axis=0), dilate)

    def __call__(
        self,
        image,
        phrase: str,
        prompt: str | None = None,
        *,
        mode: str = "replace",
        negative_prompt: str | None = None,
        dilate: int = 10,
        feather: int = 4,
        seed: int = 0,
        size: int = 512,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        strength: float = 1.0,
        all_boxes: bool = False,
        sphinx_kwargs: dict | None = None,
        sd_kwargs: dict | None = None,
    ) -> SphinxInpaintOutput:
        """Find ``phrase`` in the image and repaint it.

        Args:
            image: PIL image or HWC uint8 RGB array, any size.
            phrase: the referring expression of the object to edit ("the cup on the left").
            prompt: ``replace``: what to paint instead (required); ``remove``: overrides the
                background prompt.
            mode: ``"replace"`` or ``"remove"``.
            negative_prompt: overrides the mode's default negative prompt.
            dilate: pixels the SAM mask grows before inpainting.
            feather: pixels of soft blending at the mask edge.
            seed: generator seed.
            size: SD working size (longest side).
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance scale.
            strength: how much of the masked area is re-noised.
            all_boxes: edit every box SPHINX gives for the phrase, not only the first.
            sphinx_kwargs: generation arguments for ``run_task``.
            sd_kwargs: other arguments for the inpainting pipeline.

        Returns:
            :class:`SphinxInpaintOutput`; ``found`` is false and the image unchanged when SPHINX
            finds no box or SAM an empty mask.
        """
        # 1. Check inputs
        self.check_inputs(image, phrase, prompt, mode, dilate, feather)
        sd_prompt, sd_negative = self.prompts(phrase, prompt, mode, negative_prompt)
        original = as_rgb_array(image)
        # 2. Find the phrase (REC)
        boxes = self.find(image, phrase, all_boxes, sphinx_kwargs)
        # 3. Segment it (SAM) and grow the mask
        detections, mask = self.segment(original, boxes, dilate)
        if not mask.any():
            unchanged = Image.fromarray(original.copy())
            return SphinxInpaintOutput(unchanged, mask, detections, False, sd_prompt, sd_negative,
                                       seed)
        # 4. Inpaint the grown mask and blend it back
        edited = inpaint_with_mask(
            self.inpaint_pipeline,
            original,
            mask,
            sd_prompt,
            negative_prompt=sd_negative,
            seed=seed,
            feather=feather,
            size=size,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            strength=strength,
            **(sd_kwargs or {}),
        )
        # 5. Output
        return SphinxInpaintOutput(edited, mask, detections, True, sd_prompt, sd_negative, seed)
