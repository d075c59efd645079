"""The labeling engine: several tasks on a batch of images with shared work.

For a batch of images, every question of every first-stage task (detection, OCR, caption, ...)
goes to one ``model.generate_multi`` call: each image is encoded once, its common prompt prefix
prefilled once, and the questions decode together (continuous batching: when an answer ends its
row leaves the batch, or, with ``max_rows``, goes to the next waiting question). Tasks that need
detection's boxes (pose: person boxes; REG: every box) run as a second, equally batched stage.
SAM masks, when a SAM predictor is given, are a third stage. The result of each (image, task)
becomes a work-log record (``sphinx_tools/records.py``), keyed by :meth:`Labeler.task_key`.

Images are held small: :meth:`Labeler.hold` keeps, per decoded image, only what the stages need:
the model's input (its preprocessed tensor, or a copy no larger than twice the model's input side)
and, for SAM, a copy no larger than SAM's input; the original size is kept for coordinates.
"""

from __future__ import annotations

import inspect
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import sphinx_tools
from sphinx_tools.conversation import build_prompt
from sphinx_tools.parsing import Answer, normalize_label
from sphinx_tools.records import detections_to_json, record_boxes, to_record
from sphinx_tools.registry import get_task
from sphinx_tools.run import parse_generation, trained_options as model_trained_options

from .ontology import Ontology
from .sources import ImageItem

PARSER_VERSION = "autolabel-1"
STAGE2 = {"pose": "boxes", "reg": "regions"}  # task -> option filled from detection's boxes
DEFAULT_TASK_OPTIONS = {"relation": {"variant": "triplets"}}
MASKED_TASKS = ("detection", "rec", "layout", "relation", "grounded_caption")
SEGMENT = "segment"  # the pseudo-task of SAM masks
PERSON = "person"
DEFAULT_INPUT_SIDE = 448  # SPHINX-1k's input, for models that do not say theirs
DEFAULT_SAM_SIDE = 1024  # SAM's input (ResizeLongestSide), for predictors that do not say theirs
HOLD_FACTOR = 2  # images without a model tensor are held up to this many input sides
# Questions decoded at once: None, all the questions of a stage (a finished answer's row leaves
# the batch). On CPU that beats a cap (bench_speed.py, "continuous"); a cap bounds the memory of
# the rows (a finished answer's row then goes to the next waiting question).
DEFAULT_MAX_ROWS = None


@dataclass
class Work:
    """One image of a batch: what it is, its pixels and which tasks it still needs.

    Attributes:
        item: the source item.
        image: what the model is given: an RGB image or the model's preprocessed tensor (see
            :meth:`Labeler.hold`; ``None`` when the image failed to load).
        hash: the content hash.
        keys: ``{task: work key}`` of every task (and ``"segment"``) for this image.
        pending: the tasks (and ``"segment"``) to run.
        error: why the image failed, or ``None``.
        size: ``(width, height)`` of the decoded image, which every coordinate refers to
            (``None``: ``image.size``).
        sam_image: the RGB image SAM is given (``None``: ``image``).
        logged: ``{task: work-log record}`` of finished box tasks whose boxes the mask stage
            needs.
    """

    item: ImageItem
    image: object = None
    hash: str | None = None
    keys: dict = field(default_factory=dict)
    pending: list = field(default_factory=list)
    error: str | None = None
    size: tuple | None = None
    sam_image: object = None
    logged: dict = field(default_factory=dict)

    @property
    def wh(self) -> tuple[int, int]:
        "The original ``(width, height)``: parsed coordinates and masks are in its pixels."
        return tuple(self.size) if self.size is not None else self.image.size


class Timer:
    "Accumulated wall seconds per named section."

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


class Labeler:
    """Runs a fixed set of tasks on batches of images with one model.

    Args:
        model: a ``SphinxModel`` (anything with ``generate_multi(images, questions, ...)``).
        tasks: task names, e.g. ``["detection", "pose", "ocr", "caption", "layout"]``.
        task_options: per task, options for its prompt (``{"vqa": {"question": "..."}}``); they
            override ``trained_options``.
        trained_options: per task, the options the checkpoint was trained to be asked with (its
            ``task_options.json``); ``None``: the model's own (``model.task_options``), so give
            them when the model is set later.
        ontology: maps detection phrases to categories; its classes are asked for by detection
            (unless ``task_options["detection"]["classes"]`` is given) and pick pose's persons.
        max_gen_len: generation budget of every question; ``None``: each task's own
            (``Task.max_gen_len``: 64 tokens for a REC box, 1024 for a detection list).
        temperature: 0 for greedy (reproducible labels).
        top_p: nucleus mass when sampling.
        seed: sampling seed.
        model_id: names the model in work-log keys (see :func:`model_fingerprint`).
        sam_predictor: a SAM predictor for masks of box results, or ``None``.
        sam_id: names the SAM checkpoint in work-log keys.
        max_rows: questions decoded at once (continuous batching: when an answer ends, the next
            question takes its row); ``None`` for all the questions of a stage at once. Labels
            do not depend on it.

    Raises:
        ValueError: for an empty task list, bad task options, or REG without boxes to describe.
        UnknownTaskError: for a task name that is not registered.
    """

    def __init__(self, model, tasks, *, task_options=None, trained_options: dict | None = None,
                 ontology: Ontology | None = None,
                 max_gen_len: int | None = None, temperature: float = 0.0, top_p: float = 0.95,
                 seed: int = 0, model_id: str = "model", sam_predictor=None,
                 sam_id: str | None = None, max_rows: int | None = DEFAULT_MAX_ROWS):
        self.model = model
        self.names = list(dict.fromkeys(tasks))
        if not self.names:
            raise ValueError("need at least one task, got none")
        self.tasks = {name: get_task(name) for name in self.names}
        self.ontology = ontology
        if trained_options is None:
            trained_options = {n: model_trained_options(model, n) for n in self.names}
        self.options = self._task_options(task_options or {}, trained_options)
        if max_gen_len is not None and int(max_gen_len) < 1:
            raise ValueError(f"max_gen_len must be >= 1, got {max_gen_len}")
        self.max_gen_len = None if max_gen_len is None else int(max_gen_len)
        self.sampling = dict(temperature=float(temperature), top_p=float(top_p), seed=int(seed))
        self.model_id = model_id
        self.sam_predictor = sam_predictor
        self.sam_id = sam_id
        if max_rows is not None and int(max_rows) < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
        self.max_rows = None if max_rows is None else int(max_rows)
        self.timer = Timer()
        self._check_options()

    # -- configuration -----------------------------------------------------------------------
    def _task_options(self, given: dict, trained: dict) -> dict:
        unknown = sorted(set(given) - set(self.names))
        if unknown:
            raise ValueError(f"options given for task(s) {unknown} that are not run; "
                             f"tasks: {self.names}")
        options = {n: {**DEFAULT_TASK_OPTIONS.get(n, {}), **trained.get(n, {}), **given.get(n, {})}
                   for n in self.names}
        if "detection" in options and self.ontology is not None and self.ontology.classes:
            options["detection"].setdefault("classes", self.ontology.prompt_classes())
        return options

    def _check_options(self) -> None:
        "Build every prompt once on a dummy size so bad options fail before any image is read."
        if "reg" in self.names and "detection" not in self.names \
                and not self.options["reg"].get("regions") and not self.options["reg"].get("region"):
            raise ValueError("task 'reg' describes regions: run it with 'detection' (its boxes) "
                             "or give `regions` in its options")
        for name in self.stage1_tasks():
            if name == "rec" and not self._given_expressions():
                continue  # expressions come from the source (RefCOCO-style json)
            for q in self._split(name, (64, 64), None, []):
                self.tasks[name].prompt(**q)

    def _given_expressions(self) -> list:
        opts = self.options.get("rec", {})
        given = opts.get("expressions") or ([opts["expression"]] if opts.get("expression") else [])
        return [(str(i), e) for i, e in enumerate(given)]

    def stage1_tasks(self) -> list[str]:
        "First-stage tasks, plus detection when a second-stage task needs its boxes."
        first = [n for n in self.names if not self._is_stage2(n)]
        return first

    def stage2_tasks(self) -> list[str]:
        return [n for n in self.names if self._is_stage2(n)]

    def _is_stage2(self, name: str) -> bool:
        return name in STAGE2 and "detection" in self.names

    # -- keys --------------------------------------------------------------------------------
    def _base(self) -> list:
        return [PARSER_VERSION, sphinx_tools.__version__, self.model_id, self.sampling]

    def _spec(self, name: str) -> list:
        task, opts = self.tasks[name], self.options[name]
        clean = {k: v for k, v in opts.items() if k not in ("expressions",)}
        try:
            template = task.template(task.options(**{k: v for k, v in clean.items()
                                                      if k in task.Options.model_fields}))
        except ValueError:
            template = None
        return [name, task.plugin, json.dumps(opts, sort_keys=True, default=str), template,
                self.budget(name)]

    def budget(self, name: str) -> int:
        "The generation budget of each of task ``name``'s questions."
        return self.max_gen_len or self.tasks[name].max_gen_len

    def task_key(self, name: str, content_hash: str, item: ImageItem) -> str:
        "The work-log key of ``name`` on this image content (and, for REC, its expressions)."
        from .worklog import work_key

        extra = item.expressions if name == "rec" else None
        dep = None
        if self._is_stage2(name):
            dep = [self.task_key("detection", content_hash, item),
                   self.ontology.fingerprint() if self.ontology is not None else None]
        return work_key(self._base(), content_hash, self._spec(name), extra, dep)

    def segment_key(self, content_hash: str, item: ImageItem) -> str:
        from .worklog import work_key

        masked = [self.task_key(n, content_hash, item) for n in self.names if n in MASKED_TASKS]
        return work_key(PARSER_VERSION, SEGMENT, self.sam_id, masked)

    def keys(self, content_hash: str, item: ImageItem) -> dict[str, str]:
        "``{task: key}`` for every task of this image, plus ``segment`` when SAM is used."
        keys = {n: self.task_key(n, content_hash, item) for n in self.names}
        if self.uses_sam:
            keys[SEGMENT] = self.segment_key(content_hash, item)
        return keys

    @property
    def work_names(self) -> list[str]:
        "The tasks of every image, plus ``segment`` when SAM masks are made."
        return self.names + ([SEGMENT] if self.uses_sam else [])

    @property
    def uses_sam(self) -> bool:
        return self.sam_predictor is not None and any(n in MASKED_TASKS for n in self.names)

    def mask_inputs(self, pending) -> list[str]:
        "The finished box tasks whose logged boxes the mask stage needs, given the pending work."
        if SEGMENT not in pending:
            return []
        return [n for n in self.names if n in MASKED_TASKS and n not in pending]

    # -- held images -------------------------------------------------------------------------
    @property
    def input_side(self) -> int:
        "The side of the model's square input (the largest size its image transform makes)."
        side = getattr(getattr(self.model, "transform", None), "target_size", None)
        return int(side) if side else DEFAULT_INPUT_SIDE

    @property
    def sam_side(self) -> int:
        "The longest side of SAM's input."
        side = getattr(getattr(self.sam_predictor, "transform", None), "target_length", None)
        return int(side) if side else DEFAULT_SAM_SIDE

    def hold(self, work: Work, image) -> None:
        """Keep on ``work`` only what labeling needs of the decoded RGB ``image``.

        - ``work.size``: the original size (every coordinate is in its pixels);
        - ``work.image``: the model's preprocessed tensor when the model has ``preprocess``
          (exactly what it would make of the full image), else the image, downscaled (bicubic)
          to a longest side of ``HOLD_FACTOR`` input sides when larger;
        - ``work.sam_image`` (with SAM): the image as SAM's own transform resizes it when its
          longest side is above SAM's input, else the image; masks still come out at the
          original size (see :func:`segmenting.masks_for_boxes`).

        The full image is dropped when this returns, so a batch holds a bounded number of pixels
        per image whatever the image size.
        """
        from PIL import Image

        work.size = image.size
        preprocess = getattr(self.model, "preprocess", None)
        if callable(preprocess):
            work.image = preprocess(image)
        else:
            work.image = _shrink(image, HOLD_FACTOR * self.input_side)
        if self.uses_sam:
            transform = getattr(self.sam_predictor, "transform", None)
            if max(image.size) <= self.sam_side:
                work.sam_image = image
            elif transform is not None and hasattr(transform, "apply_image"):
                work.sam_image = Image.fromarray(transform.apply_image(np.asarray(image)))
            else:
                work.sam_image = _shrink(image, self.sam_side, Image.BILINEAR)

    # -- questions ---------------------------------------------------------------------------
    def _split(self, name: str, wh, item: ImageItem | None, boxes) -> list[dict]:
        "The option sets of ``name``'s questions on an image of size ``wh``."
        task, opts = self.tasks[name], dict(self.options[name])
        if "image_size" in task.Options.model_fields:
            opts["image_size"] = tuple(wh)
        if name == "rec":
            opts.pop("expressions", None)
            opts.pop("expression", None)
            pairs = (item.expressions if item is not None else []) or self._given_expressions()
            return [{**opts, "expression": e} for _, e in pairs]
        if self._is_stage2(name):
            opts[STAGE2[name]] = [tuple(b) for b in boxes]
        return task.split(**opts)

    def _prompts(self, name: str, questions: list[dict]) -> list[str]:
        return [build_prompt([[self.tasks[name].prompt(**q), None]]) for q in questions]

    # -- running -----------------------------------------------------------------------------
    def label(self, batch: list[Work], on_image: Callable[[Work], None] | None = None
              ) -> list[dict]:
        """Run the pending tasks of a batch of loaded images.

        Args:
            batch: the loaded images.
            on_image: called once per image of ``batch`` as soon as its last stage is done for
                it (with a model whose ``generate_multi`` takes ``on_image``: when its last
                answer is decoded, while other images' answers may still be decoding), or when
                it failed; every image is reported before this returns.

        Returns:
            Work-log records: one per (image, pending task), or one failure per image that
            could not be labeled.
        """
        results: dict[int, dict] = {i: {} for i in range(len(batch))}
        failed: dict[int, str] = {}
        report = _Reporter(batch, on_image)
        stage1 = {i: [n for n in self.stage1_tasks() if n in w.pending or
                      (n == "detection" and any(t in w.pending for t in self.stage2_tasks()))]
                  for i, w in enumerate(batch)}
        # the stage after which each image is done: 1, 2 (a box task) or 3 (SAM masks)
        last = {i: 3 if self.uses_sam and SEGMENT in w.pending else
                2 if any(n in w.pending for n in self.stage2_tasks()) else 1
                for i, w in enumerate(batch)}
        self._stage(batch, stage1, results, failed, None, report.when(last, 1))
        report.each(failed)
        stage2 = {i: [n for n in self.stage2_tasks() if n in batch[i].pending]
                  for i in range(len(batch)) if i not in failed}
        self._stage(batch, stage2, results, failed, results, report.when(last, 2))
        report.each(failed)
        if self.uses_sam:
            self._segment(batch, results, failed, report)
        report.rest()
        return self._records(batch, results, failed)

    def _stage(self, batch, wanted: dict, results, failed, previous,
               done: Callable[[int], None] | None = None) -> None:
        """Ask every wanted task of every image in one ``generate_multi``; parse into ``results``.

        ``done(i)`` is called for image ``i`` when its answers are decoded (or after parsing,
        with a model that does not report images), and for every image after the stage."""
        plan = {}  # image index -> [(task, questions, prompts)]
        for i, names in wanted.items():
            if i in failed or not names:
                continue
            try:
                plan[i] = [self._plan(n, batch[i], previous and previous[i]) for n in names]
            except Exception as exc:  # a prompt that cannot be built for this image
                failed[i] = f"cannot build the prompts: {exc}"
        if plan:
            generations = self._generate(batch, plan, failed, done)
            with self.timer("parse"):
                for i, per_task in generations.items():
                    try:
                        for (name, questions, _), gens in zip(plan[i], per_task, strict=True):
                            results[i][name] = self._parse(name, batch[i], questions, gens)
                    except Exception as exc:
                        failed[i] = f"cannot parse the answers: {exc!r}"
        for i in range(len(batch) if done is not None else 0):
            done(i)

    def _plan(self, name: str, work: Work, previous) -> tuple:
        boxes = self._stage2_boxes(name, previous) if self._is_stage2(name) else None
        questions = self._split(name, work.wh, work.item, boxes)
        return name, questions, self._prompts(name, questions)

    def _stage2_boxes(self, name: str, previous: dict) -> np.ndarray:
        det = previous["detection"]
        if name != "pose":
            return det.xyxy
        names = det.data.get("class_name", [""] * len(det))
        keep = [self._is_person(str(c)) for c in names]
        return det.xyxy[np.asarray(keep, dtype=bool)] if len(det) else det.xyxy

    def _is_person(self, class_name: str) -> bool:
        if self.ontology is not None:
            return self.ontology.map(class_name) == PERSON
        return normalize_label(class_name) == PERSON

    def _generate(self, batch, plan: dict, failed: dict, done=None) -> dict:
        "``{image index: per task, its generations}``; on a batch error, retry image by image."
        order = list(plan)
        try:
            flat = self._generate_multi([batch[i].image for i in order],
                                        [[p for _, _, ps in plan[i] for p in ps] for i in order],
                                        [[self.budget(n) for n, _, ps in plan[i] for _ in ps]
                                         for i in order],
                                        None if done is None else lambda j: done(order[j]))
        except Exception:
            if len(order) == 1:
                failed[order[0]] = "generation failed"
                return {}
            out = {}
            for i in order:
                out.update(self._generate(batch, {i: plan[i]}, failed, done))
            return out
        out = {}
        for i, gens in zip(order, flat, strict=True):
            per_task, k = [], 0
            for _, _, prompts in plan[i]:
                per_task.append(gens[k: k + len(prompts)])
                k += len(prompts)
            out[i] = per_task
        return out

    def _generate_multi(self, images, questions, budgets, on_image=None):
        rows = {} if self.max_rows is None else {"max_rows": self.max_rows}
        if rows and not _accepts(self.model.generate_multi, "max_rows"):
            rows = {}  # a model without continuous batching decodes its own way
        if on_image is not None and _names(self.model.generate_multi, "on_image"):
            rows["on_image"] = on_image  # else images are reported once the stage is done
        with self.timer("generate"):
            return self.model.generate_multi(images, questions, max_gen_len=budgets, **rows,
                                             **self.sampling)

    def _parse(self, name: str, work: Work, questions: list[dict], generations):
        task = self.tasks[name]
        parsed = [parse_generation(task, g, work.wh, q)
                  for g, q in zip(generations, questions, strict=True)]
        if name == "rec":
            pairs = work.item.expressions or self._given_expressions()
            return [(qid, expr, d) for (qid, expr), d in zip(pairs, parsed, strict=True)]
        if not questions:
            return task.empty(Answer.from_generation(""), work.wh, task.Options(),
                              ["nothing to ask"])
        return task.merge(parsed)

    # -- SAM ---------------------------------------------------------------------------------
    def _segment(self, batch, results, failed, report=None) -> None:
        with self.timer("segment"):
            for i, work in enumerate(batch):
                if i in failed or SEGMENT not in work.pending:
                    continue
                try:
                    results[i][SEGMENT] = self._masks(work, results[i])
                except Exception as exc:
                    failed[i] = f"SAM failed: {exc!r}"
                if report is not None:
                    report(i)

    def _masks(self, work: Work, results: dict) -> dict:
        """Masks of every box of the masked tasks, in the order of their records.

        A finished task's boxes come from its logged record (``work.logged``), so the masks match
        the boxes the merge reads, even when that task was run again for a second stage; a task
        run now gives its new record's boxes.
        """
        from .segmenting import masks_for_boxes

        boxes = {}
        for name in (n for n in self.names if n in MASKED_TASKS):
            if name in work.logged:
                record = work.logged[name]
            elif name in results:
                record = _task_record(name, results[name])
            else:
                raise ValueError(f"no boxes of task {name!r} to segment: it was not run and no "
                                 "logged result was given")
            boxes[name] = record_boxes(record)
        image = work.sam_image if work.sam_image is not None else work.image
        return masks_for_boxes(self.sam_predictor, image, boxes, size=work.wh)

    # -- records -----------------------------------------------------------------------------
    def _records(self, batch, results, failed) -> list[dict]:
        out = []
        for i, work in enumerate(batch):
            head = {"file_name": work.item.file_name, "image_id": work.item.image_id,
                    "index": work.item.index, "hash": work.hash}
            if i in failed:
                out.append(failure_record(work.item, failed[i], work.hash))
                continue
            head["wh"] = list(work.wh)
            for name in work.pending:
                value = results[i][name]
                record = value if name == SEGMENT else _task_record(name, value)
                out.append({**head, "kind": "result", "task": name, "key": work.keys[name],
                            "result": record})
        return out


class SequentialModel:
    """Adapter: ``generate_multi`` as one independent ``generate`` call per question.

    The baseline that ``generate_multi`` must match (greedy) and beat (speed): no shared image
    encoding, no shared prefill, no batching across questions.
    """

    def __init__(self, model):
        self.model = model
        # the wrapped model's image input, so that images are held as for the model itself
        self.transform = getattr(model, "transform", None)
        self.preprocess = getattr(model, "preprocess", None)

    def generate_multi(self, images, questions, max_gen_len=512, max_rows=None, on_image=None,
                       **sampling):
        # max_rows is moot: every question is its own call
        if isinstance(max_gen_len, int):
            max_gen_len = [[max_gen_len] * len(qs) for qs in questions]
        out = []
        for j, (image, qs, bs) in enumerate(zip(images, questions, max_gen_len, strict=True)):
            out.append([self.model.generate([q], [image], max_gen_len=b, **sampling)[0]
                        for q, b in zip(qs, bs, strict=True)])
            if on_image is not None:
                on_image(j)
        return out


class _Reporter:
    "Calls ``on_image(work)`` at most once per image of a batch (by its index)."

    def __init__(self, batch: list[Work], on_image):
        self.batch, self.on_image, self.sent = batch, on_image, set()

    def __call__(self, i: int) -> None:
        if self.on_image is not None and i not in self.sent:
            self.sent.add(i)
            self.on_image(self.batch[i])

    def when(self, last: dict, stage: int) -> Callable[[int], None]:
        "Reports image i once ``stage`` is done for it, if that is its last stage."
        return lambda i: self(i) if last[i] == stage else None

    def each(self, indices) -> None:
        for i in list(indices):
            self(i)

    def rest(self) -> None:
        self.each(range(len(self.batch)))


def _names(fn, name: str) -> bool:
    "Whether ``fn`` has a parameter called ``name`` (not only ``**kwargs``)."
    return name in inspect.signature(fn).parameters


def _accepts(fn, name: str) -> bool:
    "Whether ``fn`` takes a keyword argument ``name``."
    params = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def failure_record(item: ImageItem, reason: str, content_hash: str | None = None) -> dict:
    "The work-log record of an image that could not be labeled."
    from .worklog import work_key

    return {"kind": "failure", "key": work_key("failure", item.file_name),
            "file_name": item.file_name, "image_id": item.image_id, "index": item.index,
            "hash": content_hash, "reason": reason}


def _task_record(name: str, value) -> dict:
    "A task's result as its work-log record (``sphinx_tools/records.py``)."
    return _rec_record(value) if name == "rec" else to_record(value)


def _rec_record(items) -> dict:
    return {"type": "rec", "items": [{"question_id": qid, "expression": expr,
                                      **detections_to_json(d)} for qid, expr, d in items]}


def _shrink(image, side: int, resample=None):
    "``image`` resized (aspect kept) to a longest side of ``side`` when larger, else itself."
    from PIL import Image

    w, h = image.size
    if max(w, h) <= side:
        return image
    scale = side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.BICUBIC if resample is None else resample)


def model_fingerprint(checkpoint) -> str:
    "Names a checkpoint folder by its name, config and shard sizes (cheap; no hashing of weights)."
    from pathlib import Path

    from .worklog import work_key

    from sphinx_tools.checkpoint import DEMO_DIR

    folder = Path(checkpoint)
    # the embedded model keeps the name it had before its folder moved, so its ids stay put
    name = "demo_model" if folder.resolve() == DEMO_DIR.resolve() else folder.resolve().name
    parts = [name]
    for file in ("config.json", "meta.json", "params.json"):
        if (folder / file).is_file():
            parts.append((folder / file).read_text(encoding="utf-8", errors="replace"))
    parts += [(p.name, p.stat().st_size) for p in sorted(folder.glob("*.pth"))]
    return f"{name}:{work_key(*parts)[:12]}"
