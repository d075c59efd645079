"""Local web demo: ``sphinx-tools serve`` (gradio).

One page: upload an image, pick a task (its prompt is shown and can be edited), ask it with
streaming tokens (each question on its own, or as the next turn with "continue chat"), and see
the parsed result drawn on the image (boxes, labels, key points with skeleton, SAM masks with
``--sam``) and as JSON to download (the record labeling keeps, ``sphinx_tools/records.py``). Pose
without a person box asks detection for the people first. The same page is an HTTP API with the
named endpoints of :data:`API` (see the README for a ``gradio_client`` example).

Safe by default: it binds ``127.0.0.1``, makes no public share link unless ``--share`` is given,
limits upload size and image pixels, shows errors in the page instead of stopping, and serves all
users from one model through a queue (one generation at a time). Every text the page sends is
bounded before it is read: the task input and the prompt (:data:`MAX_INPUT_CHARS`,
``MAX_PROMPT_CHARS``), the options JSON (:data:`MAX_OPTIONS_JSON_CHARS`, nested at most
:data:`MAX_JSON_DEPTH` levels) and the conversation (:data:`MAX_CONVERSATION_CHARS`); prompt
previews, which skip the queue, go through the same option and template checks as every task.

The page logic lives in :class:`DemoBackend`, plain Python that tests call without a browser;
:func:`build_app` wires it to gradio components. ``gradio`` is imported only by :func:`build_app`
and the ``serve`` command, so ``sphinx-tools --help`` stays fast.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import click
import numpy as np
import supervision as sv
from PIL import Image, ImageOps

from sphinx_tools.annotations import (
    CAPTION_FIELD,
    CLASS_NAME_FIELD,
    TEXT_FIELD,
    GroundedCaption,
    SceneGraph,
)
from sphinx_tools.conversation import build_prompt
from sphinx_tools.errors import SphinxToolsError
from sphinx_tools.hookspecs import hookimpl
from sphinx_tools.parsing import normalize_label
from sphinx_tools.records import ALL_FIELDS, detections_to_json, plain, to_record
from sphinx_tools.registry import get_task, list_tasks
from sphinx_tools.run import parse_generation, trained_options
from sphinx_tools.tasks import MAX_OPTION_CHARS, MAX_PROMPT_CHARS

from .autolabel.engine import PERSON

DEFAULT_MAX_PIXELS = 4096 * 4096  # decoded pixels per uploaded image
DEFAULT_MAX_FILE_SIZE = "20mb"  # per upload, enforced by gradio before anything is decoded
DEFAULT_QUEUE_SIZE = 16  # requests waiting for the model; more are refused with a message
TINY_CACHE = "sphinx-tools-tiny"  # folder prefix under the temp dir for the fallback checkpoint
TINY_NOTE = (
    "No trained model is available, so this demo runs a **tiny random-weight checkpoint**: its "
    "answers are gibberish and most results are empty. Start it with "
    "`sphinx-tools serve --checkpoint DIR` for real answers."
)
BOX_HELP = "x1,y1,x2,y2 in pixels; empty: the whole image"
MAX_INPUT_CHARS = MAX_OPTION_CHARS  # the task's main input box
MAX_OPTIONS_JSON_CHARS = 65_536  # the options box (a JSON object)
MAX_JSON_DEPTH = 8  # nesting of the options JSON (a list of boxes is 3 levels)
MAX_CONVERSATION_CHARS = 4 * MAX_PROMPT_CHARS  # every question and answer of one chat

# The one input each built-in task needs, as (option, label, kind); anything else goes into the
# JSON options box, which works for third-party tasks too.
TASK_INPUTS = {
    "rec": ("expression", "Referring expression", "text"),
    "detection": ("classes", "Classes, comma-separated (empty: all objects)", "list"),
    "reg": ("region", f"Region ({BOX_HELP})", "box"),
    "pose": ("box", "Person box (x1,y1,x2,y2 in pixels; empty: each person detection finds)",
             "box"),
    "relation": ("expression", "Expression (empty: all relations in the image)", "relation"),
    "vqa": ("question", "Question", "text"),
    "caption": ("variant", "Variant: default, detailed or general", "text"),
    "ocr": ("variant", "Variant: default (spot text with boxes) or read", "text"),
    "layout": ("vocabulary", "Label set: publaynet, doclaynet or raw", "text"),
}
EXAMPLE_INPUTS = {"rec": "the red circle", "vqa": "What is in the image?"}


# -- model -----------------------------------------------------------------------------------------
def tiny_checkpoint(cache_dir=None) -> Path:
    """A tiny random-weight checkpoint, made once and reused (``<tmp>/sphinx-tools-tiny-<hash>``).

    The folder name carries a hash of the code that builds it, so a cache from older code is
    never loaded. Concurrent callers each build into their own folder and the first rename wins,
    so no process reads a half-written checkpoint.
    """
    import hashlib

    from sphinx_tools import model as model_module
    from sphinx_tools import tiny
    from sphinx_tools.tiny import make_tiny_checkpoint

    digest = hashlib.sha256()
    for module in (tiny, model_module):
        digest.update(Path(module.__file__).read_bytes())
    final = Path(cache_dir or tempfile.gettempdir()) / f"{TINY_CACHE}-{digest.hexdigest()[:12]}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=final.name + ".part-", dir=final.parent))
    make_tiny_checkpoint(work)
    try:
        work.rename(final)
    except OSError:  # another process won the race; use its copy
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return final


def load_model(checkpoint=None, device: str = "cpu", dtype=None, quantize: str | None = None):
    """Load the model the demo serves.

    Args:
        checkpoint: a checkpoint folder; ``None`` tries the embedded demo model (``"demo"``) and
            falls back to a tiny random-weight checkpoint.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: a ``torch.dtype`` (float32 when ``None``).
        quantize: ``"int8"`` for int8 LLM weights (see ``SphinxModel.from_pretrained``), or None.

    Returns:
        ``(model, note)``: the ``SphinxModel`` and a Markdown line saying what was loaded.
    """
    import torch

    from sphinx_tools.sphinx_model import SphinxModel

    kw = {"device": device, "dtype": dtype or torch.float32, "quantize": quantize}
    if checkpoint is not None:
        return SphinxModel.from_pretrained(checkpoint, **kw), f"Model: `{checkpoint}`."
    try:
        return SphinxModel.from_pretrained("demo", **kw), "Model: the embedded demo model."
    except (SphinxToolsError, OSError, ValueError, RuntimeError):
        return SphinxModel.from_pretrained(tiny_checkpoint(), **kw), TINY_NOTE


# -- task options ----------------------------------------------------------------------------------
def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"10, 20, 110, 220"`` (or with brackets) -> ``(10.0, 20.0, 110.0, 220.0)``.

    Raises:
        ValueError: unless it is four numbers with x1 < x2 and y1 < y2.
    """
    parts = [p for p in text.strip().strip("[]()").replace(";", ",").split(",") if p.strip()]
    try:
        box = tuple(float(p) for p in parts) if len(parts) == 4 else ()
    except ValueError:
        box = ()
    if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
        shown = text if len(text) <= 80 else f"{text[:80]}... ({len(text):,} characters)"
        raise ValueError(
            f"a box is four numbers x1,y1,x2,y2 with x1 < x2 and y1 < y2, got {shown!r}"
        )
    return box


def check_length(what: str, text: str, limit: int) -> None:
    """Refuse a text from the page longer than ``limit`` characters.

    Raises:
        ValueError: naming ``what`` and the length.
    """
    if len(text) > limit:
        raise ValueError(f"{what} is {len(text):,} characters long; at most {limit:,} are allowed")


def read_options_json(text: str) -> dict:
    """The options box as a dict: a JSON object of at most :data:`MAX_OPTIONS_JSON_CHARS`
    characters, nested at most :data:`MAX_JSON_DEPTH` levels.

    Raises:
        ValueError: for text that is too long, not JSON, not an object, or nested too deeply.
    """
    check_length("the options JSON", text, MAX_OPTIONS_JSON_CHARS)
    too_deep = f"the options JSON is nested too deeply (at most {MAX_JSON_DEPTH} levels)"
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(too_deep) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"options must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"options must be a JSON object, got {type(value).__name__}")
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ValueError(too_deep)
    return value


def json_depth(value) -> int:
    "How many levels of lists and objects ``value`` nests (a scalar: 0), read without recursion."
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, dict)):
            depth = max(depth, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return depth


def task_options(task_name: str, task_input: str = "", options_json: str = "",
                 image_size=None) -> dict:
    """The task's options from the page: its main input plus the JSON options box.

    Args:
        task_name: a registered task.
        task_input: the task's main input (see :data:`TASK_INPUTS`), as typed.
        options_json: a JSON object of further options (e.g. ``{"max_objects": 20}``).
        image_size: ``(width, height)`` of the uploaded image, for boxes and region prompts.

    Raises:
        ValueError: for bad JSON, a bad box, text over the page's limits or options the task
            rejects.
    """
    task = get_task(task_name)
    options: dict[str, Any] = {}
    check_length("the task input", task_input or "", MAX_INPUT_CHARS)
    text = (task_input or "").strip()
    option, _, kind = TASK_INPUTS.get(task_name, (None, "", None))
    if kind == "list" and text:
        options[option] = [c.strip() for c in text.split(",") if c.strip()]
    elif kind == "box" and text:
        options[option] = parse_box(text)
    elif kind == "box" and task_name != "pose":  # pose without a box: the people detection finds
        w, h = image_size or (1000, 1000)
        options[option] = (0.0, 0.0, float(w), float(h))
    elif kind == "relation":
        options.update({option: text} if text else {"variant": "triplets"})
    elif kind == "text" and text:
        options[option] = text
    check_length("the options JSON", options_json or "", MAX_OPTIONS_JSON_CHARS)
    if (options_json or "").strip():
        options.update(read_options_json(options_json))
    if "image_size" in task.Options.model_fields and "image_size" not in options:
        options["image_size"] = tuple(image_size or (1000, 1000))
    task.options(**options)  # raises ValueError naming bad options
    return options


# -- drawing and JSON ------------------------------------------------------------------------------
def result_detections(result) -> sv.Detections | None:
    "The boxes of a task result (``None`` for text results and key points)."
    if isinstance(result, sv.Detections):
        return result
    if isinstance(result, (SceneGraph, GroundedCaption)):
        return result.detections
    return None


def detection_labels(detections: sv.Detections) -> list[str]:
    "One label per row: the OCR text, region caption or class name, with the confidence."
    labels = []
    for i in range(len(detections)):
        text = ""
        for key in (TEXT_FIELD, CAPTION_FIELD, CLASS_NAME_FIELD):
            values = detections.data.get(key)
            if values is not None and len(values) > i and str(values[i]):
                text = str(values[i])
                break
        if detections.confidence is not None and np.isfinite(detections.confidence[i]):
            text = f"{text} {detections.confidence[i]:.2f}".strip()
        labels.append(text[:60] or str(i))
    return labels


def draw_result(image: Image.Image, result, masks: sv.Detections | None = None) -> Image.Image:
    """Draw a task result on a copy of ``image`` with supervision annotators.

    Args:
        image: the RGB image the result was parsed for.
        result: ``sv.Detections`` (boxes and labels, masks if set), ``sv.KeyPoints`` (points and
            COCO skeleton), ``SceneGraph`` (boxes and relation lines), ``GroundedCaption``
            (boxes), or text (nothing drawn).
        masks: SAM masks to draw as well (``sv.Detections`` with ``mask``).

    Returns:
        A new RGB image.
    """
    scene = np.array(image.convert("RGB"))
    lookup = sv.ColorLookup.INDEX
    if masks is not None and masks.mask is not None and len(masks):
        scene = sv.MaskAnnotator(opacity=0.45, color_lookup=lookup).annotate(scene, masks)
    detections = result_detections(result)
    if detections is not None and len(detections):
        if detections.mask is not None:
            scene = sv.MaskAnnotator(opacity=0.45, color_lookup=lookup).annotate(scene, detections)
        scene = sv.BoxAnnotator(thickness=2, color_lookup=lookup).annotate(scene, detections)
        scene = sv.LabelAnnotator(color_lookup=lookup, text_scale=0.45, text_padding=4,
                                  smart_position=True).annotate(
            scene, detections, labels=detection_labels(detections))
    if isinstance(result, SceneGraph):
        scene = _draw_relations(scene, result)
    if isinstance(result, sv.KeyPoints) and len(result):
        scene = sv.EdgeAnnotator(color=sv.Color.GREEN, thickness=2).annotate(scene, result)
        scene = sv.VertexAnnotator(color=sv.Color.RED, radius=4).annotate(scene, result)
    return Image.fromarray(scene)


def _draw_relations(scene: np.ndarray, graph: SceneGraph) -> np.ndarray:
    "A line from subject centre to object centre, labelled with the predicate."
    import cv2

    centers = graph.detections.get_anchors_coordinates(sv.Position.CENTER)
    for s, predicate, o in graph.triples:
        a, b = (tuple(int(v) for v in centers[i]) for i in (s, o))
        cv2.arrowedLine(scene, a, b, (255, 200, 0), 2, tipLength=0.05)
        mid = ((a[0] + b[0]) // 2, (a[1] + b[1]) // 2)
        cv2.putText(scene, predicate[:30], mid, cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 200, 0), 1,
                    cv2.LINE_AA)
    return scene


def result_json(result, masks: sv.Detections | None = None) -> dict:
    """A task result as JSON: the record labeling writes (``sphinx_tools.records.to_record``,
    with every per-object field), plus what the page shows besides.

    Returns:
        The record (``type`` ``detections``, ``keypoints``, ``scene_graph``, ``grounded_caption``
        or ``text``), with ``names`` (key points), ``named_triples`` (scene graph), ``entities``
        (grounded caption: ``phrase`` and ``span`` in the caption) and ``masks`` (SAM, as
        detections whose ``masks`` are compressed RLE) when they apply.
    """
    known = (sv.Detections, sv.KeyPoints, SceneGraph, GroundedCaption)
    out = to_record(result if isinstance(result, known) else str(result), ALL_FIELDS)
    if isinstance(result, sv.KeyPoints):
        out["names"] = keypoint_names(result)
    elif isinstance(result, SceneGraph):
        out["named_triples"] = [list(t) for t in result.named_triples()]
    elif isinstance(result, GroundedCaption):
        out["entities"] = [{"phrase": e.phrase, "span": list(e.span)} for e in result.entities]
    if masks is not None and len(masks):
        out["masks"] = detections_to_json(masks, ALL_FIELDS)
    return out


def _objects(record: dict) -> int:
    "How many objects a :func:`result_json` record holds."
    if record.get("type") == "keypoints":
        return len(record["people"])
    return len(record.get("detections", record).get("boxes", []))


def keypoint_names(key_points: sv.KeyPoints) -> list[str]:
    "COCO names for 17 key points, else the point indices as strings."
    from sphinx_tools.demo.synth import KEYPOINT_NAMES

    m = key_points.xy.shape[1] if key_points.xy.ndim == 3 else 0
    return list(KEYPOINT_NAMES) if m == len(KEYPOINT_NAMES) else [str(j) for j in range(m)]


# -- the page logic --------------------------------------------------------------------------------
class ImageTooLarge(ValueError):
    "The uploaded image has more pixels than the server allows."


def open_image(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an uploaded image as RGB after checking its size from the header.

    Raises:
        ImageTooLarge: for more than ``max_pixels`` pixels (checked before decoding).
        ValueError: for a file that is not an image.
    """
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"the image is too large: {exc}") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the image: {exc}") from None
    w, h = image.size
    if w * h > max_pixels:
        raise ImageTooLarge(
            f"the image has {w}x{h} = {w * h:,} pixels; this server accepts at most "
            f"{max_pixels:,}; resize it first"
        )
    try:
        return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot decode the image: {exc}") from None


@dataclass
class Turn:
    """What the page shows after each streamed token and at the end of a turn.

    Attributes:
        messages: the chat as gradio ``messages`` (``[{"role", "content"}]``).
        history: ``[[question, answer], ...]`` for the next turn's prompt.
        annotated: the image with the result drawn (``None`` until the answer is parsed).
        result: the result as JSON data (``None`` until parsed).
        json_path: the downloadable JSON file (``None`` until parsed).
        status: a Markdown status line (errors start with ``**Error:**``).
    """

    messages: list
    history: list
    annotated: Image.Image | None = None
    result: dict | None = None
    json_path: str | None = None
    status: str = ""


@dataclass
class DemoBackend:
    """The demo's logic, independent of gradio.

    Args:
        model: a ``SphinxModel`` (anything with ``stream(prompt, image, ...)``).
        note: Markdown shown at the top of the page (what model is loaded).
        sam_predictor: a ``segment_anything.SamPredictor`` for masks, or ``None``.
        max_pixels: largest accepted image, in pixels.
        max_gen_len: default and largest generation budget per answer.
        out_dir: where result JSON files are written (a temporary folder by default).
    """

    model: Any
    note: str = ""
    sam_predictor: Any = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_gen_len: int = 512
    out_dir: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        self.out_dir = Path(self.out_dir or tempfile.mkdtemp(prefix="sphinx-tools-serve-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        list_tasks()  # load the plugins now: the registry's first load is not thread-safe

    # prompt preview -------------------------------------------------------------------------
    def input_label(self, task_name: str) -> tuple[str, str]:
        "``(label, example value)`` of the task's main input box."
        option, label, _ = TASK_INPUTS.get(task_name, (None, "(this task needs no input)", None))
        return label, EXAMPLE_INPUTS.get(task_name, "")

    def prompt(self, task_name, task_input="", options_json="", image_path=None) -> tuple[str, str]:
        "``(prompt, status)``: the task's human turn for these inputs, or an error status."
        try:
            size = self._image_size(image_path)
            options = self._options(task_name, task_input, options_json, size)
            return get_task(task_name).prompt(**options), ""
        except Exception as exc:  # shown in the page, never raised into the server
            return "", f"**Error:** {exc}"

    def _options(self, task_name, task_input, options_json, size) -> dict:
        "The page's options over those the model was trained to be asked with."
        return {**trained_options(self.model, task_name),
                **task_options(task_name, task_input, options_json, size)}

    @staticmethod
    def _image_size(image_path):
        "``(width, height)`` as displayed (EXIF rotation applied), read from the header only."
        if not image_path:
            return None
        with Image.open(image_path) as im:
            w, h = im.size
            return (h, w) if im.getexif().get(274, 1) in (5, 6, 7, 8) else (w, h)

    # one chat turn --------------------------------------------------------------------------
    def respond(self, image_path, task_name, task_input, options_json, prompt, history,
                max_gen_len=None, temperature=0.0, top_p=0.95,
                continue_chat=False) -> Iterator[Turn]:
        """Ask ``prompt`` (empty: the task's own prompt), stream the answer, then parse it with
        the task.

        A question is asked on its own unless ``continue_chat``, which asks it as the next turn
        of ``history``. Pose without a person box (and with its own prompt) first asks detection
        for the people, then one pose question per person box found (the whole image when none
        is found).

        Yields a :class:`Turn` after each new piece of text and a final one with the drawn
        image, the JSON result and its file. Errors end the turn with an error status and the
        chat as it was; they are never raised (the server keeps running).
        """
        before = [list(qa) for qa in (history or [])]
        chat = _Chat(before if continue_chat else [])
        try:
            image, task, options, question = self._read_request(
                image_path, task_name, task_input, options_json, prompt, chat.history)
            sampling = {"max_gen_len": self._budget(max_gen_len),
                        "temperature": float(temperature), "top_p": float(top_p)}
            t0 = time.perf_counter()
            questions = [(question, options)]
            if self._detects_people_first(task, options, question):
                asked, people_options = _people_question()
                people = yield from self._ask(chat, image, asked, people_options, sampling,
                                              "detection")
                questions = _pose_questions(task, options, person_boxes(people)) or questions
            results = []
            for text, opts in questions:
                results.append((yield from self._ask(chat, image, text, opts, sampling,
                                                     task_name)))
            result = results[0] if len(results) == 1 else task.merge(results)
            yield self._final_turn(chat, image, task_name, questions, result,
                                   time.perf_counter() - t0)
        except Exception as exc:  # shown in the page, never raised into the server
            yield Turn(_messages(before), before, status=f"**Error:** {exc}")

    def _read_request(self, image_path, task_name, task_input, options_json, prompt, history):
        "``(image, task, options, question)`` of a request, checked against the page's limits."
        if not image_path:
            raise ValueError("upload an image first")
        check_length("the prompt", prompt or "", MAX_PROMPT_CHARS)
        image = open_image(image_path, self.max_pixels)
        options = self._options(task_name, task_input, options_json, image.size)
        task = get_task(task_name)
        question = (prompt or "").strip() or task.prompt(**options)
        said = len(question) + sum(len(q) + len(a) for q, a in history)
        if said > MAX_CONVERSATION_CHARS:
            raise ValueError(f"the conversation would be {said:,} characters long; at most "
                             f"{MAX_CONVERSATION_CHARS:,}: start a new chat")
        return image, task, options, question

    def _budget(self, max_gen_len) -> int:
        "The page's token budget, capped by the server's."
        return int(min(max(1, int(max_gen_len or self.max_gen_len)), self.max_gen_len))

    @staticmethod
    def _detects_people_first(task, options, question) -> bool:
        "Pose with no person box, asked with the task's own (whole-image) prompt."
        if task.name != "pose" or options.get("box") is not None or "boxes" in options:
            return False
        return question == task.prompt(**options)

    def _ask(self, chat: "_Chat", image, question, options, sampling, task_name):
        """Stream one question's answer into ``chat`` (yielding a :class:`Turn` per piece) and
        return it parsed by task ``task_name`` with ``options``."""
        task = get_task(task_name)
        chat.ask(question)
        with self.lock:  # one model, one generation at a time
            for answer in self.model.stream(build_prompt(chat.prompt_turns()), image, **sampling):
                chat.answer(answer)
                yield Turn(chat.messages, chat.history, status="Generating…")
        chat.answer(chat.messages[-1]["content"].strip(), done=True)
        parse_options = {k: v for k, v in options.items() if k != "image_size"}
        gens = getattr(self.model, "last_generations", None)  # logprobs -> confidences
        if gens:
            return parse_generation(task, gens[0], image.size, parse_options)
        return task.parse(chat.history[-1][1], image.size, **parse_options)

    def _final_turn(self, chat, image, task_name, questions, result, seconds) -> Turn:
        "The drawn result, its JSON and file, after the last answer of a request."
        masks = self.segment(image, result)
        parse_options = {k: v for k, v in questions[0][1].items() if k != "image_size"}
        question, answer = chat.history[-1]
        if len(questions) > 1:  # one question per person: the prompts and answers in order
            parse_options = {"boxes": [q[1]["box"] for q in questions]}
            question, answer = (list(t) for t in zip(*chat.history[-len(questions):]))
        data = {"task": task_name, "prompt": question, "answer": answer,
                "image_size": list(image.size), "options": plain(parse_options),
                "result": result_json(result, masks)}
        return Turn(chat.messages, chat.history, draw_result(image, result, masks), data,
                    self.write_json(data), self._summary(data["result"], seconds))

    def segment(self, image, result) -> sv.Detections | None:
        "SAM masks for the result's boxes (and key points), when a SAM predictor is loaded."
        if self.sam_predictor is None:
            return None
        from sphinx_tools.pipelines.segment import SEGMENTABLE, result_prompts, segment_detections

        if not isinstance(result, SEGMENTABLE):
            return None
        prompts, coords, labels = result_prompts(result, image.size, True)
        with self.lock:
            return segment_detections(self.sam_predictor, image, prompts,
                                      point_coords=coords, point_labels=labels)

    def write_json(self, data: dict) -> str:
        "Write one result to ``out_dir`` and return the path (for the download button)."
        path = self.out_dir / f"{data['task']}-{time.strftime('%Y%m%d-%H%M%S')}-{id(data):x}.json"
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
        return str(path)

    @staticmethod
    def _summary(result: dict, seconds: float) -> str:
        what = "text answer" if result["type"] == "text" else f"{_objects(result)} object(s)"
        masks = f", {_objects(result['masks'])} mask(s)" if "masks" in result else ""
        return f"Done in {seconds:.1f} s: {result['type']}, {what}{masks}."


def _messages(history: list) -> list[dict]:
    out = []
    for q, a in history:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out


class _Chat:
    "The conversation of one request: the earlier turns it continues, and its own."

    def __init__(self, history: list):
        self.context = [list(qa) for qa in history]  # asked before each question of the request
        self.history = [list(qa) for qa in history]
        self.messages = _messages(history)

    def ask(self, question: str) -> None:
        self.messages += [{"role": "user", "content": question},
                          {"role": "assistant", "content": ""}]
        self.question = question

    def prompt_turns(self) -> list:
        return [*self.context, [self.question, None]]

    def answer(self, text: str, done: bool = False) -> None:
        self.messages[-1]["content"] = text
        if done:
            self.history.append([self.question, text])


def _people_question() -> tuple[str, dict]:
    "The detection question that finds the people for pose, with its parse options."
    options = {"classes": [PERSON]}
    return get_task("detection").prompt(**options), options


def person_boxes(detections: sv.Detections) -> list[tuple[float, ...]]:
    "The boxes of the rows named person (the labeling engine's rule for pose's people)."
    names = detections.data.get(CLASS_NAME_FIELD, [""] * len(detections))
    return [tuple(float(v) for v in box) for box, name in zip(detections.xyxy, names, strict=True)
            if normalize_label(str(name)) == PERSON]


def _pose_questions(task, options: dict, boxes) -> list[tuple[str, dict]]:
    "One pose question per person box: the plugin's own split of ``boxes``."
    questions = task.split(**{**options, "boxes": boxes})
    return [(task.prompt(**q), q) for q in questions]


# -- gradio ----------------------------------------------------------------------------------------
# The page's named API (gradio_client: ``Client(url).predict(..., api_name="/run")``).
API = {
    "run": "ask a question about the image and parse the answer with the task",
    "prompt": "the task's prompt for these inputs (a preview; it does not run the model)",
    "pick_task": "switch the task: its input box and prompt",
    "new_chat": "clear the chat and the result",
}


def build_app(backend: DemoBackend, queue_size: int = DEFAULT_QUEUE_SIZE):
    """The gradio Blocks page around ``backend`` (queued: one request at a time).

    Element ids (for tests and custom CSS): ``input-image``, ``task``, ``task-input``,
    ``options``, ``prompt``, ``continue-chat``, ``run``, ``clear``, ``chat``, ``annotated``,
    ``status``, ``result-json``, ``result-file``, ``model-note``. API names: :data:`API`.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    with gr.Blocks(title="sphinx-tools demo", analytics_enabled=False) as app:
        gr.Markdown("# sphinx-tools: SPHINX vision demo")
        gr.Markdown(backend.note, elem_id="model-note")
        page = _Page(history=gr.State([]))
        with gr.Row():
            with gr.Column(scale=1):
                _input_column(gr, page, backend)
            with gr.Column(scale=1):
                _output_column(gr, page)
        _wire_events(app, page, backend)
    app.queue(default_concurrency_limit=1, max_size=queue_size, api_open=False)
    return app


@dataclass
class _Page:
    "The page's components, filled in by the column builders."

    history: Any
    image: Any = None
    task: Any = None
    task_input: Any = None
    options: Any = None
    prompt: Any = None
    continue_chat: Any = None
    run: Any = None
    clear: Any = None
    max_len: Any = None
    temperature: Any = None
    top_p: Any = None
    chat: Any = None
    annotated: Any = None
    status: Any = None
    result: Any = None
    download: Any = None

    @property
    def outputs(self) -> list:
        return [self.chat, self.history, self.annotated, self.result, self.download, self.status]


def _input_column(gr, page: _Page, backend: DemoBackend) -> None:
    "Image, task, its inputs and prompt, the buttons and the generation settings."
    names = [t.name for t in list_tasks()]
    first = "detection" if "detection" in names else names[0]
    label, example = backend.input_label(first)
    page.image = gr.Image(type="filepath", image_mode=None, sources=["upload"], label="Image",
                          elem_id="input-image", height=320)
    page.task = gr.Dropdown(names, value=first, label="Task", elem_id="task")
    page.task_input = gr.Textbox(label=label, value=example, elem_id="task-input",
                                 max_length=MAX_INPUT_CHARS)
    with gr.Accordion("More task options (JSON)", open=False):
        page.options = gr.Textbox(label='e.g. {"max_objects": 20}', value="", elem_id="options",
                                  max_length=MAX_OPTIONS_JSON_CHARS)
    page.prompt = gr.Textbox(label="Prompt (editable; empty: the task's own)", value="", lines=3,
                             elem_id="prompt", max_length=MAX_PROMPT_CHARS)
    page.continue_chat = gr.Checkbox(False, label="Continue chat (ask as the next turn; "
                                     "off: each question on its own)", elem_id="continue-chat")
    with gr.Row():
        page.run = gr.Button("Run", variant="primary", elem_id="run")
        page.clear = gr.Button("New chat", elem_id="clear")
    with gr.Accordion("Generation", open=False):
        page.max_len = gr.Slider(1, backend.max_gen_len, value=backend.max_gen_len, step=1,
                                 label="Max new tokens", elem_id="max-gen-len")
        page.temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature")
        page.top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")


def _output_column(gr, page: _Page) -> None:
    "The chat, the drawn result, the status and the JSON with its download."
    page.chat = gr.Chatbot(label="Chat", elem_id="chat", height=260, feedback_options=None)
    page.annotated = gr.Image(label="Result", interactive=False, elem_id="annotated",
                              format="png")
    page.status = gr.Markdown("", elem_id="status")
    page.result = gr.JSON(label="Parsed result", elem_id="result-json")
    page.download = gr.File(label="Download JSON", elem_id="result-file", interactive=False)


def _wire_events(app, page: _Page, backend: DemoBackend) -> None:
    """Connect the components to ``backend``. Prompt previews and resets never touch the model:
    they skip the model's queue."""
    import gradio as gr

    def prompt(task, task_input, options, image):
        return backend.prompt(task, task_input, options, image)

    def pick_task(task, options, image, continue_chat):
        new_label, value = backend.input_label(task)
        text, state = backend.prompt(task, value, options, image)
        fresh = [gr.update()] * 5 if continue_chat else [[], [], None, None, None]
        return (gr.update(label=new_label, value=value), text, state, *fresh)

    def run(image, task, task_input="", options="", prompt="", history=None,
            max_new_tokens=backend.max_gen_len, temperature=0.0, top_p=0.95,
            continue_chat=False):
        for turn in backend.respond(image, task, task_input, options, prompt, history,
                                    max_new_tokens, temperature, top_p, continue_chat):
            yield (turn.messages, turn.history, turn.annotated, turn.result, turn.json_path,
                   turn.status)

    def new_chat():
        return [], [], None, None, None, ""

    light = {"concurrency_limit": None, "trigger_mode": "always_last"}
    hidden = {"api_visibility": "private"}
    p = page
    prompt_inputs = [p.task, p.task_input, p.options, p.image]
    p.task.change(pick_task, [p.task, p.options, p.image, p.continue_chat],
                  [p.task_input, p.prompt, p.status, p.chat, p.history, p.annotated, p.result,
                   p.download], api_name="pick_task", api_description=API["pick_task"], **light)
    for box in (p.task_input, p.options):  # user edits only, so an edited prompt survives
        box.input(prompt, prompt_inputs, [p.prompt, p.status], api_name=f"{box.elem_id}_edit",
                  **hidden, **light)
    p.image.change(prompt, prompt_inputs, [p.prompt, p.status], api_name="prompt",
                   api_description=API["prompt"], **light)
    p.image.change(new_chat, None, p.outputs, api_name="new_image", **hidden, **light)
    app.load(prompt, prompt_inputs, [p.prompt, p.status], api_name="page_load", **hidden, **light)
    run_inputs = [p.image, p.task, p.task_input, p.options, p.prompt, p.history, p.max_len,
                  p.temperature, p.top_p, p.continue_chat]
    p.run.click(run, run_inputs, p.outputs, api_name="run", api_description=API["run"])
    p.prompt.submit(run, run_inputs, p.outputs, api_name="prompt_enter", **hidden)
    p.clear.click(new_chat, None, p.outputs, api_name="new_chat",
                  api_description=API["new_chat"], **light)


@click.command(name="serve")
@click.option("--checkpoint", "-c", type=click.Path(file_okay=False, path_type=Path),
              help="SPHINX checkpoint folder; default: the embedded demo model if installed, "
                   "else a tiny random-weight checkpoint")
@click.option("--sam", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="SAM checkpoint (.pth) to add masks to the boxes")
@click.option("--sam-type", default="vit_h", show_default=True,
              help="SAM model type matching --sam (vit_h, vit_l, vit_b)")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="interface to bind; 0.0.0.0 exposes the demo to your network")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(1, 65535))
@click.option("--share", is_flag=True, help="also create a public gradio.live link")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
@click.option("--dtype", default="fp32", show_default=True,
              type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option("--quantize", type=click.Choice(["int8"]),
              help="store the LLM's linear weights as int8 (weight-only; needs torchao)")
@click.option("--max-gen-len", default=512, show_default=True, type=click.IntRange(1),
              help="largest answer, in tokens")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True,
              type=click.IntRange(1), help="largest accepted image, in pixels")
@click.option("--max-file-size", default=DEFAULT_MAX_FILE_SIZE, show_default=True,
              help="largest upload, e.g. 20mb")
@click.option("--queue-size", default=DEFAULT_QUEUE_SIZE, show_default=True,
              type=click.IntRange(1), help="requests that may wait for the model")
def serve_command(checkpoint, sam, sam_type, host, port, share, device, dtype, quantize,
                  max_gen_len, max_pixels, max_file_size, queue_size):
    """Serve a local web demo (gradio): upload, tasks, streaming chat, drawn results, JSON.

    \b
    Examples:
      sphinx-tools serve                 # the embedded demo model on 127.0.0.1:7860
      sphinx-tools serve -c /ckpt/SPHINX-v2-1k --dtype bf16 --sam /ckpt/sam_vit_h_4b8939.pth
    """
    from sphinx_tools.cli import _device, _dtype

    device = _device(device)
    model, note = load_model(checkpoint, device=device, dtype=_dtype(dtype), quantize=quantize)
    sam_predictor = None
    if sam is not None:
        from sphinx_tools.pipelines.segment import load_sam

        sam_predictor = load_sam(sam, model_type=sam_type, device=device)
        note += f" SAM: `{sam.name}` ({sam_type})."
    backend = DemoBackend(model, note=note, sam_predictor=sam_predictor, max_pixels=max_pixels,
                          max_gen_len=max_gen_len)
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: binding to {host}: anyone who can reach this machine can use "
                   "the demo", err=True)
    if share:
        click.echo("warning: --share makes the demo reachable from the internet", err=True)
    app = build_app(backend, queue_size=queue_size)
    what = "tiny random-weight checkpoint" if note == TINY_NOTE else note
    click.echo(f"sphinx-tools serve: {what}; open http://{host}:{port}")
    try:
        app.launch(server_name=host, server_port=port, share=share, inbrowser=False,
                   show_error=True, max_file_size=max_file_size, ssr_mode=False, mcp_server=False,
                   footer_links=[], quiet=False)
    except OSError as exc:
        raise click.ClickException(f"cannot serve on {host}:{port}: {exc}") from None


@hookimpl
def register_commands(cli):
    "Add ``serve`` to the ``sphinx-tools`` command group."
    cli.add_command(serve_command, "serve")
