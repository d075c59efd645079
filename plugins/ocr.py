"""OCR: text spotting with boxes, or plain text reading (docs/formats.md §4.7).

Spotting (default variant; prompt VERIFIED, output INFERRED): ``<p>{text}</p> [box]`` per word or
line, one ``sv.Detections`` row per box with the string in ``data["text"]``. The phrase is the text
between ``<p>`` and the nearest ``</p>``, so brackets or digits inside the string do not break it.
SPHINX-X writes no tags (``There are "Virtual[b1], Office[b2], ..., and Competence[bn] in the
image.``): the string of a bare bracket is the word right before it, quotes trimmed.

Reading (``variant="read"``; prompt UNKNOWN): the answer is plain text; the result is one row
covering the whole image with that text.
"""

import numpy as np

from sphinx_tools.annotations import TEXT_FIELD
from sphinx_tools.hookspecs import hookimpl
from sphinx_tools.parsing import (
    GroundedBox,
    find_mentions,
    ground_boxes,
    name_bare_boxes,
    strip_markup,
)
from sphinx_tools.tasks import DetectionsTask, TaskOptions

TEXT_CLASS = "text"


class Ocr(DetectionsTask):
    "Text spotting -> ``sv.Detections`` with ``data['text']``; ``variant='read'``: plain reading."

    name = "ocr"
    description = "Text spotting with boxes; variant 'read' for plain text reading"
    templates = {
        "default": "Please detect all texts and provide their bounding box coordinate.",
        "read": "Please read all the text in the image.",
    }
    Options = TaskOptions
    max_gen_len = 1024

    def parse_answer(self, answer, image_wh, opts):
        if opts.variant == "read":
            return self._read(answer, image_wh, opts)
        mentions = find_mentions(answer.text, opts.recover_decimals)
        boxes, notes = ground_boxes(
            answer, image_wh, mentions, opts.recover_decimals, opts.max_objects
        )
        if not boxes:
            return self.empty(answer, image_wh, opts, notes + ["no text box found"])
        name_bare_boxes(answer.text, mentions, boxes, word=True)  # tag-less: "Virtual[...]"
        for box in boxes:
            if not box.phrase:
                box.notes.append("box without text")
        texts = [box.phrase or "" for box in boxes]
        return self.detections(
            answer, boxes, notes, [TEXT_CLASS] * len(boxes), data={TEXT_FIELD: texts}
        )

    def _read(self, answer, image_wh, opts):
        text = strip_markup(answer.text)
        if not text:
            return self.empty(answer, image_wh, opts, ["empty answer"])
        w, h = image_wh
        whole = GroundedBox(
            None,
            np.array([0.0, 0.0, w, h]),
            np.array([0.0, 0.0, 1.0, 1.0]),
            [(0, len(answer.text))],
            ["whole image: text read without boxes"],
        )
        return self.detections(answer, [whole], [], [TEXT_CLASS], data={TEXT_FIELD: [text]})

    def empty(self, answer, image_wh, opts, notes=()):
        detections = super().empty(answer, image_wh, opts, notes)
        detections.data[TEXT_FIELD] = np.array([], dtype=str)
        return detections


@hookimpl
def register_tasks(register):
    register(Ocr())
