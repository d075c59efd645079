"""Relations: relation grounding and subject-predicate-object triples (docs/formats.md §4.2).

Prompt VERIFIED for grounding (the demo's "Relationship Grounding" uses the REC wording with an
expression such as ``people on car``); output UNKNOWN. The ``triplets`` variant's prompt is a guess.

Every box becomes a row of ``SceneGraph.detections`` (``class_name`` = its phrase, or the subject /
expression for a bare box). A triple is read wherever two grounded phrases are joined by a short
predicate: ``<p>people</p> [b1;b2] on <p>car</p> [b3]`` gives ``(0, "on", 2)`` and ``(1, "on", 2)``.
A bare box answer (the REC-like form) gives detections and no triples.
"""

import re
from itertools import islice

from sphinx_tools.annotations import SceneGraph
from sphinx_tools.hookspecs import hookimpl
from sphinx_tools.parsing import find_mentions, ground_boxes
from sphinx_tools.tasks import DetectionsTask, TaskOptions

MAX_PREDICATE_WORDS = 6
MAX_TRIPLES = 10_000  # triples read from one answer (two mentions of n boxes give n * n)
_SENTENCE_BREAK = re.compile(r"[.!?;\n]")


class RelationOptions(TaskOptions):
    """Attributes:
    expression: the relation to ground, e.g. ``"people on car"``.
    subject, predicate, object: the same as parts; joined when ``expression`` is not given.
    """

    expression: str | None = None
    subject: str | None = None
    predicate: str | None = None
    object: str | None = None


def predicate_between(text: str) -> str | None:
    "The predicate in the text between two grounded phrases, or ``None`` if it is not one."
    gap = text.strip().strip(",").strip()
    if not gap or _SENTENCE_BREAK.search(gap) or "<" in gap or "[" in gap:
        return None
    words = gap.split()
    return " ".join(words) if len(words) <= MAX_PREDICATE_WORDS else None


class Relation(DetectionsTask):
    "Relation grounding / triples -> :class:`SceneGraph`."

    name = "relation"
    output = SceneGraph
    description = "Relation grounding / subject-predicate-object triples"
    templates = {
        "default": "Please provide the bounding box coordinate of the region "
        "this sentence describes: {expression}.",
        "triplets": "Detect the relationships between the objects in the image. "
        "Include the bounding box for each mentioned object.",
    }
    Options = RelationOptions
    max_gen_len = 512

    def prompt_fields(self, opts):
        expression = opts.expression or " ".join(
            p for p in (opts.subject, opts.predicate, opts.object) if p
        )
        if opts.variant == "default" and not expression.strip():
            raise ValueError(
                "task 'relation' needs `expression` (or subject/predicate/object), got none"
            )
        return {"expression": expression.strip().rstrip(".")}

    def parse_answer(self, answer, image_wh, opts):
        mentions = find_mentions(answer.text, opts.recover_decimals)
        boxes, notes = ground_boxes(
            answer, image_wh, mentions, opts.recover_decimals, opts.max_objects
        )
        if not boxes:
            return self.empty(answer, image_wh, opts, notes + ["no box found"])
        bare_name = opts.subject or opts.expression or ""
        names = [b.phrase or bare_name for b in boxes]
        rows = {}
        for row, box in enumerate(boxes):
            rows.setdefault(box.mention, []).append(row)
        triples = self._triples(answer.text, mentions, rows)
        if not triples:
            notes.append("no subject-predicate-object triple found")
        elif len(triples) >= MAX_TRIPLES:
            notes.append(f"stopped at {MAX_TRIPLES} triples")
        return SceneGraph(self.detections(answer, boxes, notes, names), triples)

    @staticmethod
    def _triples(text, mentions, rows):
        "Triples between consecutive grounded mentions joined by a short predicate."
        grounded = [i for i in range(len(mentions)) if i in rows]
        triples = []
        for a, b in zip(grounded, grounded[1:], strict=False):
            if mentions[a].phrase is None or mentions[b].phrase is None:
                continue
            predicate = predicate_between(text[mentions[a].span[1] : mentions[b].span[0]])
            if predicate:
                pairs = ((s, predicate, o) for s in rows[a] for o in rows[b])
                triples += islice(pairs, MAX_TRIPLES - len(triples))
            if len(triples) >= MAX_TRIPLES:
                break
        return triples

    def empty(self, answer, image_wh, opts, notes=()):
        return SceneGraph(super().empty(answer, image_wh, opts, notes), [])


@hookimpl
def register_tasks(register):
    register(Relation())
