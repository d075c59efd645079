"""Grounded captioning: a caption whose noun phrases carry boxes (docs/formats.md §4.4; VERIFIED).

Raw form: ``<p>Three world leaders</p>[b1;b2;b3] are shown in front of <p>a building</p>[b4] .``.
The result keeps the caption with tags and boxes removed, and one entity per grounded phrase with
its character span in that caption (the Kosmos-2 ``post_process_generation`` shape). A phrase
without a bracket stays in the text and gets no entity. Text copied from the demo's display
(tags already removed: ``Three world leaders[...]``) is read too: the phrase of a bare bracket is
guessed from the words before it (from the last determiner or number word) and noted; a guess
longer than ``MAX_PHRASE_CHARS`` characters is no phrase.
"""

import re

import numpy as np

from sphinx_tools.annotations import ENTITY_FIELD, Entity, GroundedCaption, build_detections
from sphinx_tools.hookspecs import hookimpl
from sphinx_tools.parsing import MAX_PHRASE_CHARS, find_mentions, ground_boxes, strip_markup
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
_WORD_RE = re.compile(r"[A-Za-z0-9']+")
_WORD_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789'"
_LAST_BOUNDARY_RE = re.compile(r".*[.!?;:,\n]", re.DOTALL)


def guess_phrase_start(chunk: str) -> int:
    "Start of the noun phrase ending ``chunk``: its last determiner or number word, else its start."
    return _phrase_start(chunk)[0]


def _phrase_start(chunk: str, skip_first: bool = False) -> tuple[int, bool]:
    """``guess_phrase_start`` and whether a clause boundary or a starter word decided it.

    ``skip_first``: a word at the very start of ``chunk`` continues an earlier one: no starter.
    """
    cut = max((m.end() for m in _BOUNDARY_RE.finditer(chunk)), default=0)
    start = None
    for m in _WORD_RE.finditer(chunk[cut:]):
        if skip_first and cut == 0 and m.start() == 0:
            continue
        if m.group().lower() in _STARTERS or m.group().isdigit():
            start = cut + m.start()
    if start is not None:
        return start, True
    return cut + len(chunk[cut:]) - len(chunk[cut:].lstrip()), cut > 0


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
        out, spans, guessed, pos = _Pieces(), [], set(), 0
        last_end = 0  # the end of the last span so far
        # A guess over MAX_PHRASE_CHARS is no phrase. The guesses after it read only from where
        # it ended (``floor``, the start of its last word, which more text may continue), so a
        # long clause is not read again for every bracket; if nothing after ``floor`` decides a
        # start, the guess would reach back as far: no phrase either.
        floor, skip, rejected = 0, False, False
        for index, mention in enumerate(mentions):
            start, end = mention.span
            out.append(_TAG_RE.sub("", text[pos:start]))
            length = out.length
            if mention.phrase is not None:
                out.append(mention.phrase.text)
                spans.append((length, length + len(mention.phrase.text)))
                last_end = max(last_end, length + len(mention.phrase.text))
                rejected = False
                # drop what sits between the phrase and its bracket; keep text after an unbound tag
                pos = end if mention.bracket is not None else mention.phrase.tag_span[1]
                continue
            out.rstrip()
            after = floor if rejected else last_end
            first, decided = out.phrase_start(after, skip and rejected)
            too_long = rejected and not decided  # as long as the rejected guess before it
            if not too_long and first < out.length and out.length - first <= MAX_PHRASE_CHARS:
                spans.append((first, out.length))
                last_end = max(last_end, out.length)
                rejected = False
            else:
                spans.append(None)
                if too_long or first < out.length:  # too long, not empty
                    floor, skip = out.word_floor(after, MAX_PHRASE_CHARS + 1, skip and rejected)
                    rejected = True
            guessed.add(index)
            pos = end
        out.append(_TAG_RE.sub("", text[pos:]))
        caption = out.text()
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


class _Pieces:
    """A caption built piece by piece, with each step costing only the text it touches.

    ``rstrip`` and ``phrase_start`` read the caption from its end, so a long caption with many
    bare brackets is still read about once in all.
    """

    def __init__(self):
        self.pieces: list[str] = []
        self.offsets: list[int] = []  # where each piece starts in the caption
        self.boundaries: list[int] = []  # end of the last boundary match in each piece, or -1
        self.length = 0

    def append(self, piece: str) -> None:
        self.pieces.append(piece)
        self.offsets.append(self.length)
        self.boundaries.append(_last_boundary(piece))
        self.length += len(piece)

    def rstrip(self) -> None:
        "Drop trailing whitespace, as ``caption.rstrip()``."
        while self.pieces:
            last = self.pieces[-1]
            kept = last.rstrip()
            if kept:
                if len(kept) < len(last):
                    self.pieces[-1] = kept
                    self.boundaries[-1] = _last_boundary(kept)
                    self.length -= len(last) - len(kept)
                return
            self.pieces.pop(), self.offsets.pop(), self.boundaries.pop()
            self.length -= len(last)

    def phrase_start(self, after: int, skip_first: bool = False) -> tuple[int, bool]:
        """``after + guess_phrase_start(caption[after:])``, reading only the caption's last clause.

        Also says whether a clause boundary or a starter word at or after ``after`` decided it;
        ``skip_first``: a word at ``after`` continues an earlier one and starts nothing.
        """
        if after >= self.length:
            return after, False
        cut, i = after, len(self.pieces) - 1
        while i >= 0 and self.offsets[i] + len(self.pieces[i]) > after:
            boundary = self.boundaries[i]
            if boundary >= 0 and self.offsets[i] + boundary - 1 >= after:
                cut = self.offsets[i] + boundary
                break
            i -= 1
        # the caption from ``cut`` on; ``cut`` lies in piece i (or before the pieces read)
        i = max(i, 0)
        while i + 1 < len(self.pieces) and self.offsets[i + 1] <= cut:
            i += 1
        tail = self.pieces[i][cut - self.offsets[i] :] + "".join(self.pieces[i + 1 :])
        if not tail:
            return cut, cut > after
        start, decided = _phrase_start(tail, skip_first and cut == after)
        return cut + start, decided or cut > after

    def word_floor(self, lower: int, limit: int, continued: bool = False) -> tuple[int, bool]:
        """Where the caption's last word starts (not before ``lower``) and whether it continues
        an earlier word (it reaches ``lower`` and ``continued``); for a word longer than ``limit``,
        the caption's end and ``True`` (more text would continue it)."""
        pos, i = self.length, len(self.pieces) - 1
        while i >= 0 and pos > lower and self.length - pos <= limit:
            piece = self.pieces[i]
            room = min(len(piece), pos - lower, limit + 1 - (self.length - pos))
            chunk = piece[len(piece) - room :]
            run = len(chunk) - len(chunk.rstrip(_WORD_CHARS))
            pos -= run
            if run < len(piece):
                break
            i -= 1
        if self.length - pos > limit:
            return self.length, True
        return pos, continued and pos == lower

    def text(self) -> str:
        return "".join(self.pieces)


def _last_boundary(piece: str) -> int:
    "End of the last clause boundary (``.``, ``,``, newline...) in ``piece``, or -1."
    m = _LAST_BOUNDARY_RE.match(piece)
    return m.end() if m else -1


@hookimpl
def register_tasks(register):
    register(GroundedCaptionTask())
