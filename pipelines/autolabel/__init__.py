"""Auto-labeling into COCO: fast (shared image encoding and prompt prefill, batched decoding),
resumable (a durable work log), multi-GPU (torchrun data and model parallel), with evaluation.

One call (the ``label`` command's job, returning an ``sv.DetectionDataset``)::

    from sphinx_tools.pipelines.autolabel import label_folder

    result = label_folder("demo", "examples/images", tasks=["detection", "pose"])
    result.dataset        # sv.DetectionDataset; result.coco_path is the COCO file

The parts it runs::

    from sphinx_tools import SphinxModel
    from sphinx_tools.pipelines.autolabel import Labeler, label_dataset, open_source, write_coco

    model = SphinxModel.from_pretrained("ckpt")
    labeler = Labeler(model, ["detection", "pose", "ocr", "caption", "layout"])
    source = open_source("images/")
    label_dataset(labeler, source, "labels.json")   # work log: labels.json.worklog/
    write_coco("labels.json", source, labeler)       # ONE COCO file, written atomically

Command line: ``sphinx-tools label SRC -c CKPT --tasks detection,pose --out labels.json``,
``sphinx-tools export labels.json --format yolo,label-studio --out DIR`` and
``sphinx-tools evaluate labels.json gt.json``.
"""

from sphinx_tools.hookspecs import hookimpl

from .api import LabelResult, label_folder
from .coco import write_coco
from .engine import Labeler, model_fingerprint
from .evaluate import evaluate
from .ontology import Ontology
from .run import RunSummary, label_dataset
from .sources import ImageError, ImageItem, Source, load_image, open_source


@hookimpl
def register_commands(cli):
    "Add ``label``, ``export`` and ``evaluate`` to the ``sphinx-tools`` command group."
    from .cli import evaluate_command, export_command, label_command

    cli.add_command(label_command, "label")
    cli.add_command(export_command, "export")
    cli.add_command(evaluate_command, "evaluate")


__all__ = [
    "ImageError", "ImageItem", "LabelResult", "Labeler", "Ontology", "RunSummary", "Source",
    "evaluate", "label_dataset", "label_folder", "load_image", "model_fingerprint", "open_source",
    "write_coco",
]
