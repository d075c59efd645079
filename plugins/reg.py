"""REG: a region (pixels) -> its short description; or several marks -> one description each.

docs/formats.md §4.3. Default variant: prompt and output UNKNOWN.

The region goes into the prompt in SPHINX's coordinate form, ``[x1,y1,x2,y2]`` fractions of the
padded square with 2 decimals and no spaces. The default wording is LLaVA-1.5's REG prompt
(SPHINX's REC prompt is LLaVA-1.5's word for word); override it if a checkpoint answers badly.

Marks (variants ``marks`` and ``marks_detailed``, chosen automatically when ``marks`` are given;
SPHINX-X's set-of-marks prompt, VERIFIED in its paper): every mark is asked in one question,
``Provide a short description for each of the marks I've offered: <Mark 1> [0.56, 0.24], <Mark 2>
[0.76, 0.50]``, and answered as ``- Mark 1: ...`` lines; each mark gets one row with its box (a
point mark's box has no area: ``[x, y, x, y]``), ``data["caption"]`` and ``data["mark"]`` (1-based).
"""

import re

import numpy as np

from sphinx_tools.annotations import CAPTION_FIELD, build_detections, merge_detections
from sphinx_tools.hookspecs import hookimpl
from sphinx_tools.parsing import MAX_PHRASES, region_text, strip_markup
from sphinx_tools.tasks import DetectionsTask, TaskOptions, split_per
from sphinx_tools.transforms import PaddedResize

Box = tuple[float, float, float, float]
Point = tuple[float, float]
MARK_FIELD = "mark"  # marks: the mark's number, 1-based
# "Mark 3:" (also "<Mark 3>:"); bounded repeats keep the scan linear
_MARK_RE = re.compile(r"(?<![\w<])<?mark[ \t]{0,3}(\d{1,4})>?[ \t]{0,3}:", re.IGNORECASE)
_BULLETS = "-*\u2022 \t\r\n"


class RegOptions(TaskOptions):
    """Attributes:
    region: ``[x1, y1, x2, y2]`` pixels of the original image.
    regions: several regions, asked one by one by ``run_task``.
    marks: several marks asked in one question, each a pixel point ``(x, y)`` or box
        ``(x1, y1, x2, y2)``; selects the ``marks`` variant unless another is named.
    image_size: ``(width, height)``; needed to put the region into the prompt.
    """

    region: Box | None = None
    regions: list[Box] | None = None
    marks: list[Point | Box] | None = None
    image_size: tuple[int, int] | None = None


def marks_text(marks, image_size) -> str:
    """``<Mark 1> [0.56, 0.24], <Mark 2> [0.10, 0.20, 0.30, 0.40]``: pixel marks in prompt form.

    Raises:
        ValueError: when the marks or the image size are missing or unusable.
    """
    if not marks or image_size is None:
        raise ValueError(
            "task 'reg' (marks) needs `marks` (pixel points or boxes) and `image_size` "
            f"(width, height), got marks={marks!r}, image_size={image_size!r}"
        )
    pieces = []
    for i, mark in enumerate(marks, 1):
        if len(mark) == 2:
            if not np.isfinite(mark).all():
                raise ValueError(f"`marks` {i} must be finite pixels (x, y), got {mark!r}")
            values = np.clip(PaddedResize().to_model_xy([mark], image_size)[0], 0.0, 1.0)
        else:
            values = region_text(mark, image_size, "reg", "marks")[1:-1].split(",")
        pieces.append(f"<Mark {i}> [" + ", ".join(f"{float(v):.2f}" for v in values) + "]")
    return ", ".join(pieces)


def find_mark_descriptions(text: str):
    """``[(mark, description, span)]`` in text order: the text after each ``Mark k:``.

    A description runs to the next ``Mark k:``; bullets and whitespace around it are trimmed and
    inner whitespace is collapsed. At most :data:`MAX_PHRASES` marks are read.
    """
    found = []
    matches = _MARK_RE.finditer(text)
    m = next(matches, None)
    while m is not None and len(found) < MAX_PHRASES:
        following = next(matches, None)
        end = following.start() if following is not None else len(text)
        raw = text[m.end() : end]
        kept = raw.strip().rstrip(_BULLETS)
        start = m.end() + len(raw) - len(raw.lstrip())
        found.append((int(m.group(1)), " ".join(kept.split()), (start, start + len(kept))))
        m = following
    return found


class Reg(DetectionsTask):
    "Region captioning: ``sv.Detections`` with the region box and ``data['caption']``."

    name = "reg"
    description = "Referring expression generation: region (or marks) -> short description"
    templates = {
        "default": "Please provide a short description for this region: {region}",
        "marks": "Provide a short description for each of the marks I've offered: {marks}",
        "marks_detailed": "Provide a detailed description for each of the marks I've offered: "
        "{marks}",
    }
    Options = RegOptions
    max_gen_len = 64

    def template(self, opts):
        if opts.template is None and opts.marks and opts.variant == "default":
            opts = opts.model_copy(update={"variant": "marks"})
        return super().template(opts)

    def prompt_fields(self, opts):
        if _asks_marks(opts):
            return {"marks": marks_text(opts.marks, opts.image_size)}
        return {"region": region_text(opts.region, opts.image_size, self.name)}

    def split(self, **options):
        if options.get("marks") is not None:
            return [options]  # every mark in one question
        return split_per(options, "regions", "region")

    def merge(self, results):
        return merge_detections(results)

    def parse_answer(self, answer, image_wh, opts):
        if _asks_marks(opts):
            return self._marks(answer, image_wh, opts)
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

    def _marks(self, answer, image_wh, opts):
        "One row per described mark, in mark order."
        asked = len(opts.marks) if opts.marks else None
        rows, notes = {}, []
        for mark, caption, span in find_mark_descriptions(answer.text):
            if asked is not None and not 1 <= mark <= asked:
                notes.append(f"Mark {mark} was not asked: ignored")
            elif mark in rows:
                notes.append(f"Mark {mark} described again: kept the first")
            elif not caption:
                notes.append(f"Mark {mark} has no description")
            else:
                rows[mark] = (caption, span)
        if asked is not None:
            missing = [k for k in range(1, asked + 1) if k not in rows]
            notes += [f"Mark {k} not described" for k in missing[:MAX_PHRASES]]
        else:
            notes.append("no marks given: boxes are the whole image")
        if not rows:
            return self.empty(answer, image_wh, opts, notes + ["no mark description found"])
        order = sorted(rows)
        boxes = np.stack([_mark_box(opts.marks, k, image_wh) for k in order])
        confidence = (
            [answer.confidence([rows[k][1]]) for k in order]
            if answer.logprobs is not None
            else None
        )
        captions = [rows[k][0] for k in order]
        return build_detections(
            boxes,
            class_name=captions,
            data={CAPTION_FIELD: captions, MARK_FIELD: np.asarray(order, dtype=int)},
            confidence=confidence,
            notes=[[] for _ in order],
            raw_text=answer.raw,
            answer_notes=notes,
        )

    def empty(self, answer, image_wh, opts, notes=()):
        data = {CAPTION_FIELD: []}
        if _asks_marks(opts):
            data[MARK_FIELD] = np.empty(0, dtype=int)
        return build_detections(
            np.empty((0, 4)),
            data=data,
            raw_text=answer.raw,
            answer_notes=list(notes),
        )


def _asks_marks(opts) -> bool:
    return opts.marks is not None or opts.variant.startswith("marks")


def _mark_box(marks, k: int, image_wh) -> np.ndarray:
    "Pixel box of mark ``k`` (1-based) clipped to the image; a point is ``[x, y, x, y]``."
    w, h = image_wh
    if not marks:
        return np.array([0, 0, w, h], dtype=np.float64)
    mark = np.asarray(marks[k - 1], dtype=np.float64)
    box = mark if len(mark) == 4 else np.concatenate([mark, mark])
    return np.clip(box, 0, [w, h, w, h])


@hookimpl
def register_tasks(register):
    register(Reg())
