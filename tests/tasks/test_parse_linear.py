"""Every parser reads a 1 MB answer in well under a second, whatever the answer holds.

Model text is not bounded by the caller (a long ``max_gen_len``, imported answers), so each
registered task parses pathological 1 MB answers: repeated tags, brackets and numbers, long
digit runs, unclosed pieces, huge phrases and brackets. The time is the process's CPU time; each
parse takes about 0.5 s or less where it was measured, and the bound is the 1 s the parsers
promise. Processes competing for the cores still inflate CPU time (shared caches and memory
bandwidth: 0.43 s was seen as 1.03 s), so a parse over the bound passes only if it is linear: a
quarter of the answer, parsed in the same run, takes at least 1/LINEAR of its time (a quadratic
parser takes 1/16), each timed a few times, interleaved, keeping the least.
"""

import sys
import time
import warnings

import numpy as np
import pytest

from sphinx_tools.parsing import (
    MAX_GROUPS,
    MAX_PHRASE_CHARS,
    Answer,
    find_brackets,
    find_mentions,
    find_phrases,
    strip_markup,
)
from sphinx_tools.registry import get_task, list_tasks

SIZE = 1_000_000  # characters per answer
BOUND_S = 1.0
LINEAR = 8.0  # 4 x the text: 4 x the time if linear, 16 x if quadratic


def repeated(unit: str, size: int = SIZE) -> str:
    return (unit * (size // len(unit) + 1))[:size]


def varied(template: str, size: int = SIZE) -> str:
    "``template`` repeated with coordinates that differ from one copy to the next."
    pieces, n, i = [], 0, 0
    while n < size:
        a, b = (i % 97) / 100, (i // 97 % 97) / 100
        piece = template.format(a=a, b=b, c=min(a + 0.02, 1), d=min(b + 0.02, 1))
        pieces.append(piece)
        n, i = n + len(piece), i + 1
    return "".join(pieces)[:size]


def product_of_boxes(size: int = SIZE) -> str:
    "Two phrases of 2000 boxes joined by a predicate: relation triples are their product."
    boxes = ";".join(f"{i % 97 / 100:.2f},{i // 97 / 100:.2f},0.99,0.99" for i in range(2000))
    grounded = f"<p>a</p>[{boxes}] on <p>b</p>[{boxes}]."
    return grounded + repeated(" and so on", size - len(grounded))


ANSWERS = {  # kind -> the answer of n characters
    "open tags": lambda n: repeated("<p>", n),
    "close tags": lambda n: repeated("</p>", n),
    "open brackets": lambda n: repeated("[", n),
    "unbalanced brackets": lambda n: repeated("[[]", n),
    "unclosed groups": lambda n: repeated("[0.1,", n),
    "unclosed points": lambda n: repeated("[0.1,0.2,", n),
    "semicolons": lambda n: repeated("[0.1;", n),
    "grounded boxes": lambda n: repeated("<p>x</p>[0.1,0.2,0.3,0.4]", n),
    "distinct boxes": lambda n: varied("<p>x</p>[{a:.2f},{b:.2f},{c:.2f},{d:.2f}]", n),
    "bare boxes after text": lambda n: repeated("x[0.1,0.2,0.3,0.4]", n),
    "bare boxes after a clause": lambda n: repeated("foo.[0.1,0.2,0.3,0.4]", n),
    "unclosed phrases and boxes": lambda n: repeated("<p>a[0.1,0.2,0.3,0.4]", n),
    "one bracket of groups": lambda n: "[" + repeated("0.1,0.2,0.3,0.4;", n - 2) + "]",
    "digits": lambda n: repeated("1", n),
    "newlines": lambda n: repeated("\n", n),
    "marks": lambda n: repeated("Mark 1:", n),
    "html entities": lambda n: repeated("&lt;p&gt;", n),
    "key points": lambda n: varied("<p>nose</p>[{a:.2f},{b:.2f}]<p>zz</p>[0.1,0.1]", n),
    "long phrase then boxes": lambda n: "<p>" + "a" * (n // 2) + "</p>[0.1,0.2,0.3,0.4]"
    + varied("<p>x</p>[{a:.2f},{b:.2f},{c:.2f},{d:.2f}]", n // 2),
    "box product": product_of_boxes,
    # SPHINX-X forms: tag-less names before bare brackets, flat key-point lists, mark lines
    "words before bare boxes": lambda n: repeated("There are two people[0.1,0.2,0.3,0.4], ", n),
    "long words before bare boxes": lambda n: repeated("x" * 5000 + " [0.1,0.2,0.3,0.4]", n),
    "bare boxes after long clauses": lambda n: repeated("word " * 300 + "[0.1,0.2,0.3,0.4]", n),
    "bare boxes inside a long word": lambda n: repeated("x" * 1200 + "[0.1,0.2,0.3,0.4]two", n),
    "flat key points": lambda n: varied(
        "human keypoints [" + ",".join(["{a:.2f},{b:.2f}"] * 17) + "] ", n
    ),
    "mark lines": lambda n: repeated("- Mark 1: a cat\n", n),
}


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def too_slow(parse, text: str, quarter: str, rounds: int = 3) -> dict | None:
    """None if ``parse(text)`` takes under BOUND_S of CPU, or under LINEAR x ``parse(quarter)``
    (a quarter of the answer: the bound was missed under contention, not by super-linear work);
    else the two times.

    Past the bound, both are timed ``rounds`` more times, interleaved, and each keeps its least
    time: a burst of contention inflates one measurement, not the least of several (a single
    pair was seen at 1.03 s against 0.101 s, a ratio of 10 for a linear parser)."""
    big = cpu_seconds(lambda: parse(text))
    if big < BOUND_S:
        return None
    small = float("inf")
    for _ in range(rounds):
        small = min(small, cpu_seconds(lambda: parse(quarter)))
        big = min(big, cpu_seconds(lambda: parse(text)))
        if big < BOUND_S or big < LINEAR * small:
            return None
    return {"1 MB": round(big, 2), "quarter": round(small, 3)}


def burn(seconds: float) -> None:
    "Spend ``seconds`` of this process's CPU."
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_the_check_passes_linear_work_over_the_bound_and_flags_quadratic_work():
    text, quarter = "x" * SIZE, "x" * (SIZE // 4)
    assert too_slow(lambda t: burn(1.2 * len(t) / SIZE), text, quarter) is None
    slow = too_slow(lambda t: burn(1.2 * (len(t) / SIZE) ** 2), text, quarter, rounds=1)
    assert slow is not None and slow["1 MB"] >= 1.2 and slow["quarter"] < 0.15


@pytest.mark.parametrize("kind", list(ANSWERS))
def test_every_task_parses_a_pathological_megabyte_in_under_a_second(kind):
    text, quarter = ANSWERS[kind](SIZE), ANSWERS[kind](SIZE // 4)
    assert len(text) >= SIZE * 0.99 and len(quarter) >= SIZE // 4 * 0.99
    slow = {}
    for task in list_tasks():
        options = {"max_objects": 10**9} if kind == "box product" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # the parse() safety net is not hit
            seconds = too_slow(lambda t: task.parse(t, (640, 480), **options), text, quarter)
        if seconds:
            slow[task.name] = seconds
    assert not slow, f"{kind}: {slow}"


@pytest.mark.parametrize("kind", ["marks", "mark lines", "words before bare boxes", "digits"])
def test_reg_marks_parse_a_pathological_megabyte_in_under_a_second(kind):
    reg = get_task("reg")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        seconds = too_slow(lambda t: reg.parse(t, (640, 480), marks=[(1, 2)] * 3),
                           ANSWERS[kind](SIZE), ANSWERS[kind](SIZE // 4))
    assert not seconds, (kind, seconds)


def test_a_megabyte_with_token_logprobs_in_under_a_second():
    def parse(name, text):
        offsets = np.arange(0, len(text), 3)
        logprobs = np.full(len(offsets), -0.1)
        return get_task(name).parse(text, (640, 480), logprobs=logprobs, offsets=offsets)

    text, quarter = ANSWERS["distinct boxes"](SIZE), ANSWERS["distinct boxes"](SIZE // 4)
    for name in ("detection", "grounded_caption", "relation"):
        seconds = too_slow(lambda t: parse(name, t), text, quarter)
        assert not seconds, (name, seconds)


# -- what the bounded reading keeps ---------------------------------------------------------------
def test_at_most_max_groups_coordinate_groups_are_read_with_a_note():
    text = varied("[{a:.2f},{b:.2f},{c:.2f},{d:.2f}] ", 40 * (MAX_GROUPS + 50))
    groups = [g for b in find_brackets(text) for g in b.groups]
    assert len(groups) == MAX_GROUPS
    assert len([g for b in find_brackets(text, max_groups=None) for g in b.groups]) > MAX_GROUPS
    detections = get_task("detection").parse(text, (640, 480), max_objects=10**9)
    assert len(detections) <= MAX_GROUPS
    assert f"read the first {MAX_GROUPS} coordinate groups only" in detections.metadata[
        "parse_notes"
    ]


def test_strip_markup_still_removes_every_bracket_of_a_long_answer():
    text = "word [0.1,0.2,0.3,0.4] " * (MAX_GROUPS + 100)
    assert strip_markup(text) == " ".join(["word"] * (MAX_GROUPS + 100))
    lost = "word [0.1,0.2 " * (MAX_GROUPS + 100)  # each "]" lost before more text
    assert strip_markup(lost) == " ".join(["word"] * (MAX_GROUPS + 100))


def test_a_phrase_keeps_its_first_max_phrase_chars_characters():
    long = "a" * (MAX_PHRASE_CHARS + 500)
    (phrase,) = find_phrases(f"<p> {long} </p>[0.1,0.2,0.3,0.4]")
    assert phrase.text == long[:MAX_PHRASE_CHARS] and phrase.span == (4, 4 + MAX_PHRASE_CHARS)
    caption = get_task("grounded_caption").parse(f"<p>{long}</p>[0.1,0.2,0.3,0.4]", (640, 480))
    (entity,) = caption.entities
    assert entity.phrase == long[:MAX_PHRASE_CHARS]


def test_grounded_caption_reads_many_bare_brackets_after_one_long_clause():
    "Each bare bracket guesses its phrase from the clause before it, read from the end."
    def answer(k):  # k = 1: 300 kB
        clause = "A " + "very " * (50_000 // k) + "red ball."
        return clause + " two dogs [0.1,0.2,0.3,0.4]." * (2000 // k)

    def parse(text):
        return get_task("grounded_caption").parse(text, (640, 480))

    assert not too_slow(parse, answer(1), answer(4))
    assert {e.phrase for e in parse(answer(1)).entities} == {"two dogs"}


def test_pose_rows_share_the_answer_and_stop_at_max_objects():
    text = varied("<p>nose</p>[{a:.2f},{b:.2f}]", 200_000)
    key_points = get_task("pose").parse(text, (640, 480), max_objects=5)
    assert len(key_points) == 5
    raw = key_points.data["raw_text"]
    assert all(r is raw[0] for r in raw) and raw[0] == text  # one string, not five copies
    assert "stopped at max_objects=5" in key_points.data["parse_notes"][0]
    assert sum(len(n) for n in key_points.data["parse_notes"]) < 50_000  # notes are bounded


def test_relation_triples_stop_at_the_cap():
    relation = get_task("relation")
    cap = sys.modules[type(relation).__module__].MAX_TRIPLES
    graph = relation.parse(product_of_boxes(), (640, 480), max_objects=10**9)
    assert len(graph.triples) == cap
    assert f"stopped at {cap} triples" in graph.detections.metadata["parse_notes"]


# -- confidence over sorted tokens matches the direct formula -------------------------------------
def reference_confidence(answer: Answer, spans):
    mask = np.zeros(answer.logprobs.shape, dtype=bool)
    for span in spans:
        a, b = answer.raw_span(span)
        if b > a:
            mask |= (answer.token_starts < b) & (answer.token_ends > a)
    values = answer.logprobs[mask]
    values = values[~np.isnan(values)]
    return None if values.size == 0 else float(np.exp(np.clip(values.mean(), -np.inf, 0.0)))


@pytest.mark.parametrize("seed", range(20))
def test_confidence_equals_the_direct_token_mask(seed):
    rng = np.random.default_rng(seed)
    raw = "<p>a dog</p> [0.1,0.2,0.3,0.4] and &lt;p&gt;cat&lt;/p&gt; [0.5,0.5,0.9,0.9]</s>"
    n = int(rng.integers(1, len(raw)))
    offsets = np.sort(rng.integers(0, len(raw), n))
    if seed % 2:
        offsets = rng.permutation(offsets)  # unsorted offsets take the mask path
    logprobs = rng.uniform(-3, 0, n)
    logprobs[rng.random(n) < 0.1] = np.nan
    answer = Answer.from_generation(raw, logprobs, offsets)
    for mention in find_mentions(answer.text):
        spans = [g.span for g in mention.bracket.groups] if mention.bracket else []
        spans += [mention.phrase.span] if mention.phrase else []
        assert answer.confidence(spans) == reference_confidence(answer, spans)
