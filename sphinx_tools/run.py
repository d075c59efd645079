"""Asking a model one task about one image: ``run_task`` builds the prompt, generates and parses;
``parse_generation`` parses one generation (text, and log-probs when there are some);
``trained_options`` gives the options a checkpoint was trained to be asked with.

Every entry point decodes greedily unless the caller asks otherwise, so ``run_task`` here and
``sphinx-tools label`` give the same answer for the same image and task.
"""

from __future__ import annotations

import supervision as sv

from sphinx_tools.annotations import ANSWER_NOTES_KEY, TRUNCATED_KEY
from sphinx_tools.conversation import build_prompt
from sphinx_tools.errors import SphinxToolsError
from sphinx_tools.parsing import Answer
from sphinx_tools.registry import get_task
from sphinx_tools.tasks import Task, check_option_size, image_size_of


def run_task(
    model,
    image,
    task,
    *,
    max_gen_len: int | None = None,
    temperature: float = 0.0,
    top_p: float = 0.95,
    sampling: dict | None = None,
    **options,
):
    """Ask the model one task about one image and parse the answer.

    Builds the one-turn conversation with ``conversation.build_prompt``, calls
    ``model.generate(prompts, images, max_gen_len=..., temperature=..., top_p=..., **sampling)``
    (a list of generations with ``.text`` and optionally ``.logprobs``/``.offsets``) and parses
    each answer with the image's size. Tasks that need one question per region (pose with several
    ``boxes``, REG with several ``regions``) are asked in one batch and merged.

    Args:
        model: anything with the ``generate`` method above.
        image: a PIL image (``.size`` is ``(W, H)``) or an HWC array.
        task: a task name or :class:`Task`.
        max_gen_len: generation budget; the task's default if ``None``.
        temperature: 0 (the default) decodes greedily, as ``generate``, ``ask``, ``label`` and
            the web demo do; above 0 samples (SPHINX's own benchmarks use 0.1 with top_p 0.75).
        top_p: nucleus mass when sampling.
        sampling: extra keyword arguments passed to ``model.generate`` unchanged.
        **options: the task's options, over the model's own (:func:`trained_options`).

    Returns:
        The task's result (``task.output``).

    Example:
        >>> detections = run_task(model, image, "rec", expression="the dog")  # doctest: +SKIP
    """
    if isinstance(task, str):
        task = get_task(task)
    image_wh = image_size_of(image)
    options = {**trained_options(model, task.name), **options}
    for name, value in options.items():  # before split makes one question per listed item
        check_option_size(name, value, task.name)
    if "image_size" in task.Options.model_fields and "image_size" not in options:
        options["image_size"] = image_wh
    questions = task.split(**options)
    if not questions:
        return task.empty(Answer.from_generation(""), image_wh, task.Options(), ["nothing to ask"])
    prompts = [build_prompt([[task.prompt(**q), None]]) for q in questions]
    kwargs = {
        "max_gen_len": max_gen_len or task.max_gen_len,
        "temperature": temperature,
        "top_p": top_p,
    }
    kwargs.update(sampling or {})
    generations = model.generate(prompts, [image] * len(prompts), **kwargs)
    if len(generations) != len(prompts):
        raise SphinxToolsError(
            f"model.generate returned {len(generations)} answers for {len(prompts)} prompts"
        )
    results = [
        parse_generation(task, g, image_wh, q) for g, q in zip(generations, questions, strict=True)
    ]
    return task.merge(results)


def trained_options(model, task_name: str) -> dict:
    """The options ``model`` was trained to be asked task ``task_name`` with (its checkpoint's
    ``task_options.json``, as ``SphinxModel.task_options``); ``{}`` for a model without them."""
    return dict((getattr(model, "task_options", None) or {}).get(task_name, {}))


def parse_generation(task: Task, generation, image_wh, options):
    """Parse one generation (or plain text) with ``task``: logprobs and offsets, when the
    generation has them, become per-object confidences; a ``"length"`` stop is flagged."""
    text = generation if isinstance(generation, str) else generation.text
    logprobs = getattr(generation, "logprobs", None)
    offsets = getattr(generation, "offsets", None)
    if logprobs is None or offsets is None:
        logprobs = offsets = None
    options = {k: v for k, v in options.items() if k != "image_size"}  # given positionally
    result = task.parse(text, image_wh, logprobs=logprobs, offsets=offsets, **options)
    if getattr(generation, "finish_reason", None) == "length":
        _flag_length_stop(result)
    return result


def _flag_length_stop(result) -> None:
    "Mark a result whose generation ran out of ``max_gen_len`` (where it has metadata)."
    detections = (
        result if isinstance(result, sv.Detections) else getattr(result, "detections", None)
    )
    if isinstance(detections, sv.Detections):
        detections.metadata[TRUNCATED_KEY] = True
        notes = detections.metadata.setdefault(ANSWER_NOTES_KEY, [])
        notes.append("generation stopped at max_gen_len")
