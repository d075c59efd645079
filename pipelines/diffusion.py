"""SPHINX + Stable Diffusion: describe an image with SPHINX, turn it into an SD prompt, generate.

The prompt is ``template.format(description=..., style=...)`` and must fit the text encoder's
window (77 CLIP tokens, counted with the SD pipeline's own tokenizer). When it is too long whole
clauses are dropped, never parts of words: first the description's trailing clauses (so a
detailed description keeps its opening), then the style's trailing clauses, and only if the first
description clause alone is still too long, its trailing words.

The caller loads the SD pipeline from a local folder::

    sd = StableDiffusionPipeline.from_pretrained("/ckpt/sd-1.5", local_files_only=True)
    pipe = SphinxStableDiffusionPipeline(sphinx, sd)
    out = pipe(photo, source="detailed", num_images_per_prompt=2, seed=7)
    out.images[0], out.prompts[0], out.seeds[0]

Every generated image has its own seed and a CPU ``torch.Generator``, so a (prompt, seed) pair
gives the same image whatever else is in the batch and on whichever device the components live.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from sphinx_tools.annotations import CAPTION_FIELD
from sphinx_tools.run import run_task

DEFAULT_TEMPLATE = "{description}, {style}"
DEFAULT_STYLE = "high quality photograph, detailed, natural lighting, sharp focus"
DEFAULT_NEGATIVE_PROMPT = "blurry, low quality, lowres, deformed, distorted, watermark, text"
SOURCES = ("caption", "detailed", "objects")
_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+")
_CLAUSE_RE = re.compile(r"\s*[,;]\s+|\s*[,;]$")


# -- prompt text -----------------------------------------------------------------------------------
def split_clauses(text: str) -> list[str]:
    """A description's sentences, each split at ``,``/``;``, without end punctuation.

    ``"A dog runs. It is brown, small"`` -> ``["A dog runs", "It is brown", "small"]``.
    Commas inside numbers (``1,000``) do not split.
    """
    clauses = []
    for sentence in _SENTENCE_RE.split(" ".join(text.split())):
        for clause in _CLAUSE_RE.split(sentence):
            clause = clause.strip().rstrip(".!?").strip()
            if clause:
                clauses.append(clause)
    return clauses


def count_tokens(tokenizer, text: str) -> int:
    "Tokens the text encoder sees for ``text``, with the start and end tokens."
    return len(tokenizer(text, truncation=False).input_ids)


def token_limit(tokenizer, max_tokens: int | None = None) -> int:
    "``max_tokens``, else the tokenizer's ``model_max_length`` (77 for CLIP)."
    limit = max_tokens or tokenizer.model_max_length
    if not 2 < limit < 100_000:
        raise ValueError(
            f"token limit {limit!r} is not usable; set `max_tokens` or the tokenizer's "
            "`model_max_length` (77 for CLIP)"
        )
    return int(limit)


def build_sd_prompt(
    description: str,
    tokenizer,
    *,
    style: str = DEFAULT_STYLE,
    template: str = DEFAULT_TEMPLATE,
    max_tokens: int | None = None,
) -> str:
    """A Stable Diffusion prompt from a description that fits the tokenizer's window.

    Args:
        description: free text (a SPHINX caption, detailed description or object list); may be
            empty (the prompt is then the style alone).
        tokenizer: the SD pipeline's tokenizer (``pipe.tokenizer``), used to count tokens.
        style: comma-separated style clauses appended by the template ("" for none).
        template: ``str.format`` string with ``{description}`` and ``{style}``.
        max_tokens: token budget including start/end tokens (default: ``model_max_length``).

    Returns:
        The prompt; ``count_tokens(tokenizer, prompt) <= max_tokens``.

    Raises:
        ValueError: when description and style are both empty, for a template without
            ``{description}`` or a budget that cannot hold the template's fixed text.
    """
    if "{description}" not in template:
        raise ValueError(f"`template` must contain {{description}}, got {template!r}")
    clauses, styles = split_clauses(description), split_clauses(style)
    if not clauses and not styles:
        raise ValueError(
            f"no words to build a prompt from: description {description!r}, style {style!r}"
        )
    limit = token_limit(tokenizer, max_tokens)

    def render(desc, sty):
        text = template.format(description=", ".join(desc), style=", ".join(sty))
        return " ".join(text.replace(" ,", ",").split()).strip(" ,")

    while count_tokens(tokenizer, render(clauses, styles)) > limit:
        if len(clauses) > 1:
            clauses = clauses[:-1]
        elif styles:
            styles = styles[:-1]
        elif clauses and len(clauses[0].split()) > 1:
            clauses = [clauses[0].rsplit(" ", 1)[0]]
        else:
            raise ValueError(
                f"template {template!r} does not fit in {limit} tokens even with one word"
            )
    return render(clauses, styles)


def describe_objects(sphinx, image, max_objects: int = 5, sphinx_kwargs=None) -> list[str]:
    """Per-object descriptions: SPHINX detects objects, then describes the largest ones (REG).

    Returns:
        Up to ``max_objects`` descriptions, largest object first (so prompt trimming drops the
        smallest objects first).
    """
    found = run_task(sphinx, image, "detection", **(sphinx_kwargs or {}))
    if len(found) == 0:
        return []
    order = np.argsort(-found.box_area, kind="stable")[:max_objects]
    regions = [tuple(found.xyxy[i]) for i in order]
    described = run_task(sphinx, image, "reg", regions=regions, **(sphinx_kwargs or {}))
    return [str(c) for c in described.data.get(CAPTION_FIELD, []) if str(c).strip()]


def describe_image(sphinx, image, source: str = "caption", sphinx_kwargs=None) -> str:
    """SPHINX's description of an image for prompting.

    Args:
        source: ``"caption"`` (one sentence), ``"detailed"`` (detailed description) or
            ``"objects"`` (the caption followed by per-object descriptions).
    """
    kwargs = sphinx_kwargs or {}
    variant = "detailed" if source == "detailed" else "default"
    caption = run_task(sphinx, image, "caption", variant=variant, **kwargs)
    if source != "objects":
        return caption
    return ", ".join([caption.strip().rstrip("."), *describe_objects(sphinx, image, 5, kwargs)])


# -- generation ------------------------------------------------------------------------------------
def seeds_for(count: int, seed) -> list[int]:
    """One seed per image: ``seed, seed + 1, ...`` for an int, or the list as given.

    Raises:
        ValueError: if a list does not have ``count`` ints.
    """
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + i for i in range(count)]
    seeds = [int(s) for s in seed]
    if len(seeds) != count:
        raise ValueError(f"`seed` must be an int or {count} ints (one per image), got {seed!r}")
    return seeds


def generate_images(sd_pipeline, prompts, seeds, negative_prompt="", **sd_kwargs) -> list:
    """One image per ``(prompt, seed)`` with a Stable Diffusion pipeline.

    Prompts that repeat are generated in one call (a CPU generator per image), so the image for a
    given prompt and seed does not depend on the batch.

    Args:
        sd_pipeline: a ``diffusers.StableDiffusionPipeline`` (any device/dtype).
        prompts: m prompts (one per image).
        seeds: m seeds.
        negative_prompt: one negative prompt for all images.
        **sd_kwargs: passed on (``num_inference_steps``, ``guidance_scale``, ``height``...).

    Returns:
        m PIL images, in order.
    """
    images = [None] * len(prompts)
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    for prompt, rows in groups.items():
        generators = [torch.Generator("cpu").manual_seed(seeds[i]) for i in rows]
        out = sd_pipeline(
            prompt=prompt,
            negative_prompt=negative_prompt or None,
            num_images_per_prompt=len(rows),
            generator=generators,
            output_type="pil",
            **sd_kwargs,
        )
        for i, img in zip(rows, out.images, strict=True):
            images[i] = img
    return images


@dataclass
class SphinxDiffusionOutput:
    """Output of :class:`SphinxStableDiffusionPipeline`.

    Attributes:
        images: the generated PIL images, ``num_images_per_prompt`` per source image, in order.
        prompts: the SD prompt of each image.
        negative_prompts: the negative prompt of each image.
        seeds: the seed of each image (its CPU ``torch.Generator`` seed).
        descriptions: SPHINX's description of each source image (before prompt fitting).
    """

    images: list
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    descriptions: list[str] = field(default_factory=list)


class SphinxStableDiffusionPipeline:
    """Image -> SPHINX description -> fitted SD prompt -> new images.

    Args:
        sphinx: a model with ``generate(prompts, images, ...)`` (``sphinx_tools.SphinxModel``).
        sd_pipeline: a ``diffusers.StableDiffusionPipeline``; its tokenizer counts prompt tokens.
    """

    def __init__(self, sphinx, sd_pipeline):
        self.sphinx = sphinx
        self.sd_pipeline = sd_pipeline

    def check_inputs(self, images, source, num_images_per_prompt, height, width) -> None:
        "Raises ValueError naming the bad value."
        if not images:
            raise ValueError("`image` must be an image or a non-empty list of images, got []")
        if source not in SOURCES:
            raise ValueError(f"`source` must be one of {SOURCES}, got {source!r}")
        if num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be >= 1, got {num_images_per_prompt}")
        for name, value in (("height", height), ("width", width)):
            if value is not None and value % 8:
                raise ValueError(f"`{name}` must be divisible by 8, got {value}")

    def describe(self, images, source: str, sphinx_kwargs=None) -> list[str]:
        "SPHINX's description of each image (see :func:`describe_image`)."
        return [describe_image(self.sphinx, img, source, sphinx_kwargs) for img in images]

    def fit_prompts(self, descriptions, style: str, template: str) -> list[str]:
        """One SD prompt per description, fitted to the text encoder's window; warns for an
        empty description (its prompt is the style alone)."""
        tokenizer = self.sd_pipeline.tokenizer
        for i, description in enumerate(descriptions):
            if not split_clauses(description):
                warnings.warn(
                    f"SPHINX gave no description for image {i}; its prompt is the style alone",
                    RuntimeWarning,
                    stacklevel=3,  # the pipeline's caller
                )
        return [build_sd_prompt(d, tokenizer, style=style, template=template)
                for d in descriptions]

    def __call__(
        self,
        image,
        *,
        source: str = "caption",
        style: str = DEFAULT_STYLE,
        template: str = DEFAULT_TEMPLATE,
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
        num_images_per_prompt: int = 1,
        seed: int | list[int] = 0,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        sphinx_kwargs: dict | None = None,
        sd_kwargs: dict | None = None,
    ) -> SphinxDiffusionOutput:
        """Describe each image with SPHINX and generate new images from the descriptions.

        Args:
            image: one source image or a list (PIL or HWC uint8 arrays).
            source: what SPHINX writes: ``"caption"``, ``"detailed"`` or ``"objects"``.
            style: style clauses for the template (dropped last-first if the prompt is long).
            template: ``str.format`` string with ``{description}`` and ``{style}``.
            negative_prompt: the SD negative prompt ("" for none).
            num_images_per_prompt: images per source image.
            seed: first seed (image i gets ``seed + i``) or one seed per generated image.
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance scale.
            height: image height (divisible by 8); the UNet's default if ``None``.
            width: image width (divisible by 8); the UNet's default if ``None``.
            sphinx_kwargs: generation arguments for ``run_task``.
            sd_kwargs: other arguments for the SD pipeline call.

        Returns:
            :class:`SphinxDiffusionOutput`.
        """
        # 1. Check inputs
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        self.check_inputs(images, source, num_images_per_prompt, height, width)
        seeds = seeds_for(len(images) * num_images_per_prompt, seed)
        # 2. Ask SPHINX for a description of each image
        descriptions = self.describe(images, source, sphinx_kwargs)
        # 3. Descriptions -> prompts that fit the text encoder
        fitted = self.fit_prompts(descriptions, style, template)
        prompts = [p for p in fitted for _ in range(num_images_per_prompt)]
        # 4. Generate, one seeded generator per image
        generated = generate_images(
            self.sd_pipeline,
            prompts,
            seeds,
            negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            **(sd_kwargs or {}),
        )
        # 5. Output
        return SphinxDiffusionOutput(
            images=generated,
            prompts=prompts,
            negative_prompts=[negative_prompt] * len(prompts),
            seeds=seeds,
            descriptions=descriptions,
        )
