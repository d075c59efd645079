"""Pure text helpers shared by the task parsers (docs/formats.md §3).

SPHINX writes grounded text as ``<p>phrase</p> [x1,y1,x2,y2;x1,y1,x2,y2]``: a phrase tag followed by
one bracket of ``;``-separated groups; 4 numbers are a box and 2 numbers a point, as fractions of
the padded square (docs/formats.md §2). This module finds those pieces in noisy model text and
never raises on it:

- :class:`Answer` cleans a generation (cut at ``###``, drop ``</s>``, undo HTML escaping, strip) and
  keeps a map back to the raw characters, so per-token log-probabilities still line up.
- :func:`find_mentions` returns phrases and coordinate brackets in text order.
- :func:`ground_boxes` / :func:`point_to_pixels` turn them into pixel geometry through
  :class:`~sphinx_tools.transforms.PaddedResize` (unpad, swap inverted corners, clip, drop
  degenerate boxes and boxes in the padding band, dedupe repeats), with notes for every repair.

Confidence formula (:meth:`Answer.confidence`): for an object, take every generated token whose
characters overlap the object's phrase text or its coordinate group, and return
``exp(mean(logprob))`` over those tokens (the geometric-mean token probability, in ``[0, 1]``).
Without log-probabilities it is ``None``.
"""

from __future__ import annotations

import bisect
import html
import math
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np

from sphinx_tools.transforms import PaddedResize

NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_INT_RE = re.compile(r"\+?\d+")
# Characters allowed inside a coordinate bracket; anything else (letters, %, quotes) means prose.
_IN_BRACKET = r"[\d\s.,;eE+\-]"
_TOKEN = r"[\d.eE+\-]+"  # tokens are separated by commas and whitespace, groups by ";"
_SEP = r"[,\s]"
# A group of 2 or 4 tokens (the only ones that can be a point or a box), up to its end.
_POINT_OR_BOX = (
    rf"{_SEP}*{_TOKEN}{_SEP}+{_TOKEN}(?:{_SEP}+{_TOKEN}{_SEP}+{_TOKEN})?{_SEP}*"
    r"(?=;|[^\d\s.,;eE+\-]|\Z)"
)
# A bracket: "[" and its content (bracket characters, at least one digit), then "]", or the end
# of the text, or (a "]" lost before more text) a group of 2 or 4 tokens somewhere in it; other
# brackets ("[3 items]") are prose. The content is matched once inside a lookahead and consumed
# by a back-reference, so a failed match never reads it again: matching is linear in the text.
_BRACKET_RE = re.compile(
    rf"\[(?=(?P<content>[\s.,;eE+\-]*\d{_IN_BRACKET}*))"
    rf"(?:(?P=content)(?P<close>\])|(?P=content)\Z"
    rf"|(?={_IN_BRACKET}*?(?<=[\[;]){_POINT_OR_BOX})(?P=content))"
)
_TOKEN_SEP_RE = re.compile(r"[,\s]+")
_OPEN_TAG_RE = re.compile(r"<p>", re.IGNORECASE)
_CLOSE_TAG_RE = re.compile(r"</p>", re.IGNORECASE)
_JUNK_RE = re.compile(r"</?s>|&(?:lt|gt|amp|quot|apos|#\d{1,7}|#[xX][0-9a-fA-F]{1,6});")
_JUNK_SPLIT_RE = re.compile(f"({_JUNK_RE.pattern})")
_BIND_GAP_RE = re.compile(r"[\s:]*")  # what may sit between </p> and its bracket

VALUE_TOLERANCE = 0.25  # values in [-0.25, 1.25] are kept (then clipped); beyond is malformed
DEDUPE_DECIMALS = (
    3  # boxes equal after rounding normalized coords to this many decimals are repeats
)
# Work per answer is bounded: an answer of any length is scanned once, and at most this many
# coordinate groups and phrases are read from it (a real answer, at most a few thousand tokens,
# holds a few hundred). What lies beyond is left out, with a note.
MAX_GROUPS = 4096
MAX_PHRASES = 4096
MAX_PHRASE_CHARS = 1000  # a phrase's text keeps its first characters up to this many
_NOTE_TOKEN_CHARS = 40  # a token quoted in a note is cut to this many characters

Span = tuple[int, int]


# -- cleaned answer with a character map and token confidences -------------------------------------
@dataclass(frozen=True)
class Answer:
    """A model answer, cleaned, with the map back to the raw text and optional token log-probs.

    Build it with :meth:`from_generation`. ``text`` is what the parsers read; ``starts[i]`` and
    ``ends[i]`` give the raw-text character range that produced ``text[i]``.
    """

    raw: str
    text: str
    starts: np.ndarray
    ends: np.ndarray
    logprobs: np.ndarray | None = None
    token_starts: np.ndarray | None = None
    token_ends: np.ndarray | None = None

    @classmethod
    def from_generation(cls, raw, logprobs=None, offsets=None) -> "Answer":
        """Clean a raw generation and attach its per-token log-probabilities.

        Args:
            raw: the generated text, raw or already cut (``None`` is read as ``""``).
            logprobs: one log-probability per generated token, length T, or ``None``.
            offsets: length T, the character index in ``raw`` where each token starts.

        Returns:
            An :class:`Answer`.

        Raises:
            ValueError: if only one of ``logprobs``/``offsets`` is given or their lengths differ.
        """
        raw = "" if raw is None else str(raw)
        text, starts, ends = _clean(raw)
        if logprobs is None and offsets is None:
            return cls(raw, text, starts, ends)
        if logprobs is None or offsets is None:
            raise ValueError(
                "`logprobs` and `offsets` go together (one value per generated token), got "
                f"logprobs={'None' if logprobs is None else len(logprobs)} values, "
                f"offsets={'None' if offsets is None else len(offsets)} values"
            )
        lp = np.asarray(logprobs, dtype=np.float64).reshape(-1)
        tok_starts = np.asarray(offsets, dtype=np.int64).reshape(-1)
        if lp.shape != tok_starts.shape:
            raise ValueError(
                f"`logprobs` and `offsets` must have one value per token, got {lp.size} and "
                f"{tok_starts.size}"
            )
        tok_ends = np.append(tok_starts[1:], len(raw))
        tok_ends = np.maximum(tok_ends, tok_starts + 1)  # a token always covers >= 1 character
        return cls(raw, text, starts, ends, lp, tok_starts, tok_ends)

    def raw_span(self, span: Span) -> Span:
        "Map a ``[start, end)`` span of ``text`` to the raw text."
        a, b = span
        if b <= a:
            return (0, 0)
        return int(self.starts[a]), int(self.ends[b - 1])

    def confidence(self, spans) -> float | None:
        """``exp(mean(logprob))`` over the tokens that overlap any of ``spans``.

        Args:
            spans: ``[start, end)`` character spans of ``text`` (the phrase and coordinate group
                of one object).

        Returns:
            A float in ``[0, 1]``, or ``None`` when there are no log-probs or no token overlaps.
        """
        if self.logprobs is None:
            return None
        ranges = [self.raw_span(span) for span in spans]
        ranges = [(a, b) for a, b in ranges if b > a]
        values = self.logprobs[self._overlapping_tokens(ranges)]
        values = values[~np.isnan(values)]
        if values.size == 0:
            return None
        return float(np.exp(np.clip(values.mean(), -np.inf, 0.0)))

    def _overlapping_tokens(self, ranges):
        "Indices (ascending) or a mask of the tokens that overlap any raw ``[a, b)`` range."
        starts, ends = self.token_starts, self.token_ends
        if not self._tokens_sorted:
            mask = np.zeros(self.logprobs.shape, dtype=bool)
            for a, b in ranges:
                mask |= (starts < b) & (ends > a)
            return mask
        # Tokens in text order: those overlapping [a, b) are one run, found by bisection.
        runs = []
        for a, b in ranges:
            lo = int(np.searchsorted(ends, a, side="right"))
            hi = int(np.searchsorted(starts, b, side="left"))
            if hi > lo:
                runs.append((lo, hi))
        if len(runs) <= 1:
            return np.arange(*runs[0]) if runs else np.empty(0, dtype=np.int64)
        return np.unique(np.concatenate([np.arange(lo, hi) for lo, hi in runs]))

    @cached_property
    def _tokens_sorted(self) -> bool:
        "Whether token offsets never decrease (then token ends do not either)."
        return bool(np.all(np.diff(self.token_starts) >= 0))


def _clean(raw: str):
    "Cut at '###', drop </s>, unescape HTML entities, strip; keep per-character raw ranges."
    stop = raw.find("###")
    # [run, junk, run, junk, ..., run]: runs of raw text and the junk between them
    parts = _JUNK_SPLIT_RE.split(raw if stop < 0 else raw[:stop])
    raw_lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    firsts = np.cumsum(raw_lengths) - raw_lengths  # where each part starts in the raw text
    parts[1::2] = map(_junk_replacement, parts[1::2])  # "" for </s>, an entity's character
    text = "".join(parts)
    lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    # Character k of a run comes from raw[first + k]; every character of a replacement comes
    # from its whole entity, raw[first:first + raw length].
    is_run = np.zeros(len(parts), dtype=np.int64)
    is_run[0::2] = 1
    first_ends = np.where(is_run == 1, firsts + 1, firsts + raw_lengths)
    # character i of the text lies k = i - (start of its part) characters into its part
    k = np.arange(len(text), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    k *= np.repeat(is_run, lengths)
    starts = np.repeat(firsts, lengths) + k
    ends = np.repeat(first_ends, lengths) + k
    lead = len(text) - len(text.lstrip())
    trail = len(text.rstrip())
    return text[lead:trail], starts[lead:trail], ends[lead:trail]


@lru_cache(maxsize=1024)
def _junk_replacement(token: str) -> str:
    "What a ``_JUNK_RE`` match becomes: nothing for ``</s>``, the character of an entity."
    return html.unescape(token) if token.startswith("&") else ""


# -- brackets, groups and phrases ------------------------------------------------------------------
@dataclass(frozen=True)
class Group:
    """One ``;``-separated group inside a bracket: 4 values = box, 2 = point.

    ``values`` is empty when the group was malformed; ``notes`` says why or what was repaired.
    """

    values: tuple[float, ...]
    span: Span
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Bracket:
    "A coordinate bracket ``[...]``; ``closed`` is False when the text ended inside it."

    span: Span
    groups: tuple[Group, ...]
    closed: bool = True


@dataclass(frozen=True)
class Phrase:
    "A ``<p>...</p>`` phrase: ``span`` covers the text inside the tags, ``tag_span`` the tags too."

    text: str
    span: Span
    tag_span: Span
    closed: bool = True


@dataclass(frozen=True)
class Mention:
    "A phrase with its bracket, a phrase alone (ungrounded) or a bracket alone (bare box)."

    phrase: Phrase | None
    bracket: Bracket | None

    @property
    def span(self) -> Span:
        parts = [self.phrase.tag_span] if self.phrase else []
        parts += [self.bracket.span] if self.bracket else []
        return (min(s for s, _ in parts), max(e for _, e in parts))


def parse_value(token: str, recover_decimals: bool = True) -> tuple[float | None, str | None]:
    """Read one coordinate token as a fraction of the padded square.

    Values within ``[-0.25, 1.25]`` are returned as they are (callers clip after unpadding). An
    integer above 1 (``37``, ``370``) is taken as a lost decimal point and rescaled to ``0.37`` only
    when ``recover_decimals`` is true, with a note saying so; anything else out of range is
    rejected.

    Args:
        token: the number text, e.g. ``"0.26"``, ``"1e-1"``, ``"37"``.
        recover_decimals: whether to rescale integers above 1.

    Returns:
        ``(value, note)``; ``value`` is ``None`` when the token is rejected, ``note`` explains a
        rejection or a recovery.
    """
    if not NUMBER_RE.fullmatch(token):
        return None, f"not a number: {_quoted(token)!r}"
    try:
        value = float(token)
    except (ValueError, OverflowError):
        return None, f"not a number: {_quoted(token)!r}"
    if not math.isfinite(value):
        return None, f"non-finite number {_quoted(token)!r}"
    if -VALUE_TOLERANCE <= value <= 1.0 + VALUE_TOLERANCE:
        return value, None
    if recover_decimals and _INT_RE.fullmatch(token):
        digits = token.lstrip("+")
        fixed = int(digits) / 10 ** len(digits)
        return fixed, f"decimal point restored ({_quoted(token)} -> {fixed:g})"
    return None, f"value {_quoted(token)} out of [0, 1]"


def _quoted(token: str) -> str:
    "``token`` as a note quotes it: cut to ``_NOTE_TOKEN_CHARS`` characters."
    if len(token) <= _NOTE_TOKEN_CHARS:
        return token
    return f"{token[:_NOTE_TOKEN_CHARS]}... ({len(token)} characters)"


def parse_group(content: str, start: int, recover_decimals: bool = True) -> Group:
    """Parse one group's text (``"0.1,0.2,0.3,0.4"``) found at ``start`` in the cleaned text.

    Returns:
        A :class:`Group`; ``values`` is empty if any token is not a usable number.
    """
    stripped = content.strip()
    lead = len(content) - len(content.lstrip())
    span = (start + lead, start + lead + len(stripped))
    tokens = [t for t in _TOKEN_SEP_RE.split(stripped) if t]
    values, notes = [], []
    for token in tokens:
        value, note = parse_value(token, recover_decimals)
        if note:
            notes.append(note)
        if value is None:
            return Group((), span, tuple(notes))
        values.append(value)
    return Group(tuple(values), span, tuple(notes))


def find_brackets(
    text: str, recover_decimals: bool = True, max_groups: int | None = MAX_GROUPS
) -> list[Bracket]:
    """All coordinate brackets in ``text``: ``[`` + numbers, ``,``, ``;``, whitespace + ``]``.

    Brackets that hold no digit (placeholders such as ``[x1, y1, x2, y2]``) or any other character
    are prose and skipped. A bracket cut off by the end of the text is returned with
    ``closed=False``; its last group may be incomplete and is dropped with a note. A bracket whose
    ``]`` is missing before more text keeps its complete groups (noted).

    Args:
        text: cleaned answer text.
        recover_decimals: passed to :func:`parse_value`.
        max_groups: stop after this many groups (``None``: read them all); the bracket that
            reaches the limit keeps only the groups up to it.

    Returns:
        The brackets in text order.
    """
    found, budget = [], max_groups
    for m in _BRACKET_RE.finditer(text):
        closed = m.group("close") is not None
        at_end = m.end() == len(text)
        groups = _bracket_groups(m, closed, at_end, recover_decimals, budget)
        if _is_prose(closed, at_end, groups):
            continue
        found.append(Bracket((m.start(), m.end()), tuple(groups), closed))
        if budget is not None:
            budget -= len(groups)
            if budget <= 0:
                break
    return found


def _is_prose(closed: bool, at_end: bool, groups) -> bool:
    "``[3 items] ...`` is prose, not a bracket that lost its ``]``: no group is a point or box."
    return not closed and not at_end and not any(len(g.values) in (2, 4) for g in groups)


def _bracket_groups(m, closed: bool, at_end: bool, recover_decimals: bool, limit) -> list[Group]:
    "The groups of bracket match ``m``, at most ``limit`` of them (``None``: all)."
    content = m.group("content")
    groups, pos = [], m.start("content")
    parts = content.split(";")
    last = len(parts) - 1
    for i, part in enumerate(parts):
        if limit is not None and len(groups) >= limit:
            break
        if part.strip():
            group = parse_group(part, pos, recover_decimals)
            if not closed and at_end and i == last:
                group = Group((), group.span, group.notes + ("cut off by the end of the text",))
            elif not closed:
                group = Group(group.values, group.span, group.notes + ("missing ]",))
            groups.append(group)
        pos += len(part) + 1
    return groups


def find_phrases(text: str, brackets=(), max_phrases: int | None = MAX_PHRASES) -> list[Phrase]:
    """All ``<p>...</p>`` phrases: the text between a ``<p>`` and the nearest ``</p>``.

    A ``<p>`` with no ``</p>`` before the next ``<p>`` is kept as an unclosed phrase that ends at
    the next coordinate bracket (or ``<p>``, or the end of the text). A phrase's text is cut to
    its first :data:`MAX_PHRASE_CHARS` characters.

    Args:
        text: cleaned answer text.
        brackets: the brackets of ``text`` (from :func:`find_brackets`), to end unclosed phrases.
        max_phrases: stop after this many phrases (``None``: read them all).

    Returns:
        The phrases in text order.
    """
    bracket_starts = sorted(br.span[0] for br in brackets)
    phrases = []
    opens = _OPEN_TAG_RE.finditer(text)
    m = next(opens, None)
    while m is not None and (max_phrases is None or len(phrases) < max_phrases):
        following = next(opens, None)
        limit = following.start() if following is not None else len(text)
        close = _CLOSE_TAG_RE.search(text, m.end(), limit)
        if close:
            a, b, tag_end, closed = m.end(), close.start(), close.end(), True
        else:
            i = bisect.bisect_left(bracket_starts, m.end())
            b = min(limit, bracket_starts[i]) if i < len(bracket_starts) else limit
            a, tag_end, closed = m.end(), b, False
        raw = text[a:b]
        lead = len(raw) - len(raw.lstrip())
        content = raw.strip()[:MAX_PHRASE_CHARS]
        phrases.append(
            Phrase(content, (a + lead, a + lead + len(content)), (m.start(), tag_end), closed)
        )
        m = following
    return phrases


def find_mentions(text: str, recover_decimals: bool = True) -> list[Mention]:
    """Phrases and brackets of ``text`` in order, each phrase bound to the bracket right after it.

    A phrase binds to a bracket when only whitespace (or a colon) separates ``</p>`` from ``[``.
    At most :data:`MAX_GROUPS` coordinate groups and :data:`MAX_PHRASES` phrases are read.

    Args:
        text: cleaned answer text.
        recover_decimals: passed to :func:`parse_value`.

    Returns:
        A list of :class:`Mention`.
    """
    brackets = find_brackets(text, recover_decimals)
    phrases = find_phrases(text, brackets)
    by_start = {b.span[0]: b for b in brackets}
    used: set[int] = set()
    mentions = []
    for phrase in phrases:
        gap = _BIND_GAP_RE.match(text, phrase.tag_span[1])
        bracket = by_start.get(gap.end())
        if bracket is not None and bracket.span[0] in used:
            bracket = None
        if bracket is not None:
            used.add(bracket.span[0])
        mentions.append(Mention(phrase, bracket))
    mentions += [Mention(None, b) for b in brackets if b.span[0] not in used]
    mentions.sort(key=lambda mention: mention.span[0])
    return mentions


def read_limit_notes(mentions) -> list[str]:
    "A note for each reading limit (:data:`MAX_GROUPS`, :data:`MAX_PHRASES`) the mentions reached."
    groups = sum(len(m.bracket.groups) for m in mentions if m.bracket is not None)
    phrases = sum(1 for m in mentions if m.phrase is not None)
    notes = []
    if groups >= MAX_GROUPS:
        notes.append(f"read the first {MAX_GROUPS} coordinate groups only")
    if phrases >= MAX_PHRASES:
        notes.append(f"read the first {MAX_PHRASES} phrases only")
    return notes


def strip_markup(text: str) -> str:
    "Remove ``<p>``/``</p>`` tags and coordinate brackets, and tidy the spaces they leave."
    out = _remove_brackets(text)
    out = _CLOSE_TAG_RE.sub("", _OPEN_TAG_RE.sub("", out))
    out = re.sub(r"[ \t]{2,}", " ", out)
    return out.strip()


def _remove_brackets(text: str) -> str:
    """``text`` without the brackets :func:`find_brackets` finds.

    Only an unclosed bracket followed by more text needs its numbers read (prose or a bracket
    that lost its ``]``); after :data:`MAX_GROUPS` such groups, the rest are taken as brackets
    without reading them (each has a group of 2 or 4 tokens).
    """
    pieces, pos, budget = [], 0, MAX_GROUPS
    for m in _BRACKET_RE.finditer(text):
        closed = m.group("close") is not None
        at_end = m.end() == len(text)
        if not closed and not at_end:
            if budget > 0:
                groups = _bracket_groups(m, closed, at_end, True, budget)
                budget -= len(groups)
                if _is_prose(closed, at_end, groups):
                    continue
        pieces.append(text[pos : m.start()])
        pos = m.end()
    pieces.append(text[pos:])
    return "".join(pieces)


# -- tag-less display form: the words before a bare bracket ---------------------------------------
# SPHINX-X writes grounded text without tags (``There are seven text[...], figure[...] ...``): the
# words right before a bare bracket name it. Only the text since the previous mention is read, at
# most MAX_PHRASE_CHARS characters of it, so all brackets together read the answer about once.
_WORD_RE = re.compile(r"\S+")
_PHRASE_WORD_RE = re.compile(r"[\w'\-]+")
_CLAUSE_BOUNDARY_RE = re.compile(r"[.!?;:,()\n\"\u201c\u201d]")
_QUOTES = "\"'\u2018\u2019\u201c\u201d`,;:()"
# words that lead into a noun phrase without belonging to it ("There are", "and", "with")
_LEAD_WORDS = frozenset(
    "there here are is was were and or with plus also include includes including contain "
    "contains containing has have see shows show detected found".split()
)
# words that start a noun phrase ("a dog", "two people")
_PHRASE_STARTERS = frozenset(
    "a an the this that these those his her their its my our your some several many one two "
    "three four five six seven eight nine ten".split()
)
BARE_PHRASE_NOTE = "phrase read from the words before the box (no <p> tags)"


def words_before(text: str, end: int, floor: int = 0, word: bool = False) -> Span | None:
    """The span of the words naming a bare bracket that starts at ``end``, or ``None``.

    ``word=True`` gives the one whitespace-separated word before the bracket with quotes and
    separators trimmed (OCR: ``"Virtual[...]`` -> ``Virtual``, ``1.21[...]`` -> ``1.21``).
    Otherwise it is the noun phrase ending there: the words after the last clause boundary, from
    the last determiner or number word, after any lead-in word (``There are seven text[...]`` ->
    ``seven text``, ``, and title[...]`` -> ``title``).

    Args:
        text: cleaned answer text.
        end: where the bracket starts.
        floor: the end of the previous mention; nothing before it is read.
        word: one word instead of a noun phrase.
    """
    start = max(floor, end - MAX_PHRASE_CHARS, 0)
    window = text[start:end].rstrip()
    if word:
        words = list(_WORD_RE.finditer(window))
        if not words:
            return None
        token = words[-1].group()
        inner = token.strip(_QUOTES)
        if not inner:
            return None
        a = start + words[-1].start() + token.index(inner)
        return a, a + len(inner)
    window = window.rstrip(":").rstrip()
    cut = max((m.end() for m in _CLAUSE_BOUNDARY_RE.finditer(window)), default=0)
    first = None
    for m in _PHRASE_WORD_RE.finditer(window, cut):
        low = m.group().lower()
        if low in _LEAD_WORDS:
            first = None
        elif first is None or low in _PHRASE_STARTERS or m.group().isdigit():
            first = m.start()
    if first is None:
        return None
    return start + first, start + len(window)


def name_bare_boxes(text: str, mentions, boxes, word: bool = False) -> None:
    """Give each box of a bare bracket the words before it as its phrase (in place, noted).

    Args:
        text: cleaned answer text.
        mentions: the :func:`find_mentions` result the boxes came from.
        boxes: :class:`GroundedBox` list from :func:`ground_boxes` with those mentions.
        word: one word (OCR) instead of a noun phrase (see :func:`words_before`).
    """
    found = {}
    for box in boxes:
        if box.phrase is not None:
            continue
        i = box.mention
        if i not in found:
            floor = mentions[i - 1].span[1] if i > 0 else 0
            found[i] = words_before(text, mentions[i].span[0], floor, word)
        span = found[i]
        if span is None:
            continue
        box.phrase = text[span[0] : span[1]]
        box.spans.append(span)
        box.notes.append(BARE_PHRASE_NOTE)


# -- geometry --------------------------------------------------------------------------------------
@dataclass
class GroundedBox:
    """One box found in the text, already in original-image pixels.

    Attributes:
        phrase: the phrase it belongs to, or ``None`` for a bare bracket.
        xyxy: float array (4,), ``[x1, y1, x2, y2]`` pixels, clipped to the image, x1<x2, y1<y2.
        normalized: float array (4,), the values as written (padded-square fractions).
        spans: character spans of the cleaned text (phrase + group) used for confidence.
        notes: repairs and doubts about this object.
        mention: index of the :class:`Mention` it came from.
    """

    phrase: str | None
    xyxy: np.ndarray
    normalized: np.ndarray
    spans: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    mention: int = 0


def box_to_pixels(values, image_wh, transform: PaddedResize | None = None):
    """Map one normalized padded-square box to a valid pixel box of the original image.

    Steps: unpad with ``PaddedResize.to_pixels_xyxy`` (docs/formats.md §2), swap inverted
    corners, clip to ``[0, W] x [0, H]``; a box with no area left (degenerate, or wholly in the padding band) is
    rejected.

    Args:
        values: 4 floats ``[x1, y1, x2, y2]``, fractions of the padded side.
        image_wh: ``(width, height)`` of the original image.
        transform: the coordinate map (a default ``PaddedResize`` if ``None``).

    Returns:
        ``(xyxy, notes)``: a float array (4,) or ``None`` if rejected, and a list of notes.
    """
    (xyxy,), (notes,) = boxes_to_pixels([values], image_wh, transform)
    return xyxy, notes


def boxes_to_pixels(values, image_wh, transform: PaddedResize | None = None):
    """:func:`box_to_pixels` for n boxes at once.

    Args:
        values: n boxes of 4 floats, array-like (n, 4).
        image_wh: ``(width, height)`` of the original image.
        transform: the coordinate map (a default ``PaddedResize`` if ``None``).

    Returns:
        ``(xyxy, notes)``: n float arrays (4,) or ``None`` (rejected), and n lists of notes.
    """
    transform = transform or PaddedResize()
    w, h = image_wh
    box = transform.to_pixels_xyxy(values, (w, h))
    x1, y1, x2, y2 = box.T
    inverted = (x1 > x2) | (y1 > y2)
    if inverted.any():  # min/max exactly as Python's min() and max() pick them
        swapped = np.stack(
            [
                np.where(x2 < x1, x2, x1),
                np.where(y2 < y1, y2, y1),
                np.where(x2 > x1, x2, x1),
                np.where(y2 > y1, y2, y1),
            ],
            axis=1,
        )
        box = np.where(inverted[:, None], swapped, box)
    clipped = np.clip(box, 0, [w, h, w, h])
    kept = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    inside = (box[:, 2] > 0) & (box[:, 0] < w) & (box[:, 3] > 0) & (box[:, 1] < h)
    was_clipped = np.abs(clipped - box).max(axis=1, initial=0.0) > 1e-6
    out, notes = [], []
    for i in range(len(box)):
        row_notes = ["inverted corners swapped"] if inverted[i] else []
        if not kept[i]:
            row_notes.append(
                "degenerate box dropped"
                if inside[i]
                else "box outside the image (padding band) dropped"
            )
            out.append(None)
        else:
            if was_clipped[i]:
                row_notes.append("clipped to the image")
            out.append(clipped[i].copy())
        notes.append(row_notes)
    return out, notes


def point_to_pixels(values, image_wh, transform: PaddedResize | None = None):
    """Map one normalized point to pixels; ``[0, 0]`` or a point outside the image is not visible.

    Returns:
        ``(xy, visible, notes)``: a float array (2,) clipped to the image, a bool, a list of notes.
    """
    (xy,), (visible,), (notes,) = points_to_pixels([values], image_wh, transform)
    return xy, bool(visible), notes


def points_to_pixels(values, image_wh, transform: PaddedResize | None = None):
    """:func:`point_to_pixels` for n points at once.

    Args:
        values: n points of 2 floats, array-like (n, 2).
        image_wh: ``(width, height)`` of the original image.
        transform: the coordinate map (a default ``PaddedResize`` if ``None``).

    Returns:
        ``(xy, visible, notes)``: a float array (n, 2) clipped to the image, a bool array (n,)
        and n lists of notes.
    """
    transform = transform or PaddedResize()
    w, h = image_wh
    values = np.asarray(values, dtype=np.float64).reshape(-1, 2)
    xy = transform.to_pixels_xy(values, (w, h))
    hidden = (values[:, 0] == 0) & (values[:, 1] == 0)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] <= w) & (xy[:, 1] >= 0) & (xy[:, 1] <= h)
    xy = np.where(hidden[:, None], 0.0, np.where(inside[:, None], xy, np.clip(xy, 0, [w, h])))
    notes = [
        ["[0,0] read as not visible"]
        if hidden[i]
        else [] if inside[i] else ["point outside the image (padding band): not visible"]
        for i in range(len(xy))
    ]
    return xy, ~hidden & inside, notes


def ground_boxes(
    answer: Answer,
    image_wh,
    mentions=None,
    recover_decimals: bool = True,
    max_objects: int | None = None,
    transform: PaddedResize | None = None,
):
    """Every valid box of the answer, in order, with repeats removed.

    Args:
        answer: the cleaned answer.
        image_wh: ``(width, height)`` of the original image.
        mentions: pre-computed :func:`find_mentions` result (computed if ``None``).
        recover_decimals: passed to :func:`parse_value`.
        max_objects: stop after this many boxes (repetition loops), ``None`` for no cap.
        transform: the coordinate map.

    Returns:
        ``(boxes, notes)``: a list of :class:`GroundedBox` and a list of answer-level notes.
    """
    if mentions is None:
        mentions = find_mentions(answer.text, recover_decimals)
    quads = [
        g.values for m in mentions if m.bracket is not None for g in m.bracket.groups
        if len(g.values) == 4
    ]
    values = np.asarray(quads, dtype=np.float64).reshape(-1, 4)
    pixels, pixel_notes = boxes_to_pixels(values, image_wh, transform)
    keys = np.round(values, DEDUPE_DECIMALS).tolist()
    boxes, notes, seen, repeats, q = [], [], set(), 0, -1
    for index, mention in enumerate(mentions):
        phrase = mention.phrase
        if mention.bracket is None:
            continue
        for group in mention.bracket.groups:
            if len(group.values) != 4:
                notes.append(_group_problem(group, "box"))
                continue
            q += 1
            xyxy, box_notes = pixels[q], pixel_notes[q]
            if xyxy is None:
                notes.extend(box_notes)
                continue
            key = (phrase.text.lower() if phrase else None, tuple(keys[q]))
            if key in seen:
                repeats += 1
                continue
            if max_objects is not None and len(boxes) >= max_objects:
                notes.append(f"stopped at max_objects={max_objects}")
                return boxes, notes + _summary(repeats, mentions)
            seen.add(key)
            spans = [group.span] + ([phrase.span] if phrase else [])
            obj_notes = list(group.notes) + box_notes
            if phrase and not phrase.closed:
                obj_notes.append("missing </p>")
            boxes.append(
                GroundedBox(
                    phrase.text if phrase else None,
                    xyxy,
                    np.asarray(group.values, dtype=np.float64),
                    spans,
                    obj_notes,
                    index,
                )
            )
    return boxes, notes + _summary(repeats, mentions)


def _group_problem(group: Group, wanted: str) -> str:
    if not group.values:
        return "malformed group dropped" + (f" ({'; '.join(group.notes)})" if group.notes else "")
    needs = 4 if wanted == "box" else 2
    return f"group of {len(group.values)} numbers where a {wanted} needs {needs}: dropped"


def _summary(repeats: int, mentions) -> list[str]:
    notes = []
    if repeats:
        notes.append(f"{repeats} repeated object(s) removed")
    if is_truncated(mentions):
        notes.append("truncated output")
    return notes + read_limit_notes(mentions)


def is_truncated(mentions) -> bool:
    "Whether the text ended inside a bracket or a phrase tag."
    return any(
        (m.bracket is not None and not m.bracket.closed)
        or (m.phrase is not None and not m.phrase.closed)
        for m in mentions
    )


def dedupe(items, key):
    "Keep the first of items with equal ``key(item)``, in order; returns ``(kept, n_removed)``."
    seen, kept = set(), []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            kept.append(item)
    return kept, len(items) - len(kept)


# -- small text helpers ----------------------------------------------------------------------------
_NUMBER_WORDS = {
    "a",
    "an",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "several",
    "many",
    "some",
    "multiple",
    "the",
    "all",
    "few",
    "a few",
}
_IRREGULAR_PLURALS = {
    "people": "person",
    "men": "man",
    "women": "woman",
    "children": "child",
    "mice": "mouse",
    "feet": "foot",
    "teeth": "tooth",
    "geese": "goose",
    "oxen": "ox",
    "persons": "person",
    "buses": "bus",
    "knives": "knife",
    "leaves": "leaf",
    "wolves": "wolf",
    "shelves": "shelf",
}
_IRREGULAR_SINGULARS = {v: k for k, v in _IRREGULAR_PLURALS.items() if k != "persons"}
_IRREGULAR_SINGULARS["bus"] = "buses"
_INVARIANT = {"sheep", "fish", "deer", "series", "species", "glasses", "scissors", "pants", "text"}


def singular(word: str) -> str:
    "Best-effort English singular of a lower-case phrase's last word (``people`` -> ``person``)."
    head, _, last = word.rpartition(" ")
    if last in _IRREGULAR_PLURALS:
        last = _IRREGULAR_PLURALS[last]
    elif last in _INVARIANT or len(last) <= 3 or last.endswith(("ss", "us", "is")):
        pass
    elif last.endswith("ies"):
        last = last[:-3] + "y"
    elif last.endswith(("ches", "shes", "xes", "sses", "zes")):
        last = last[:-2]
    elif last.endswith("s"):
        last = last[:-1]
    return f"{head} {last}" if head else last


def plural(word: str) -> str:
    "A best-effort English plural of a noun phrase's last word (``person`` -> ``people``)."
    head, _, last = word.rpartition(" ")
    low = last.lower()
    if low in _IRREGULAR_SINGULARS:
        last = _IRREGULAR_SINGULARS[low]
    elif low in _INVARIANT:
        pass
    elif low.endswith(("ss", "us", "is")):
        last = last + "es"
    elif low.endswith("s"):
        pass  # most likely already plural
    elif low.endswith("y") and low[-2:-1] not in tuple("aeiou"):
        last = last[:-1] + "ies"
    elif low.endswith(("ch", "sh", "x", "z")):
        last = last + "es"
    else:
        last = last + "s"
    return f"{head} {last}" if head else last


def normalize_label(phrase: str) -> str:
    """A class label from a phrase: lower case, no counts or number words, singular.

    ``"3 people"`` -> ``"person"``, ``"Two dogs"`` -> ``"dog"``,
    ``"traffic_lights"`` -> ``"traffic light"``.
    """
    words = re.sub(r"[_\-]+", " ", phrase.lower()).replace("&", " and ")
    words = re.sub(r"[^\w\s']", " ", words).split()
    while words and (words[0] in _NUMBER_WORDS or NUMBER_RE.fullmatch(words[0])):
        words = words[1:]
    return singular(" ".join(words)) if words else ""


def join_words(items, conjunction: str = "and") -> str:
    "``['a', 'b', 'c']`` -> ``'a, b and c'``."
    items = [str(i) for i in items]
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} {conjunction} {items[-1]}"


def region_text(region, image_size, task: str, option: str = "region") -> str:
    """Pixel box -> ``[0.12,0.34,0.56,0.78]`` in padded-square fractions, for a prompt.

    Raises:
        ValueError: naming ``option`` when the box or the image size is missing or unusable.
    """
    if region is None or image_size is None:
        raise ValueError(
            f"task {task!r} needs `{option}` (pixels x1, y1, x2, y2) and `image_size` "
            f"(width, height), got {option}={region!r}, image_size={image_size!r}"
        )
    x1, y1, x2, y2 = region
    if not (x2 > x1 and y2 > y1) or not np.isfinite(region).all():
        raise ValueError(f"`{option}` must be x1 < x2, y1 < y2 in pixels, got {region!r}")
    return format_box(np.clip(PaddedResize().to_model_xyxy([region], image_size)[0], 0.0, 1.0))


def format_box(values) -> str:
    "Normalized box -> SPHINX's prompt form ``[0.12,0.34,0.56,0.78]`` (2 decimals, no spaces)."
    return "[" + ",".join(f"{float(v):.2f}" for v in values) + "]"
