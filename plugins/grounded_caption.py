"""Grounded captioning: a caption whose noun phrases carry boxes (formats doc §4.4; VERIFIED).

Raw form: ``<p>Three world leaders</p>[b1;b2;b3] are shown in front of <p>a building</p>[b4] .``.
The result keeps the caption with tags and boxes removed, and one entity per grounded phrase with
its character span in that caption (the Kosmos-2 ``post_process_generation`` shape). A phrase
without a bracket stays in the text and gets no entity. Text copied from the demo's display
(tags already removed: ``Three world leaders[...]``) is read too: the phrase of a bare bracket is
guessed from the words before it (from the last determiner or number word) and noted.
"""

import re

import numpy as np

from sphinx_tools.annotations import ENTITY_FIELD, Entity, GroundedCaption, build_detections
from sphinx_tools.hookspecs import hookimpl
from sphinx_tools.parsing import find_mentions, ground_boxes, strip_markup
from sphinx_tools.tasks import Task, TaskOptions

_TAG_RE = re.compile(r"</?p>", re.IGNORECASE)
_STARTERS = {
    "a",
    "an",
    "the",
    "this",
    "that",
    "these",
    "those",
    "his",
    "her",
    "their",
    "its",
    "my",
    "our",
    "your",
    "some",
    "several",
    "many",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "one",
}
_BOUNDARY_RE = re.compile(r"[.!?;:,\n]")


def guess_phrase_start(chunk: str) -> int:
    "Start of the noun phrase ending ``chunk``: its last determiner or number word, else its start."
    cut = max((m.end() for m in _BOUNDARY_RE.finditer(chunk)), default=0)
    start = None
    for m in re.finditer(r"[A-Za-z0-9']+", chunk[cut:]):
        if m.group().lower() in _STARTERS or m.group().isdigit():
            start = cut + m.start()
    if start is None:
        start = cut + len(chunk[cut:]) - len(chunk[cut:].lstrip())
    return start


class GroundedCaptionTask(Task):
    "Caption with grounded phrases -> :class:`GroundedCaption`."

    name = "grounded_caption"
    output = GroundedCaption
    description = "Caption with a box list after each mentioned object"
    templates = {
        "default": "Describe the image concisely. "
        "Include the bounding box for each mentioned object."
    }
    Options = TaskOptions
    max_gen_len = 512

    def parse_answer(self, answer, image_wh, opts):
        mentions = find_mentions(answer.text, opts.recover_decimals)
        boxes, notes = ground_boxes(
            answer, image_wh, mentions, opts.recover_decimals, opts.max_objects
        )
        by_mention = {}
        for box in boxes:
            by_mention.setdefault(box.mention, []).append(box)
        text, spans, guessed = self._rebuild(answer.text, mentions)
        entities, rows = [], []
        for index, span in enumerate(spans):
            if span is None or index not in by_mention:
                continue
            phrase = text[span[0] : span[1]]
            if not phrase:
                continue
            mention_boxes = by_mention[index]
            for box in mention_boxes:
                if index in guessed:
                    box.notes.append("phrase guessed (no <p> tags)")
                rows.append((len(entities), phrase, box))
            entities.append(Entity(phrase, span, np.stack([b.xyxy for b in mention_boxes])))
        if not entities:
            notes.append("no grounded phrase found")
        return GroundedCaption(text, entities, self._detections(answer, rows, notes))

    def _rebuild(self, text, mentions):
        "Caption without tags/brackets, and each mention's phrase span in it (None if none)."
        out, spans, guessed, pos = [], [], set(), 0
        for index, mention in enumerate(mentions):
            start, end = mention.span
            out.append(_TAG_RE.sub("", text[pos:start]))
            length = sum(len(piece) for piece in out)
            if mention.phrase is not None:
                out.append(mention.phrase.text)
                spans.append((length, length + len(mention.phrase.text)))
                # drop what sits between the phrase and its bracket; keep text after an unbound tag
                pos = end if mention.bracket is not None else mention.phrase.tag_span[1]
                continue
            caption = "".join(out).rstrip()
            out = [caption]
            first = guess_phrase_start(caption[_last_end(spans) :]) + _last_end(spans)
            spans.append((first, len(caption)) if first < len(caption) else None)
            guessed.add(index)
            pos = end
        out.append(_TAG_RE.sub("", text[pos:]))
        caption = "".join(out)
        stripped = caption.strip()
        shift = len(caption) - len(caption.lstrip())
        spans = [None if s is None else (s[0] - shift, s[1] - shift) for s in spans]
        spans = [s if s is None or (0 <= s[0] < s[1] <= len(stripped)) else None for s in spans]
        return stripped, spans, guessed

    def _detections(self, answer, rows, notes):
        confidence = (
            [answer.confidence(b.spans) for _, _, b in rows]
            if answer.logprobs is not None
            else None
        )
        return build_detections(
            [b.xyxy for _, _, b in rows] if rows else np.empty((0, 4)),
            class_name=[p for _, p, _ in rows],
            confidence=confidence,
            data={ENTITY_FIELD: np.asarray([i for i, _, _ in rows], dtype=int)},
            notes=[b.notes for _, _, b in rows],
            raw_text=answer.raw,
            answer_notes=notes,
        )

    def empty(self, answer, image_wh, opts, notes=()):
        return GroundedCaption(
            strip_markup(answer.text), [], self._detections(answer, [], list(notes))
        )


def _last_end(spans) -> int:
    ends = [s[1] for s in spans if s is not None]
    return max(ends, default=0)


@hookimpl
def register_tasks(register):
    register(GroundedCaptionTask())
