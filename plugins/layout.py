"""Document layout detection (docs/formats.md §4.8).

Prompt: ``Detect the layout of the document in the image.`` (SPHINX-X's training prompt, VERIFIED in
its paper); the ``classes`` variant lists the vocabulary's classes in the question instead.
Read like detection: ``<p>{class}</p> [b1;b2;...]``, or SPHINX-X's tag-less form ``There are
seven text[b1;...;b7], figure[b8], and title[b9] in the image.``, where the noun phrase before
each bare bracket is its label. The raw label is normalized and mapped
through a synonym table into the chosen vocabulary (PubLayNet or DocLayNet);
``data["raw_class_name"]`` keeps the label as written. Extend or replace entries with
``synonyms={"heading": "title"}``.
"""

from functools import lru_cache
from typing import Literal

from sphinx_tools.annotations import RAW_CLASS_NAME_FIELD
from sphinx_tools.hookspecs import hookimpl
from sphinx_tools.parsing import (
    find_mentions,
    ground_boxes,
    join_words,
    name_bare_boxes,
    normalize_label,
)
from sphinx_tools.tasks import DetectionsTask, TaskOptions

VOCABULARIES = {
    "publaynet": ["text", "title", "list", "table", "figure"],
    "doclaynet": [
        "Caption",
        "Footnote",
        "Formula",
        "List-item",
        "Page-footer",
        "Page-header",
        "Picture",
        "Section-header",
        "Table",
        "Text",
        "Title",
    ],
}
# normalized label (see parsing.normalize_label) -> class of the vocabulary
SYNONYMS = {
    "publaynet": {
        "text": "text",
        "paragraph": "text",
        "plain text": "text",
        "body text": "text",
        "caption": "text",
        "figure caption": "text",
        "table caption": "text",
        "footnote": "text",
        "formula": "text",
        "equation": "text",
        "page header": "text",
        "page footer": "text",
        "header": "text",
        "footer": "text",
        "abstract": "text",
        "reference": "text",
        "title": "title",
        "section header": "title",
        "heading": "title",
        "section title": "title",
        "subtitle": "title",
        "headline": "title",
        "list": "list",
        "list item": "list",
        "bullet list": "list",
        "table": "table",
        "figure": "figure",
        "picture": "figure",
        "image": "figure",
        "chart": "figure",
        "photo": "figure",
        "diagram": "figure",
        "graph": "figure",
    },
    "doclaynet": {
        "caption": "Caption",
        "figure caption": "Caption",
        "table caption": "Caption",
        "footnote": "Footnote",
        "formula": "Formula",
        "equation": "Formula",
        "list": "List-item",
        "list item": "List-item",
        "bullet list": "List-item",
        "page footer": "Page-footer",
        "footer": "Page-footer",
        "page header": "Page-header",
        "header": "Page-header",
        "picture": "Picture",
        "figure": "Picture",
        "image": "Picture",
        "chart": "Picture",
        "photo": "Picture",
        "diagram": "Picture",
        "graph": "Picture",
        "section header": "Section-header",
        "heading": "Section-header",
        "section title": "Section-header",
        "subtitle": "Section-header",
        "table": "Table",
        "text": "Text",
        "paragraph": "Text",
        "plain text": "Text",
        "body text": "Text",
        "abstract": "Text",
        "reference": "Text",
        "title": "Title",
        "headline": "Title",
    },
}


class LayoutOptions(TaskOptions):
    """Attributes:
    vocabulary: ``"publaynet"``, ``"doclaynet"`` or ``"raw"`` (labels as normalized, no mapping).
    synonyms: extra ``{label: class}`` entries, applied before the built-in table.
    drop_unknown: drop regions whose label is not in the vocabulary (default: keep them under
        their normalized label, noted).
    """

    vocabulary: Literal["publaynet", "doclaynet", "raw"] = "publaynet"
    synonyms: dict[str, str] | None = None
    drop_unknown: bool = False


def map_label(label: str, vocabulary: str, synonyms=None) -> str | None:
    "Normalized label -> vocabulary class (``None`` if unknown); ``raw`` returns the label."
    return _lookup(label, vocabulary, synonym_table(synonyms))


def synonym_table(synonyms=None) -> dict[str, str]:
    "The user's ``{label: class}`` entries keyed by normalized label (see ``normalize_label``)."
    return {normalize_label(k): v for k, v in (synonyms or {}).items()}


def _lookup(label: str, vocabulary: str, table: dict[str, str]) -> str | None:
    if vocabulary == "raw":
        return label
    if label in table:
        return table[label]
    if label in SYNONYMS[vocabulary]:
        return SYNONYMS[vocabulary][label]
    return _exact_names(vocabulary).get(label)


@lru_cache(maxsize=None)
def _exact_names(vocabulary: str) -> dict[str, str]:
    "The vocabulary's class names keyed by normalized name."
    return {normalize_label(c): c for c in VOCABULARIES[vocabulary]}


class Layout(DetectionsTask):
    "Document layout regions -> ``sv.Detections`` with vocabulary class names."

    name = "layout"
    description = "Document layout regions, class names mapped to PubLayNet/DocLayNet"
    templates = {
        "default": "Detect the layout of the document in the image.",
        "classes": "Detect all layout regions ({classes}) shown in the document image.",
    }
    Options = LayoutOptions
    max_gen_len = 1024

    def prompt_fields(self, opts):
        names = VOCABULARIES.get(opts.vocabulary, VOCABULARIES["publaynet"])
        return {"classes": join_words([n.lower().replace("-", " ") for n in names], "or")}

    def parse_answer(self, answer, image_wh, opts):
        mentions = find_mentions(answer.text, opts.recover_decimals)
        boxes, notes = ground_boxes(
            answer, image_wh, mentions, opts.recover_decimals, opts.max_objects
        )
        name_bare_boxes(answer.text, mentions, boxes)  # tag-less: "seven text[...], figure[...]"
        classes = list(VOCABULARIES.get(opts.vocabulary, []))
        class_ids = {name: i for i, name in enumerate(classes)}
        table = synonym_table(opts.synonyms)
        kept, names, raw = [], [], []
        for box in boxes:
            label = normalize_label(box.phrase or "")
            name = _lookup(label, opts.vocabulary, table) if label else None
            if name is None:
                if opts.drop_unknown:
                    notes.append(
                        f"region labelled {box.phrase!r} dropped (not in {opts.vocabulary})"
                    )
                    continue
                name = label or "unknown"
                box.notes.append(f"label {box.phrase!r} not in {opts.vocabulary}")
            if name not in class_ids:
                class_ids[name] = len(classes)
                classes.append(name)
            kept.append(box), names.append(name), raw.append(box.phrase or "")
        if not kept:
            return self.empty(answer, image_wh, opts, notes + ["no layout region found"])
        ids = [class_ids[n] for n in names]
        return self.detections(
            answer,
            kept,
            notes,
            names,
            class_id=ids,
            classes=classes,
            data={RAW_CLASS_NAME_FIELD: raw},
        )

    def empty(self, answer, image_wh, opts, notes=()):
        detections = super().empty(answer, image_wh, opts, notes)
        detections.data[RAW_CLASS_NAME_FIELD] = detections.data["phrase"].copy()
        return detections


@hookimpl
def register_tasks(register):
    register(Layout())
