"""REC: referring expression -> its box (docs/formats.md §4.1; prompt and output VERIFIED).

The answer is one bare box, ``[0.61,0.45,0.95,0.83]``. Several ``;``-joined boxes (an ambiguous
expression) keep the first unless ``all_boxes=True``; prose without a bracket gives no box.
"""

from sphinx_tools.hookspecs import hookimpl
from sphinx_tools.parsing import ground_boxes
from sphinx_tools.tasks import DetectionsTask, TaskOptions


class RecOptions(TaskOptions):
    """Attributes:
    expression: the phrase to locate; also the ``class_name`` of the result.
    all_boxes: keep every box of the answer, not only the first.
    """

    expression: str | None = None
    all_boxes: bool = False


class Rec(DetectionsTask):
    "Referring expression comprehension: expression -> ``sv.Detections`` with one box."

    name = "rec"
    description = "Referring expression comprehension: expression -> box"
    templates = {
        "default": "Please provide the bounding box coordinate of the region "
        "this sentence describes: {expression}.",
    }
    Options = RecOptions
    max_gen_len = 64

    def prompt_fields(self, opts):
        if not opts.expression or not opts.expression.strip():
            raise ValueError(
                f"task 'rec' needs `expression`, the phrase to locate, got {opts.expression!r}"
            )
        return {"expression": opts.expression.strip().rstrip(".")}

    def parse_answer(self, answer, image_wh, opts):
        boxes, notes = ground_boxes(
            answer, image_wh, recover_decimals=opts.recover_decimals, max_objects=opts.max_objects
        )
        if not boxes:
            return self.empty(answer, image_wh, opts, notes + ["no box found"])
        if len(boxes) > 1 and not opts.all_boxes:
            notes.append(f"{len(boxes)} boxes in the answer, kept the first")
            boxes = boxes[:1]
        names = [opts.expression or b.phrase or "" for b in boxes]
        return self.detections(answer, boxes, notes, names)


@hookimpl
def register_tasks(register):
    register(Rec())
