"""Synthetic training data: prompts (or class names) -> Stable Diffusion images -> SPHINX labels
-> a COCO dataset whose image records say where each image came from.

The labeling step is any callable ``labeler(image) -> sv.Detections`` (pixel ``xyxy``, a
``data["class_name"]`` column, optional ``mask`` and ``confidence``). The default,
:class:`SphinxLabeler`, asks SPHINX one task per image with ``run_task``; a SAM-backed labeler or
the project's labeling engine can be dropped in without touching the loop. Images are written to
disk as they are made and not kept in memory::

    sd = StableDiffusionPipeline.from_pretrained("/ckpt/sd-1.5", local_files_only=True)
    pipe = SphinxSyntheticDataPipeline(sphinx, sd)
    out = pipe(classes=["dog", "bicycle"], out_dir="synthetic/", images_per_prompt=4, seed=0)
    out.coco_path  # synthetic/annotations.json, images under synthetic/images/

Each image record carries ``prompt``, ``negative_prompt``, ``seed``, ``model`` (the SD
pipeline's ``name_or_path``) and ``labeler``. Same arguments and seeds -> the same files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import supervision as sv

from sphinx_tools.annotations import CLASS_NAME_FIELD
from sphinx_tools.coco import coco_annotation, coco_categories, encode_rle, write_json
from sphinx_tools.run import run_task

from .diffusion import (
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_STYLE,
    build_sd_prompt,
    generate_images,
    seeds_for,
)

LABEL_TASKS = ("detection", "layout", "ocr")
CLASS_PROMPT = "a photo of {article} {name}"


def class_prompt(name: str) -> str:
    """``"dog"`` -> ``"a photo of a dog"``, ``"apple"`` -> ``"a photo of an apple"``."""
    article = "an" if name.strip()[:1].lower() in "aeiou" else "a"
    return CLASS_PROMPT.format(article=article, name=name.strip())


class SphinxLabeler:
    """The default labeling step: one SPHINX task per image.

    Args:
        sphinx: a model with ``generate(prompts, images, ...)``.
        task: a task whose result is ``sv.Detections`` (``detection``, ``layout``, ``ocr``).
        classes: for ``detection``: the classes to ask for (``None``: all objects).
        sphinx_kwargs: generation arguments for ``run_task``.
    """

    def __init__(self, sphinx, task: str = "detection", classes=None, sphinx_kwargs=None):
        if task not in LABEL_TASKS:
            raise ValueError(f"`task` must be one of {LABEL_TASKS} for labeling, got {task!r}")
        self.sphinx = sphinx
        self.task = task
        self.options = {"classes": list(classes)} if classes and task == "detection" else {}
        self.sphinx_kwargs = sphinx_kwargs or {}
        path = getattr(sphinx, "load_stats", {}).get("path")
        self.name = f"sphinx-tools {task}" + (f" ({path})" if path else "")

    def __call__(self, image) -> sv.Detections:
        return run_task(self.sphinx, image, self.task, **self.sphinx_kwargs, **self.options)


# -- COCO ------------------------------------------------------------------------------------------
def _annotation(detections: sv.Detections, row: int, ann_id: int, image_id: int, cat_id: int):
    """One row as a COCO annotation: ``area`` the mask's pixels if there is a mask, else the
    box's; ``score`` when known; the mask as compressed RLE ``segmentation``."""
    extra, area = {}, None
    if detections.confidence is not None and np.isfinite(detections.confidence[row]):
        extra["score"] = float(detections.confidence[row])
    if detections.mask is not None:
        extra["segmentation"] = encode_rle(detections.mask[row])
        area = int(detections.mask[row].sum())
    return coco_annotation(ann_id, image_id, cat_id, detections.xyxy[row], area=area, digits=2,
                           **extra)


def build_coco(records: list[dict], detections: list[sv.Detections], classes=None) -> dict:
    """A COCO dict from image records and their detections.

    Args:
        records: one dict per image with at least ``id``, ``file_name``, ``width``, ``height``
            (extra keys, e.g. provenance, are kept in the image record).
        detections: one ``sv.Detections`` per record, names in ``data["class_name"]``.
        classes: category names to list first (ids 1..k, in order); other names follow in
            order of appearance.

    Returns:
        ``{"info", "images", "annotations", "categories"}`` with unique annotation ids from 1.
    """
    names = list(classes or [])
    annotations = []
    for record, dets in zip(records, detections, strict=True):
        labels = dets.data.get(CLASS_NAME_FIELD, ["object"] * len(dets))
        for row, label in enumerate(labels):
            label = str(label) or "object"
            if label not in names:
                names.append(label)
            annotations.append(
                _annotation(dets, row, len(annotations) + 1, record["id"], names.index(label) + 1)
            )
    return {
        "info": {
            "description": "sphinx-tools synthetic data",
            "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "images": records,
        "annotations": annotations,
        "categories": coco_categories(names),
    }


def model_name(sd_pipeline) -> str:
    "Provenance name of an SD pipeline: its ``name_or_path``, else its class name."
    return getattr(sd_pipeline, "name_or_path", None) or type(sd_pipeline).__name__


# -- pipeline --------------------------------------------------------------------------------------
@dataclass
class SyntheticDataOutput:
    """Output of :class:`SphinxSyntheticDataPipeline`.

    Attributes:
        coco_path: the written ``annotations.json``.
        coco: the COCO dict that was written.
        image_paths: the written images, in order (``out_dir/images/000000.png``, ...).
        detections: the labeler's ``sv.Detections`` per image.
    """

    coco_path: Path
    coco: dict
    image_paths: list[Path] = field(default_factory=list)
    detections: list[sv.Detections] = field(default_factory=list)


class SphinxSyntheticDataPipeline:
    """Prompts or class names -> SD images -> labels -> COCO with provenance.

    Args:
        sphinx: a model with ``generate(prompts, images, ...)``; used by the default labeler.
        sd_pipeline: a ``diffusers.StableDiffusionPipeline``.
        labeler: ``labeler(image) -> sv.Detections``; default :class:`SphinxLabeler` with
            ``task`` and the call's ``classes``.
    """

    def __init__(self, sphinx, sd_pipeline, labeler: Callable | None = None):
        self.sphinx = sphinx
        self.sd_pipeline = sd_pipeline
        self.labeler = labeler

    def check_inputs(self, prompts, classes, images_per_prompt, out_dir) -> None:
        "Raises ValueError naming the bad value."
        if (prompts is None) == (classes is None):
            raise ValueError(
                "give either `prompts` or `classes` (class names), not both or neither"
            )
        items = prompts if prompts is not None else classes
        if (
            isinstance(items, str)
            or not items
            or not all(isinstance(p, str) and p.strip() for p in items)
        ):
            name = "prompts" if prompts is not None else "classes"
            raise ValueError(
                f"`{name}` must be a non-empty list of non-empty strings, got {items!r}"
            )
        if images_per_prompt < 1:
            raise ValueError(f"`images_per_prompt` must be >= 1, got {images_per_prompt}")
        if out_dir is None:
            raise ValueError("`out_dir` is required: images and annotations are written there")

    def __call__(
        self,
        prompts: list[str] | None = None,
        *,
        classes: list[str] | None = None,
        out_dir,
        images_per_prompt: int = 1,
        seed: int | list[int] = 0,
        style: str = DEFAULT_STYLE,
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
        task: str = "detection",
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        sphinx_kwargs: dict | None = None,
        sd_kwargs: dict | None = None,
    ) -> SyntheticDataOutput:
        """Generate, label and write a COCO dataset.

        Args:
            prompts: SD prompts (used as given, fitted to the token window).
            classes: class names instead of prompts: one ``"a photo of a {name}"`` prompt per
                class (with ``style``); the default labeler then detects exactly these classes.
            out_dir: folder for ``images/`` and ``annotations.json``.
            images_per_prompt: images per prompt.
            seed: first seed (image i gets ``seed + i``) or one seed per image.
            style: style clauses appended to class prompts.
            negative_prompt: SD negative prompt.
            task: the default labeler's task (``detection``, ``layout``, ``ocr``).
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance scale.
            height: image height (divisible by 8), or the UNet's default.
            width: image width (divisible by 8), or the UNet's default.
            sphinx_kwargs: generation arguments for the default labeler.
            sd_kwargs: other arguments for the SD pipeline.

        Returns:
            :class:`SyntheticDataOutput`.
        """
        # 1. Check inputs
        self.check_inputs(prompts, classes, images_per_prompt, out_dir)
        labeler = self.labeler or SphinxLabeler(self.sphinx, task, classes, sphinx_kwargs)
        # 2. Prompts, one per image, and seeds
        tokenizer = self.sd_pipeline.tokenizer
        if classes is not None:
            base = [build_sd_prompt(class_prompt(c), tokenizer, style=style) for c in classes]
        else:
            base = [build_sd_prompt(p, tokenizer, style="") for p in prompts]
        per_image = [p for p in base for _ in range(images_per_prompt)]
        seeds = seeds_for(len(per_image), seed)
        images_dir = Path(out_dir) / "images"
        images_dir.mkdir(parents=True, exist_ok=True)
        records, detections, paths = [], [], []
        for index, (prompt, image_seed) in enumerate(zip(per_image, seeds, strict=True)):
            # 3. Generate one image and write it
            (image,) = generate_images(
                self.sd_pipeline,
                [prompt],
                [image_seed],
                negative_prompt,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                **(sd_kwargs or {}),
            )
            path = images_dir / f"{index:06d}.png"
            image.save(path)
            # 4. Label it
            detections.append(labeler(image))
            records.append(
                self.record(
                    index,
                    path.relative_to(out_dir),
                    image,
                    prompt,
                    negative_prompt,
                    image_seed,
                    labeler,
                )
            )
            paths.append(path)
        # 5. Write COCO
        coco = build_coco(records, detections, classes)
        coco_path = write_json(Path(out_dir) / "annotations.json", coco)
        return SyntheticDataOutput(coco_path, coco, paths, detections)

    def record(self, index, file_name, image, prompt, negative_prompt, seed, labeler) -> dict:
        "A COCO image record with provenance."
        return {
            "id": index + 1,
            "file_name": str(file_name),
            "width": image.width,
            "height": image.height,
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "seed": int(seed),
            "model": model_name(self.sd_pipeline),
            "labeler": getattr(labeler, "name", None) or repr(labeler),
        }
