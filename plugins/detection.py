"""Object detection: all objects, or given classes.

docs/formats.md §4.5: prompt VERIFIED, output INFERRED.

Expected answer: ``<p>{label}</p> [b1;b2;...]`` per category, possibly inside prose (``There are
<p>13 ships</p>[...] in the image.``), or without tags (SPHINX-X: ``There are two people[...] in
the image.``), where the noun phrase before a bare bracket is its phrase unless a single class was
asked for. Labels are normalized (counts and number words removed,
singular) and matched to the requested classes; ``class_id`` indexes ``metadata["classes"]``, which
lists the requested classes and then any other label the model used. The phrase as written is
kept in ``data["phrase"]``.
"""

from sphinx_tools.hookspecs import hookimpl
from sphinx_tools.parsing import (
    find_mentions,
    ground_boxes,
    join_words,
    name_bare_boxes,
    normalize_label,
    plural,
)
from sphinx_tools.tasks import DetectionsTask, TaskOptions


class DetectionOptions(TaskOptions):
    """Attributes:
    classes: class names to detect (``None``: all objects). Bare boxes get the class when only
        one is asked for.
    """

    classes: list[str] | None = None


def assign_classes(labels, requested):
    """Match normalized labels to requested class names.

    Args:
        labels: n labels (already normalized, ``""`` for unknown).
        requested: the class names asked for, or ``None``.

    Returns:
        ``(class_name, class_id, classes)``: n names, n indices into ``classes``, and ``classes``
        (requested names first, then new labels in order of appearance).
    """
    classes = list(requested or [])
    index = {normalize_label(c): i for i, c in enumerate(classes)}
    names, ids = [], []
    for label in labels:
        if label not in index:
            index[label] = len(classes)
            classes.append(label)
        ids.append(index[label])
        names.append(classes[index[label]])
    return names, ids, classes


class Detection(DetectionsTask):
    "Detect all objects (or the given classes) -> ``sv.Detections`` with ``class_name``."

    name = "detection"
    description = "Object detection: all objects or given classes"
    templates = {"default": "Detect all {classes} shown in the image."}
    Options = DetectionOptions
    max_gen_len = 1024

    def prompt_fields(self, opts):
        if opts.classes is not None and not [c for c in opts.classes if c.strip()]:
            raise ValueError(f"`classes` must name at least one class, got {opts.classes!r}")
        classes = [plural(c.strip()) for c in opts.classes or [] if c.strip()]
        return {"classes": join_words(classes) if classes else "objects"}

    def parse_answer(self, answer, image_wh, opts):
        mentions = find_mentions(answer.text, opts.recover_decimals)
        boxes, notes = ground_boxes(
            answer, image_wh, mentions, opts.recover_decimals, opts.max_objects
        )
        if not boxes:
            return self.empty(answer, image_wh, opts, notes + ["no box found"])
        one_class = opts.classes and len(opts.classes) == 1
        default = normalize_label(opts.classes[0]) if one_class else "object"
        if not one_class:  # tag-less form: the words before a bare bracket name it
            name_bare_boxes(answer.text, mentions, boxes)
        labels = []
        for box in boxes:
            label = normalize_label(box.phrase) if box.phrase else ""
            if not label:
                box.notes.append(f"box without a label, named {default!r}")
            labels.append(label or default)
        names, ids, classes = assign_classes(labels, opts.classes)
        return self.detections(answer, boxes, notes, names, class_id=ids, classes=classes)


@hookimpl
def register_tasks(register):
    register(Detection())
