"""The ``Task`` base class that plugins subclass and prompt-template overrides.

(Asking a model a task is ``sphinx_tools.run``: ``run_task`` and ``parse_generation``.)

A task turns options into the human turn (:meth:`Task.prompt`) and the model's answer into a
structured result (:meth:`Task.parse`)::

    task = sphinx_tools.get_task("rec")
    task.prompt(expression="the red car")
    # 'Please provide the bounding box coordinate of the region this sentence describes: the red
    # car.'
    detections = task.parse("[0.04,0.47,0.40,0.83]", (640, 480), expression="the red car")

Prompt templates are text with plain ``{field}`` places for the task's fields (no format spec,
conversion, attribute or index: ``{classes:>9}`` or ``{expression.upper}`` are refused). Each can be
replaced per call (``template=...``) or in a user config file: ``$SPHINX_TOOLS_CONFIG``, else
``$XDG_CONFIG_HOME/sphinx-tools/prompts.yaml`` (``~/.config/sphinx-tools/prompts.yaml``); YAML or
JSON, mapping a task name to a template (its default variant) or to ``{variant: template}``::

    rec: "Where is {expression}? Answer with a bounding box."
    caption:
      short: "Write a short caption for the image."

Work per prompt is bounded: options are checked against the size limits below before anything
is formatted, and a prompt longer than :data:`MAX_PROMPT_CHARS` is refused before it is built.
"""

from __future__ import annotations

import json
import os
import string
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import supervision as sv
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sphinx_tools.annotations import PHRASE_FIELD, build_detections
from sphinx_tools.errors import SphinxToolsError
from sphinx_tools.parsing import Answer, GroundedBox

CONFIG_ENV = "SPHINX_TOOLS_CONFIG"
MAX_PROMPT_CHARS = 16_384  # a prompt (the human turn), checked before it is built
MAX_OPTION_CHARS = 8_192  # a text option: a question, an expression, a template
MAX_OPTION_ITEMS = 1_024  # a list or mapping option: classes, choices, boxes, synonyms
MAX_ITEM_CHARS = 1_024  # each text in a list or mapping option (a class name, a choice)


class TaskOptions(BaseModel):
    """Options every task accepts; tasks subclass this with their own fields.

    Attributes:
        template: replaces the prompt template for this call (``str.format`` fields as the task's
            default template).
        variant: which of the task's templates to use (e.g. caption ``"short"``/``"detailed"``).
        max_objects: cap on objects kept from one answer (repetition loops).
        recover_decimals: rescale integer coordinates like ``37`` to ``0.37`` (noted per object);
            when false such groups are dropped.
    """

    model_config = ConfigDict(extra="forbid")

    template: str | None = None
    variant: str = "default"
    max_objects: int = Field(default=100, ge=1)
    recover_decimals: bool = True


class Task:
    """Base class of every task; a plugin registers instances of subclasses.

    Subclasses set ``name``, ``output``, ``templates`` (``{"default": ..., other variants}``),
    ``Options`` (a :class:`TaskOptions` subclass) and implement :meth:`prompt_fields` and
    :meth:`parse_answer`; :meth:`empty` gives the result for junk text.
    """

    name: ClassVar[str] = ""
    output: ClassVar[type] = object
    description: ClassVar[str] = ""
    templates: ClassVar[dict[str, str]] = {}
    Options: ClassVar[type[TaskOptions]] = TaskOptions
    max_gen_len: ClassVar[int] = 512  # default generation budget for run_task

    plugin: str | None = None  # set by the registry: which plugin registered this task

    # -- options -------------------------------------------------------------------------------
    def options(self, **options) -> TaskOptions:
        """Validate options against ``Options``.

        Raises:
            ValueError: naming each unknown or badly typed option, or one over the size limits
                (:data:`MAX_OPTION_CHARS`, :data:`MAX_OPTION_ITEMS`, :data:`MAX_ITEM_CHARS`).
        """
        for name, value in options.items():
            check_option_size(name, value, self.name)
        try:
            return self.Options(**options)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"]) or "options"
                if err["type"] == "extra_forbidden":
                    problems.append(f"unknown option {where!r}")
                else:
                    problems.append(f"option {where!r}: {err['msg']} (got {err.get('input')!r})")
            known = ", ".join(self.Options.model_fields)
            raise ValueError(
                f"task {self.name!r}: {'; '.join(problems)}. Options: {known}"
            ) from None

    # -- prompt --------------------------------------------------------------------------------
    def prompt(self, **options) -> str:
        """The human turn for this task.

        Args:
            **options: the task's options (see its ``Options``).

        Returns:
            The instruction text (without the conversation wrapper).

        Raises:
            ValueError: for unknown, badly typed, missing or too large options, a template that
                is not plain ``{field}`` places or uses a field the task does not provide, or a
                prompt longer than :data:`MAX_PROMPT_CHARS`.
        """
        opts = self.options(**options)
        template = self.template(opts)
        fields = self.prompt_fields(opts)
        return render(template, fields, self.name)

    def template(self, opts: TaskOptions) -> str:
        """The template to use: ``opts.template``, else the config file's, else the built-in one.

        Raises:
            ValueError: for an unknown variant, or a template that is not plain ``{field}``
                places (see :func:`template_fields`).
        """
        if opts.template is not None:
            template = opts.template
        elif opts.variant not in self.templates:
            raise ValueError(
                f"task {self.name!r} has no prompt variant {opts.variant!r}; "
                f"variants: {', '.join(self.templates)}"
            )
        else:
            overrides = prompt_overrides().get(self.name, {})
            template = overrides.get(opts.variant, self.templates[opts.variant])
        template_fields(template, self.name, self.field_names())
        return template

    def field_names(self) -> list[str]:
        "The fields the task's built-in templates use (what :meth:`prompt_fields` provides)."
        names = {n for t in self.templates.values() for n in template_fields(t, self.name)}
        return sorted(names)

    def prompt_fields(self, opts: TaskOptions) -> dict[str, Any]:
        "Values for the template's ``{fields}``."
        return {}

    # -- parse ---------------------------------------------------------------------------------
    def parse(self, text, image_size=None, logprobs=None, offsets=None, **options):
        """Turn the model's answer into this task's result; never raises on the text itself.

        Args:
            text: the generation, raw (cut at ``###`` here) or already cut.
            image_size: ``(width, height)`` of the original image; required by grounded tasks.
            logprobs: one log-probability per generated token, or ``None``.
            offsets: the character index in ``text`` where each token starts, or ``None``.
            **options: the same options as :meth:`prompt`.

        Returns:
            An instance of ``self.output``; an empty one when nothing usable is found.

        Raises:
            ValueError: for bad arguments (options, image size, logprobs/offsets mismatch).
        """
        opts = self.options(**options)
        answer = Answer.from_generation(text, logprobs, offsets)
        image_wh = self.check_image_size(image_size)
        try:
            return self.parse_answer(answer, image_wh, opts)
        except (
            Exception
        ) as exc:  # model text must never crash a caller; tests turn this into an error
            warnings.warn(
                f"task {self.name!r} could not parse the answer ({exc!r}); returning an "
                "empty result",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.empty(answer, image_wh, opts, [f"parser error: {exc!r}"])

    def check_image_size(self, image_size):
        "Validate ``(width, height)``; ``None`` is allowed only for ungrounded tasks."
        if image_size is None:
            if self.needs_image_size:
                raise ValueError(
                    f"task {self.name!r} needs `image_size=(width, height)` to map boxes"
                )
            return None
        try:
            w, h = (int(v) for v in image_size)
        except (TypeError, ValueError):
            raise ValueError(f"`image_size` must be (width, height), got {image_size!r}") from None
        if w <= 0 or h <= 0:
            raise ValueError(f"`image_size` must be positive (width, height), got {image_size!r}")
        return (w, h)

    needs_image_size: ClassVar[bool] = True

    def parse_answer(self, answer: Answer, image_wh, opts: TaskOptions):
        raise NotImplementedError

    def empty(self, answer: Answer, image_wh, opts: TaskOptions, notes=()):
        "The empty result (junk text, or a parser error)."
        raise NotImplementedError

    # -- several prompts for one call (pose per person box, REG per region) --------------------
    def split(self, **options) -> list[dict]:
        "Option sets for the questions one call needs (default: one; none gives an empty result)."
        return [options]

    def merge(self, results: list):
        "Combine the results of :meth:`split`'s questions (default: the only one)."
        if len(results) != 1:
            raise ValueError(f"task {self.name!r} asks one question, got {len(results)} results")
        return results[0]

    def __repr__(self) -> str:
        return f"<Task {self.name!r} -> {type_name(self.output)}>"


class DetectionsTask(Task):
    "A task whose result is ``sv.Detections``: the shared empty result and assembly."

    output: ClassVar[type] = sv.Detections

    def empty(self, answer: Answer, image_wh, opts: TaskOptions, notes=()) -> sv.Detections:
        return build_detections(
            np.empty((0, 4)), data={PHRASE_FIELD: []}, raw_text=answer.raw, answer_notes=list(notes)
        )

    def detections(
        self,
        answer: Answer,
        boxes: list[GroundedBox],
        notes,
        class_name,
        *,
        data=None,
        class_id=None,
        classes=None,
    ) -> sv.Detections:
        """``sv.Detections`` from grounded boxes, with confidences when the answer has log-probs.

        Args:
            answer: the parsed answer (raw text and token log-probs).
            boxes: n boxes from :func:`sphinx_tools.parsing.ground_boxes`.
            notes: answer-level notes.
            class_name: n class names.
            data: extra per-object fields; ``data["phrase"]`` is added from the boxes.
            class_id: n ints, or ``None``.
            classes: names ``class_id`` indexes into.
        """
        confidence = (
            [answer.confidence(b.spans) for b in boxes] if answer.logprobs is not None else None
        )
        data = {PHRASE_FIELD: [b.phrase or "" for b in boxes], **(data or {})}
        return build_detections(
            [b.xyxy for b in boxes] if boxes else np.empty((0, 4)),
            class_name=class_name,
            class_id=class_id,
            confidence=confidence,
            data=data,
            notes=[b.notes for b in boxes],
            raw_text=answer.raw,
            answer_notes=notes,
            classes=classes,
        )


def split_per(options: dict, many: str, one: str) -> list[dict]:
    """One question per item of ``options[many]``, given to it as option ``one``.

    No ``many`` option: the one question as asked; an empty list: no question (``run_task`` then
    returns the task's empty result).
    """
    items = options.pop(many, None)
    if items is None:
        return [options]
    return [{**options, one: tuple(item)} for item in items]


def type_name(tp) -> str:
    "``sv.Detections`` -> ``'supervision.Detections'``, ``str`` -> ``'str'``."
    module = getattr(tp, "__module__", "builtins")
    top = module.split(".")[0]
    return tp.__qualname__ if top == "builtins" else f"{top}.{tp.__qualname__}"


def template_fields(template: str, task: str = "", allowed=None) -> list[str]:
    """The field names a prompt template uses, in order (repeats included).

    A template is literal text with plain ``{name}`` places (``{{`` and ``}}`` for braces); a
    format spec (``{classes:>9}``), a conversion (``{classes!r}``), an attribute or index
    (``{region.real}``, ``{classes[0]}``) or a positional field (``{}``, ``{0}``) is refused.

    Args:
        template: the template text.
        task: the task's name, for messages.
        allowed: the task's field names, listed in messages (``None``: not listed).

    Raises:
        ValueError: naming the malformed template or the field that is not a plain name.
    """
    fields = "" if allowed is None else f" (fields: {', '.join(sorted(allowed)) or 'none'})"
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(
            f"prompt template for {task!r} is malformed ({exc}): {_clip(template)!r}"
        ) from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        written = "{" + name + (f"!{conversion}" if conversion else "")
        written += (f":{spec}" if spec else "") + "}"
        if not name.isidentifier():
            problem = "is not a plain field name (no positions, attributes or indexes)"
        elif conversion:
            problem = "has a conversion"
        elif spec:
            problem = "has a format spec"
        else:
            names.append(name)
            continue
        raise ValueError(
            f"prompt template for {task!r}: {_clip(written)} {problem}; write fields as "
            f"plain {{name}}{fields}"
        )
    return names


def render(template: str, fields: dict, task: str = "") -> str:
    """Fill a template's ``{name}`` places with ``fields``, after checking its size.

    Raises:
        ValueError: for a template that is not plain ``{name}`` places, a field the task does not
            provide (naming the available ones), or a prompt longer than
            :data:`MAX_PROMPT_CHARS` (checked before the prompt is built).
    """
    names = template_fields(template, task, fields)
    missing = sorted({n for n in names if n not in fields})
    if missing:
        raise ValueError(
            f"prompt template for {task!r} uses {{{missing[0]}}}; available fields: "
            f"{', '.join(sorted(fields)) or 'none'}"
        )
    values = {n: format(fields[n], "") for n in set(names)}
    pieces = list(string.Formatter().parse(template))
    size = sum(len(text) + (len(values[n]) if n is not None else 0) for text, n, _, _ in pieces)
    if size > MAX_PROMPT_CHARS:
        raise ValueError(
            f"the prompt for task {task!r} would be {size:,} characters long; at most "
            f"{MAX_PROMPT_CHARS:,} are allowed"
        )
    return "".join(literal + (values[n] if n is not None else "") for literal, n, _, _ in pieces)


def check_option_size(name: str, value, task: str = "") -> None:
    """Refuse an option too large to format or parse cheaply.

    Text is at most :data:`MAX_OPTION_CHARS` characters; a list, tuple, array or mapping at most
    :data:`MAX_OPTION_ITEMS` items, each text in it at most :data:`MAX_ITEM_CHARS`.

    Raises:
        ValueError: naming the option (and item) and its length.
    """
    where = f"task {task!r}: option {name!r}"
    if isinstance(value, str):
        if len(value) > MAX_OPTION_CHARS:
            raise ValueError(
                f"{where} is {len(value):,} characters long; at most {MAX_OPTION_CHARS:,}"
            )
        return
    if not isinstance(value, (list, tuple, dict, set, frozenset, np.ndarray)):
        return
    if len(value) > MAX_OPTION_ITEMS:
        raise ValueError(f"{where} has {len(value):,} items; at most {MAX_OPTION_ITEMS:,}")
    if isinstance(value, np.ndarray):
        return
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
    for i, item in enumerate(items):
        if isinstance(item, str) and len(item) > MAX_ITEM_CHARS:
            raise ValueError(
                f"{where}: item {i} is {len(item):,} characters long; at most {MAX_ITEM_CHARS:,}"
            )
        if isinstance(item, (list, tuple, dict, set, frozenset)) and len(item) > MAX_OPTION_ITEMS:
            raise ValueError(
                f"{where}: item {i} has {len(item):,} items; at most {MAX_OPTION_ITEMS:,}"
            )


def _clip(text: str, limit: int = 80) -> str:
    "``text`` cut for an error message."
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


# -- user config file ------------------------------------------------------------------------------
_config_cache: dict = {}


def config_path() -> Path:
    "``$SPHINX_TOOLS_CONFIG``, else ``$XDG_CONFIG_HOME/sphinx-tools/prompts.yaml``."
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "sphinx-tools" / "prompts.yaml"


def prompt_overrides() -> dict[str, dict[str, str]]:
    """The user's prompt templates: ``{task: {variant: template}}`` (empty if there is no file).

    Raises:
        SphinxToolsError: if the file cannot be read or has the wrong shape.
    """
    path = config_path()
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return {}
    key = (str(path), stamp)
    if key not in _config_cache:
        _config_cache.clear()
        _config_cache[key] = _read_config(path)
    return _config_cache[key]


def _read_config(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text or "{}")
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:
        raise SphinxToolsError(f"cannot read prompt config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SphinxToolsError(f"prompt config {path} must map task names to templates")
    out = {}
    for task, value in data.items():
        if isinstance(value, str):
            value = {"default": value}
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise SphinxToolsError(
                f"prompt config {path}: {task!r} must be a template string or "
                "a mapping of variant -> template string"
            )
        out[str(task)] = {str(k): v for k, v in value.items()}
    return out


def image_size_of(image) -> tuple[int, int]:
    "``(width, height)`` of a PIL image or an HWC/HW array."
    if hasattr(image, "size") and not isinstance(image, np.ndarray):
        w, h = image.size
        return int(w), int(h)
    shape = getattr(image, "shape", None)
    if shape is not None and len(shape) >= 2:
        return int(shape[1]), int(shape[0])
    raise ValueError(f"cannot tell the size of image of type {type(image).__name__}")
