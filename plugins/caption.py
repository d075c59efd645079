"""Captioning and VQA: free-text answers (docs/formats.md §4.9, §4.10; prompts VERIFIED).

``caption`` variants: ``default`` (one sentence), ``detailed``, ``general``
(``What's in the image?``).
``vqa`` wraps the question in the benchmark suffixes: ``default`` (single word or phrase), ``open``
(the question alone), ``multiple_choice`` (chosen automatically when ``choices`` are given). With
``normalize=True`` a yes/no answer becomes ``"yes"``/``"no"``, a multiple-choice answer its option
letter, and a short answer loses its trailing period. Results are ``str`` (the cleaned text).
"""

import re
import string

from sphinx_tools.hookspecs import hookimpl
from sphinx_tools.parsing import strip_markup
from sphinx_tools.tasks import Task, TaskOptions


class TextTask(Task):
    "A task whose answer is text: no image size needed, the cleaned answer is the result."

    output = str
    needs_image_size = False
    max_gen_len = 512

    def parse_answer(self, answer, image_wh, opts):
        return strip_markup(answer.text)

    def empty(self, answer, image_wh, opts, notes=()):
        return ""


class Caption(TextTask):
    "Image caption -> ``str``."

    name = "caption"
    description = "Short or detailed caption"
    templates = {
        "default": "Provide a one-sentence caption for the provided image.",
        "detailed": "Generate a detailed description about the image.",
        "general": "What's in the image?",
    }


class VqaOptions(TaskOptions):
    """Attributes:
    question: the question.
    choices: options for a multiple-choice question (lettered A, B, C, ...).
    normalize: normalize yes/no, option letters and trailing periods.
    """

    question: str | None = None
    choices: list[str] | None = None
    normalize: bool = False


_PREFIX_RE = re.compile(r"^(?:the answer is|answer:)\s*", re.IGNORECASE)
_LETTER_RE = re.compile(r"^\(?([A-Z])(?:[.):\s]|$)")
# SPHINX-X may answer in lower case ("d."); a lower-case letter needs ".", ")" or ":" or nothing
# after it, so the article in "a cat" is not read as option A
_LOWER_LETTER_RE = re.compile(r"^\(?([a-z])(?:[.):]|$)")


def normalize_answer(text: str, choices=None) -> str:
    """Normalize a short answer: ``"Yes."`` -> ``"yes"``, ``"Paris."`` -> ``"Paris"``, and with
    choices ``"B. a cat"`` -> ``"B"`` (``"d."`` -> ``"D"`` when no choice reads ``d``).

    A multiple-choice answer that names no valid letter or choice text is returned cleaned, never
    replaced by a guess.
    """
    text = _PREFIX_RE.sub("", text.strip()).strip()
    if choices:
        letters = string.ascii_uppercase[: len(choices)]
        m = _LETTER_RE.match(text)
        if m and m.group(1) in letters:
            return m.group(1)
        lowered = text.lower().rstrip(".").strip()
        for letter, choice in zip(letters, choices, strict=False):
            if lowered == choice.lower().strip().rstrip("."):
                return letter
        m = _LOWER_LETTER_RE.match(text)
        if m and m.group(1).upper() in letters:
            return m.group(1).upper()
    first = re.split(r"[\s,.!]+", text.lower(), maxsplit=1)[0] if text else ""
    if first in ("yes", "no"):
        return first
    return text[:-1].rstrip() if text.endswith(".") and text.count(".") == 1 else text


class Vqa(TextTask):
    "Question -> answer ``str``."

    name = "vqa"
    description = "Visual question answering (short answer, open, multiple choice)"
    templates = {
        "default": "{question}\nAnswer the question using a single word or phrase.",
        "open": "{question}",
        "multiple_choice": "{question}\n{choices}\nAnswer with the option's letter from the given "
        "choices directly.",
    }
    Options = VqaOptions
    max_gen_len = 64

    def template(self, opts):
        if opts.template is None and opts.choices and opts.variant == "default":
            opts = opts.model_copy(update={"variant": "multiple_choice"})
        return super().template(opts)

    def prompt_fields(self, opts):
        if not opts.question or not opts.question.strip():
            raise ValueError(f"task 'vqa' needs `question`, got {opts.question!r}")
        letters = string.ascii_uppercase
        if opts.choices and len(opts.choices) > len(letters):
            raise ValueError(f"at most {len(letters)} `choices`, got {len(opts.choices)}")
        choices = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(opts.choices or []))
        return {"question": opts.question.strip(), "choices": choices}

    def parse_answer(self, answer, image_wh, opts):
        text = strip_markup(answer.text)
        return normalize_answer(text, opts.choices) if opts.normalize else text


@hookimpl
def register_tasks(register):
    register(Caption())
    register(Vqa())
