"""Local web demo: ``sphinx-tools serve`` (gradio).

One page: upload an image, pick a task (its prompt is shown and can be edited), chat with the
model with streaming tokens, and see the parsed result drawn on the image (boxes, labels, key
points with skeleton, SAM masks with ``--sam``) and as JSON to download.

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
from sphinx_tools.registry import get_task, list_tasks
from sphinx_tools.run import parse_generation
from sphinx_tools.tasks import MAX_OPTION_CHARS, MAX_PROMPT_CHARS

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
    "pose": ("box", f"Person box ({BOX_HELP})", "box"),
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


def load_model(checkpoint=None, device: str = "cpu", dtype=None):
    """Load the model the demo serves.

    Args:
        checkpoint: a checkpoint folder; ``None`` tries the embedded demo model (``"demo"``) and
            falls back to a tiny random-weight checkpoint.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: a ``torch.dtype`` (float32 when ``None``).

    Returns:
        ``(model, note)``: the ``SphinxModel`` and a Markdown line saying what was loaded.
    """
    import torch

    from sphinx_tools.sphinx_model import SphinxModel

    kw = {"device": device, "dtype": dtype or torch.float32}
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
    elif kind == "box":
        w, h = image_size or (1000, 1000)
        options[option] = parse_box(text) if text else (0.0, 0.0, float(w), float(h))
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


def _plain(value):
    "numpy scalars/arrays -> JSON types; NaN -> None."
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def mask_rle(mask: np.ndarray) -> dict:
    "A (H, W) bool mask -> COCO compressed RLE ``{size: [H, W], counts: str}``."
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def detections_json(detections: sv.Detections) -> list[dict]:
    "One dict per row: ``xyxy`` pixels, ``confidence``, every ``data`` field, mask as RLE."
    rows = []
    for i in range(len(detections)):
        row = {"xyxy": [round(float(v), 2) for v in detections.xyxy[i]]}
        if detections.confidence is not None:
            row["confidence"] = detections.confidence[i]
        if detections.class_id is not None:
            row["class_id"] = detections.class_id[i]
        for key, values in detections.data.items():
            row[key] = values[i]
        if detections.mask is not None:
            row["mask"] = mask_rle(detections.mask[i])
            row["mask_area"] = int(detections.mask[i].sum())
        rows.append(row)
    return _plain(rows)


def result_json(result, masks: sv.Detections | None = None) -> dict:
    """A task result as JSON-friendly data.

    Returns:
        ``{"type": ..., ...}``: ``detections`` (``objects``, ``metadata``), ``keypoints``
        (``objects`` with ``keypoints`` ``[x, y, visible]`` and ``names``), ``scene_graph``
        (``objects``, ``triples``), ``grounded_caption`` (``text``, ``entities``) or ``text``;
        plus ``masks`` (SAM) when given.
    """
    if isinstance(result, sv.Detections):
        out = {"type": "detections", "objects": detections_json(result),
               "metadata": _plain(result.metadata)}
    elif isinstance(result, sv.KeyPoints):
        people = []
        for i in range(len(result)):
            visible = result.visible[i] if result.visible is not None else [True] * len(result.xy[i])
            person = {"keypoints": [[round(float(x), 2), round(float(y), 2), bool(v)]
                                    for (x, y), v in zip(result.xy[i], visible, strict=True)]}
            if result.keypoint_confidence is not None:
                person["keypoint_confidence"] = result.keypoint_confidence[i]
            if result.detection_confidence is not None:
                person["confidence"] = result.detection_confidence[i]
            person.update({k: v[i] for k, v in result.data.items() if len(v) == len(result)})
            people.append(_plain(person))
        out = {"type": "keypoints", "names": keypoint_names(result), "objects": people}
    elif isinstance(result, SceneGraph):
        out = {"type": "scene_graph", "objects": detections_json(result.detections),
               "triples": [{"subject": s, "predicate": p, "object": o}
                           for s, p, o in result.triples],
               "named_triples": [list(t) for t in result.named_triples()]}
    elif isinstance(result, GroundedCaption):
        out = {"type": "grounded_caption", "text": result.text,
               "entities": [{"phrase": e.phrase, "span": list(e.span), "xyxy": _plain(e.xyxy)}
                            for e in result.entities]}
    else:
        out = {"type": "text", "text": str(result)}
    if masks is not None and len(masks):
        out["masks"] = detections_json(masks)
    return out


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
            options = task_options(task_name, task_input, options_json, size)
            return get_task(task_name).prompt(**options), ""
        except Exception as exc:  # shown in the page, never raised into the server
            return "", f"**Error:** {exc}"

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
                max_gen_len=None, temperature=0.0, top_p=0.95) -> Iterator[Turn]:
        """Ask ``prompt`` as the next turn, stream the answer, then parse it with the task.

        Yields a :class:`Turn` after each new piece of text and a final one with the drawn
        image, the JSON result and its file. Errors end the turn with an error status; they are
        never raised (the server keeps running).
        """
        history = [list(qa) for qa in (history or [])]
        messages = _messages(history)
        try:
            if not image_path:
                raise ValueError("upload an image first")
            check_length("the prompt", prompt or "", MAX_PROMPT_CHARS)
            question = (prompt or "").strip()
            if not question:
                raise ValueError("the prompt is empty: pick a task or type a question")
            said = len(question) + sum(len(q) + len(a) for q, a in history)
            if said > MAX_CONVERSATION_CHARS:
                raise ValueError(f"the conversation would be {said:,} characters long; at most "
                                 f"{MAX_CONVERSATION_CHARS:,}: start a new chat")
            image = open_image(image_path, self.max_pixels)
            options = task_options(task_name, task_input, options_json, image.size)
            task = get_task(task_name)
            budget = int(min(max(1, int(max_gen_len or self.max_gen_len)), self.max_gen_len))
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": ""}]
            answer = ""
            t0 = time.perf_counter()
            with self.lock:  # one model, one generation at a time
                for answer in self.model.stream(
                        build_prompt([*history, [question, None]]), image, max_gen_len=budget,
                        temperature=float(temperature), top_p=float(top_p)):
                    messages[-1]["content"] = answer
                    yield Turn(messages, history, status="Generating…")
            seconds = time.perf_counter() - t0
            answer = answer.strip()
            messages[-1]["content"] = answer
            history.append([question, answer])
            parse_options = {k: v for k, v in options.items() if k != "image_size"}
            gens = getattr(self.model, "last_generations", None)  # logprobs -> confidences
            result = (parse_generation(task, gens[0], image.size, parse_options) if gens
                      else task.parse(answer, image.size, **parse_options))
            masks = self.segment(image, result)
            data = {"task": task_name, "prompt": question, "answer": answer,
                    "image_size": list(image.size), "options": _plain(parse_options),
                    "result": result_json(result, masks)}
            yield Turn(messages, history, draw_result(image, result, masks), data,
                       self.write_json(data), self._summary(data["result"], seconds))
        except Exception as exc:  # shown in the page, never raised into the server
            if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
                messages = messages[:-2]
            yield Turn(messages, history, status=f"**Error:** {exc}")

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
        n = len(result.get("objects", result.get("entities", [])))
        what = "text answer" if result["type"] == "text" else f"{n} object(s)"
        masks = f", {len(result['masks'])} mask(s)" if "masks" in result else ""
        return f"Done in {seconds:.1f} s: {result['type']}, {what}{masks}."


def _messages(history: list) -> list[dict]:
    out = []
    for q, a in history:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out


# -- gradio ----------------------------------------------------------------------------------------
def build_app(backend: DemoBackend, queue_size: int = DEFAULT_QUEUE_SIZE):
    """The gradio Blocks page around ``backend`` (queued: one request at a time).

    Element ids (for tests and custom CSS): ``input-image``, ``task``, ``task-input``,
    ``options``, ``prompt``, ``run``, ``clear``, ``chat``, ``annotated``, ``status``,
    ``result-json``, ``result-file``, ``model-note``.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    names = [t.name for t in list_tasks()]
    first = "detection" if "detection" in names else names[0]
    label, example = backend.input_label(first)

    with gr.Blocks(title="sphinx-tools demo", analytics_enabled=False) as app:
        gr.Markdown("# sphinx-tools: SPHINX vision demo")
        gr.Markdown(backend.note, elem_id="model-note")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", image_mode=None, sources=["upload"],
                                 label="Image", elem_id="input-image", height=320)
                task = gr.Dropdown(names, value=first, label="Task", elem_id="task")
                task_input = gr.Textbox(label=label, value=example, elem_id="task-input",
                                        max_length=MAX_INPUT_CHARS)
                with gr.Accordion("More task options (JSON)", open=False):
                    options = gr.Textbox(label='e.g. {"max_objects": 20}', value="",
                                         elem_id="options", max_length=MAX_OPTIONS_JSON_CHARS)
                prompt = gr.Textbox(label="Prompt (editable; sent as your next chat turn)",
                                    lines=3, elem_id="prompt", max_length=MAX_PROMPT_CHARS)
                with gr.Row():
                    run = gr.Button("Run", variant="primary", elem_id="run")
                    clear = gr.Button("New chat", elem_id="clear")
                with gr.Accordion("Generation", open=False):
                    max_len = gr.Slider(1, backend.max_gen_len, value=backend.max_gen_len,
                                        step=1, label="Max new tokens", elem_id="max-gen-len")
                    temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
            with gr.Column(scale=1):
                chat = gr.Chatbot(label="Chat", elem_id="chat", height=260, feedback_options=None)
                annotated = gr.Image(label="Result", interactive=False, elem_id="annotated",
                                     format="png")
                status = gr.Markdown("", elem_id="status")
                result = gr.JSON(label="Parsed result", elem_id="result-json")
                download = gr.File(label="Download JSON", elem_id="result-file",
                                   interactive=False)

        def refresh_prompt(task_name, text, opts, path):
            return backend.prompt(task_name, text, opts, path)

        def pick_task(task_name, opts, path):
            new_label, value = backend.input_label(task_name)
            text, state = backend.prompt(task_name, value, opts, path)
            return gr.update(label=new_label, value=value), text, state

        def respond(path, task_name, text, opts, question, hist, n, temp, p):
            for turn in backend.respond(path, task_name, text, opts, question, hist, n, temp, p):
                yield (turn.messages, turn.history, turn.annotated, turn.result, turn.json_path,
                       turn.status)

        def new_chat():
            return [], [], None, None, None, ""

        # Prompt previews and resets never touch the model: they skip the model's queue.
        light = {"concurrency_limit": None, "trigger_mode": "always_last"}
        prompt_inputs = [task, task_input, options, image]
        task.change(pick_task, [task, options, image], [task_input, prompt, status], **light)
        for box in (task_input, options):  # user edits only, so an edited prompt survives
            box.input(refresh_prompt, prompt_inputs, [prompt, status], **light)
        image.change(refresh_prompt, prompt_inputs, [prompt, status], **light)
        image.change(new_chat, None, [chat, history, annotated, result, download, status],
                     **light)
        app.load(refresh_prompt, prompt_inputs, [prompt, status], **light)
        outputs = [chat, history, annotated, result, download, status]
        run_inputs = [image, task, task_input, options, prompt, history, max_len, temperature,
                      top_p]
        run.click(respond, run_inputs, outputs)
        prompt.submit(respond, run_inputs, outputs)
        clear.click(new_chat, None, outputs, **light)
    app.queue(default_concurrency_limit=1, max_size=queue_size, api_open=False)
    return app


def _dtype(name: str):
    import torch

    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    return table[name]


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
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="fp32", show_default=True,
              type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option("--max-gen-len", default=512, show_default=True, type=click.IntRange(1),
              help="largest answer, in tokens")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True,
              type=click.IntRange(1), help="largest accepted image, in pixels")
@click.option("--max-file-size", default=DEFAULT_MAX_FILE_SIZE, show_default=True,
              help="largest upload, e.g. 20mb")
@click.option("--queue-size", default=DEFAULT_QUEUE_SIZE, show_default=True,
              type=click.IntRange(1), help="requests that may wait for the model")
def serve_command(checkpoint, sam, sam_type, host, port, share, device, dtype, max_gen_len,
                  max_pixels, max_file_size, queue_size):
    "Serve a local web demo (gradio): upload, tasks, streaming chat, drawn results, JSON."
    model, note = load_model(checkpoint, device=device, dtype=_dtype(dtype))
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
