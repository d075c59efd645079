"""REG: a region (pixels) -> its short description (formats doc §4.3; prompt and output UNKNOWN).

The region goes into the prompt in SPHINX's coordinate form, ``[x1,y1,x2,y2]`` fractions of the
padded square with 2 decimals and no spaces. The default wording is LLaVA-1.5's REG prompt
(SPHINX's REC prompt is LLaVA-1.5's word for word); override it if a checkpoint answers badly.
"""

import numpy as np

from sphinx_tools.annotations import CAPTION_FIELD, build_detections, merge_detections
from sphinx_tools.hookspecs import hookimpl
from sphinx_tools.parsing import format_box, strip_markup
from sphinx_tools.tasks import DetectionsTask, TaskOptions
from sphinx_tools.transforms import PaddedResize

Box = tuple[float, float, float, float]


class RegOptions(TaskOptions):
    """Attributes:
    region: ``[x1, y1, x2, y2]`` pixels of the original image.
    regions: several regions, asked one by one by ``run_task``.
    image_size: ``(width, height)``; needed to put the region into the prompt.
    """

    region: Box | None = None
    regions: list[Box] | None = None
    image_size: tuple[int, int] | None = None


def region_text(region, image_size, task: str) -> str:
    "Pixel box -> ``[0.12,0.34,0.56,0.78]`` in padded-square fractions (ValueError if unusable)."
    if region is None or image_size is None:
        raise ValueError(
            f"task {task!r} needs `region` (pixels x1, y1, x2, y2) and `image_size` "
            f"(width, height), got region={region!r}, image_size={image_size!r}"
        )
    x1, y1, x2, y2 = region
    if not (x2 > x1 and y2 > y1) or not np.isfinite(region).all():
        raise ValueError(f"`region` must be x1 < x2, y1 < y2 in pixels, got {region!r}")
    return format_box(np.clip(PaddedResize().to_model_xyxy([region], image_size)[0], 0.0, 1.0))


class Reg(DetectionsTask):
    "Region captioning: ``sv.Detections`` with the region box and ``data['caption']``."

    name = "reg"
    description = "Referring expression generation: region -> short description"
    templates = {"default": "Please provide a short description for this region: {region}"}
    Options = RegOptions
    max_gen_len = 64

    def prompt_fields(self, opts):
        return {"region": region_text(opts.region, opts.image_size, self.name)}

    def split(self, **options):
        regions = options.pop("regions", None)
        if regions is None:
            return [options]
        if len(regions) == 0:
            return []  # nothing to ask about: run_task returns an empty result
        return [{**options, "region": tuple(r)} for r in regions]

    def merge(self, results):
        return merge_detections(results)

    def parse_answer(self, answer, image_wh, opts):
        caption = strip_markup(answer.text)
        if not caption:
            return self.empty(answer, image_wh, opts, ["empty answer"])
        notes = []
        if opts.region is None:
            box = np.array([0, 0, *image_wh], dtype=np.float64)
            notes.append("no region given: box is the whole image")
        else:
            box = np.clip(np.asarray(opts.region, dtype=np.float64), 0, [*image_wh, *image_wh])
        confidence = answer.confidence([(0, len(answer.text))])
        return self._single(answer, box, caption, confidence, notes)

    def _single(self, answer, box, caption, confidence, notes):
        return build_detections(
            box[None],
            class_name=[caption],
            data={CAPTION_FIELD: [caption]},
            confidence=None if confidence is None else [confidence],
            notes=[[]],
            raw_text=answer.raw,
            answer_notes=notes,
        )

    def empty(self, answer, image_wh, opts, notes=()):
        return build_detections(
            np.empty((0, 4)),
            data={CAPTION_FIELD: []},
            raw_text=answer.raw,
            answer_notes=list(notes),
        )


@hookimpl
def register_tasks(register):
    register(Reg())
