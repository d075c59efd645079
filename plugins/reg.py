"""REG: a region (pixels) -> its short description.

docs/formats.md §4.3: prompt and output UNKNOWN.

The region goes into the prompt in SPHINX's coordinate form, ``[x1,y1,x2,y2]`` fractions of the
padded square with 2 decimals and no spaces. The default wording is LLaVA-1.5's REG prompt
(SPHINX's REC prompt is LLaVA-1.5's word for word); override it if a checkpoint answers badly.
"""

import numpy as np

from sphinx_tools.annotations import CAPTION_FIELD, build_detections, merge_detections
from sphinx_tools.hookspecs import hookimpl
from sphinx_tools.parsing import region_text, strip_markup
from sphinx_tools.tasks import DetectionsTask, TaskOptions, split_per

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
        return split_per(options, "regions", "region")

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
