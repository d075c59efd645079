"""Label a folder in one call: :func:`label_folder`, the ``sphinx-tools label`` job from Python.

It runs the same engine as the command (the work log beside the output, resume, the one COCO
file) and hands back the labels as an ``sv.DetectionDataset``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import supervision as sv

from .coco import MergeSummary
from .run import RunSummary


@dataclass
class LabelResult:
    """What :func:`label_folder` did.

    Attributes:
        dataset: the labels as ``sv.DetectionDataset`` (classes in category-id order; images are
            loaded from disk when indexed). Only the COCO file's box annotations are in it: read
            captions, relations and VQA answers from ``coco_path``.
        coco_path: the COCO file written (its work log is ``<coco_path>.worklog/``).
        summary: this run: labeled, skipped (already in the log), failed, seconds.
        merged: the merge: counts per section, images not labeled, boxes the filters dropped.
    """

    dataset: sv.DetectionDataset
    coco_path: Path
    summary: RunSummary
    merged: MergeSummary

    @property
    def failed(self) -> list:
        "``(file name, reason)`` of the images that failed in this run."
        return self.summary.failed


def label_folder(model, path, tasks=("detection",), *, out=None, ontology=None,
                 categories=None, task_options: dict | None = None, min_score: float | None = None,
                 nms: float | None = None, nms_class_agnostic: bool = False,
                 batch_size: int = 8, limit: int | None = None, overwrite: bool = False,
                 progress: bool = True, sam_predictor=None, mask_format: str = "rle",
                 device: str = "auto", **sampling) -> LabelResult:
    """Auto-label a folder (or a file list, or a COCO / RefCOCO json) into one COCO file and
    return it as an ``sv.DetectionDataset``; resumable like ``sphinx-tools label``.

    Args:
        model: a loaded ``SphinxModel``, or a checkpoint folder / ``"demo"`` to load (on
            ``device``).
        path: what to label (see :func:`~.sources.open_source`).
        tasks: task names, e.g. ``["detection", "pose", "ocr"]``.
        out: the COCO file to write; default ``<path>.labels.json`` beside ``path``. A re-run
            with the same ``out`` skips the work in its log.
        ontology: classes with synonyms (an :class:`~.ontology.Ontology`, or its spec such as
            ``"person=man|woman,car"``).
        categories: COCO categories (a list of dicts, or the path of a COCO file) whose names
            and ids the output uses.
        task_options: ``{task: {option: value}}``, e.g. ``{"vqa": {"question": "Is it day?"}}``.
        min_score, nms, nms_class_agnostic: drop boxes (see :class:`~.filters.AnnotationFilter`).
        batch_size, limit, overwrite, progress: as the command's options.
        sam_predictor: a ``SamPredictor``: masks for the boxes.
        mask_format: masks as ``"rle"`` or ``"polygon"`` in the COCO file.
        device: where to load ``model`` when it is a path (``"auto"``: CUDA when present).
        **sampling: ``max_gen_len``, ``temperature``, ``top_p``, ``seed``.

    Returns:
        A :class:`LabelResult`.

    Raises:
        ValueError: naming a bad task, option or source entry (before the model runs).
    """
    from .engine import Labeler, model_fingerprint
    from .filters import AnnotationFilter
    from .ontology import Ontology
    from .sources import open_source, read_categories
    from .worklog import OutputLock, check_writable

    source = open_source(path)
    if isinstance(categories, (str, Path)):
        categories = read_categories(categories)
    if isinstance(ontology, str):
        ontology = Ontology.parse(ontology)
    elif ontology is None and (categories or source.categories):
        ontology = Ontology.from_categories(categories or source.categories)
    out = Path(out) if out is not None else _default_out(Path(path))
    flt = AnnotationFilter(min_score=min_score, nms=nms, class_agnostic=nms_class_agnostic)
    if isinstance(model, (str, Path)):
        model = _load(model, device)
    # the command's model id for the same checkpoint, so the two share a work log
    checkpoint = (getattr(model, "load_stats", None) or {}).get("path")
    model_id = model_fingerprint(checkpoint) if checkpoint is not None else "model"
    labeler = Labeler(model, list(tasks), task_options=task_options, ontology=ontology,
                      model_id=model_id, sam_predictor=sam_predictor,
                      sam_id=None if sam_predictor is None else type(sam_predictor).__name__,
                      **sampling)
    check_writable(out)
    with OutputLock(out):
        summary = label_dataset_for(labeler, source, out, batch_size, limit, overwrite, progress)
        merged = _write(out, source, labeler, limit, mask_format, categories, flt)
    dataset = sv.DetectionDataset.from_coco(images_directory_path=str(source.root),
                                            annotations_path=str(out),
                                            force_masks=labeler.uses_sam)
    return LabelResult(dataset, out, summary, merged)


def label_dataset_for(labeler, source, out, batch_size, limit, overwrite, progress):
    from .run import label_dataset

    return label_dataset(labeler, source, out, batch_size=batch_size, limit=limit,
                         overwrite=overwrite, progress=progress)


def _write(out, source, labeler, limit, mask_format, categories, flt):
    from .coco import write_coco

    return write_coco(out, source, labeler, limit=limit, mask_format=mask_format,
                      categories=categories, annotation_filter=flt)


def _default_out(path: Path) -> Path:
    return path.with_name(path.name + ".labels.json")


def _load(checkpoint, device: str):
    import torch

    from sphinx_tools.sphinx_model import SphinxModel

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return SphinxModel.from_pretrained(checkpoint, device=device)
