"""Deterministic synthetic scenes with exact ground truth, for training and testing tiny SPHINX models.

Four kinds of scene cover every built-in task:

- ``shapes``: coloured circles, squares, triangles, ... -> detection, REC, REG, grounded
  caption, relations, caption and VQA;
- ``words``: words rendered with Pillow's bundled default font -> OCR (spotting and reading);
- ``pose``: stick figures with COCO-17 key points -> person detection and pose;
- ``document``: pages with title, text, list, table and figure regions -> layout.

Every object is drawn on the canvas and on its own mask at the same time, so its box and area are
read from the ink, not from the drawing arguments. Boxes are pixel ``[x1, y1, x2, y2]`` with
exclusive right/bottom edges (``PIL.Image.getbbox``); key points are pixel centres (``x + 0.5``).
Answers are written in SPHINX's output formats (those the task plugins parse) with
:class:`~sphinx_tools.transforms.PaddedResize` and 2 decimals; questions come from the built-in
task plugins' templates, so training and inference prompts match exactly. Where a task is asked
in another of its templates than the default one (:data:`TRAINED_TASK_OPTIONS`), a model built
on these scenes carries that choice in its checkpoint (``task_options.json``), and every entry
point asks the task that way.

Same ``seed`` -> byte-identical images, answers and ground truth::

    scene = generate_scene("shapes", seed=3)
    for conv in make_conversations(scene, "images/000003.png"):
        print(conv["conversations"][1]["value"])
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..coco import coco_annotation, write_json
from ..transforms import PaddedResize

KINDS = ("shapes", "words", "pose", "document")
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross")
COLORS = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (235, 195, 30),
    "purple": (135, 55, 185), "orange": (240, 125, 25),
}
BACKGROUNDS = {"white": (250, 250, 250), "gray": (205, 205, 205), "beige": (238, 228, 200)}
INKS = ((20, 20, 20), (25, 35, 110), (120, 20, 20), (20, 80, 35), (80, 40, 110))
KEYPOINT_NAMES = (
    "nose", "left eye", "right eye", "left ear", "right ear", "left shoulder", "right shoulder",
    "left elbow", "right elbow", "left wrist", "right wrist", "left hip", "right hip", "left knee",
    "right knee", "left ankle", "right ankle",
)
SKELETON = (  # 1-based COCO
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
    (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)
LAYOUT_CLASSES = ("title", "text", "list", "table", "figure")
WORDS = (
    "apple", "river", "STOP", "OPEN", "cat", "house", "green", "SALE", "music", "robot", "coffee",
    "EXIT", "train", "window", "paper", "light", "cloud", "tiger", "HELLO", "garden", "school",
    "PARK", "bread", "table", "smile", "ocean", "north", "CAFE", "pizza", "story", "2024", "42",
    "planet", "zebra", "Quick", "Brown", "jump", "NEWS", "market", "HOTEL", "sky", "book", "A1",
)
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# COCO categories of every kind; ``word`` is OCR, the layout classes follow PubLayNet's names
CATEGORIES = (
    [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    + [{"id": len(SHAPES) + 1, "name": "person", "supercategory": "person",
        "keypoints": [k.replace(" ", "_") for k in KEYPOINT_NAMES], "skeleton": [list(p) for p in SKELETON]},
       {"id": len(SHAPES) + 2, "name": "word", "supercategory": "text"}]
    + [{"id": len(SHAPES) + 3 + i, "name": c, "supercategory": "layout"}
       for i, c in enumerate(LAYOUT_CLASSES)]
)
CATEGORY_NAMES = tuple(c["name"] for c in CATEGORIES)
# The options a task is asked with here where they are not its default prompt: layout lists its
# classes in the question. A demo build writes them to its checkpoint's task_options.json.
TRAINED_TASK_OPTIONS = {"layout": {"variant": "classes"}}
CATEGORY_ID = {c["name"]: c["id"] for c in CATEGORIES}
_TRANSFORM = PaddedResize()


# -- scene data ----------------------------------------------------------------------------------
@dataclass
class SceneObject:
    """One annotated object.

    Attributes:
        category: shape name, ``"person"``, ``"word"`` or a layout class.
        xyxy: ``(x1, y1, x2, y2)`` pixels of the ink (right/bottom edges exclusive).
        area: number of inked pixels.
        color: colour name (shapes).
        text: the word (OCR).
        keypoints: (17, 3) ``x, y, v`` in COCO order, pixel centres, ``v=2`` (persons).
        polygon: flat ``[x, y, ...]`` outline (shapes), for COCO ``segmentation``.
        expression: the canonical unique referring expression (shapes), e.g. ``"the red circle"``.
    """

    category: str
    xyxy: tuple
    area: int
    color: str | None = None
    text: str | None = None
    keypoints: np.ndarray | None = None
    polygon: list | None = None
    expression: str | None = None


@dataclass
class Scene:
    """A generated image and its exact ground truth.

    Attributes:
        kind: one of :data:`KINDS`.
        seed: the seed it was generated from.
        image: the RGB image.
        objects: every annotated object.
        background: background colour name.
        relations: ``(subject_index, predicate, object_index)`` that hold strictly (shapes).
    """

    kind: str
    seed: int
    image: Image.Image
    objects: list = field(default_factory=list)
    background: str = "white"
    relations: list = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        "``(width, height)``."
        return self.image.size

    @property
    def keypoints(self) -> np.ndarray:
        "(n, 17, 3) key points of the persons."
        people = [o.keypoints for o in self.objects if o.keypoints is not None]
        return np.stack(people) if people else np.zeros((0, 17, 3))

    @property
    def words(self) -> list[tuple[str, tuple]]:
        "``(text, xyxy)`` of the words, in reading order."
        return [(o.text, o.xyxy) for o in self.objects if o.category == "word"]

    @property
    def regions(self) -> list[tuple[str, tuple]]:
        "``(layout class, xyxy)`` of the document regions, in reading order."
        return [(o.category, o.xyxy) for o in self.objects if o.category in LAYOUT_CLASSES]


@dataclass
class QA:
    """One question with its answer, the task that parses it and the objects it refers to.

    Attributes:
        task: the built-in task name (``rec``, ``pose``, ...).
        options: the task options (JSON-friendly) used for the prompt, and for parsing.
        question: the human turn.
        answer: the gpt turn, in SPHINX's output format.
        targets: indices into ``scene.objects`` in the order the answer mentions them.
    """

    task: str
    options: dict
    question: str
    answer: str
    targets: list = field(default_factory=list)


# -- drawing helpers -----------------------------------------------------------------------------
class _Ink:
    "Draws on the canvas and on one object's own mask, so its box and area are exact."

    def __init__(self, canvas: Image.Image):
        self.mask = Image.new("L", canvas.size, 0)
        self._canvas = ImageDraw.Draw(canvas)
        self._mask = ImageDraw.Draw(self.mask)

    def __call__(self, method: str, *args, color, outline: bool = False, **kwargs):
        key = "outline" if outline else "fill"
        getattr(self._canvas, method)(*args, **{key: color}, **kwargs)
        getattr(self._mask, method)(*args, **{key: 255}, **kwargs)

    def extent(self) -> tuple[tuple, int]:
        "``(xyxy, area)`` of what was drawn."
        box = self.mask.getbbox()
        if box is None:
            raise RuntimeError("nothing was drawn")
        w, h = self.mask.size
        return tuple(float(v) for v in box), int(w * h - self.mask.histogram()[0])


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    "Pillow's bundled default font (Aileron via FreeType, no download) at ``size`` px."
    return ImageFont.load_default(size=size)


def _jitter(rng, rgb, amount: int = 12) -> tuple:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _canvas_size(rng, portrait_p: float = 0.5) -> tuple[int, int]:
    "A non-square size, sides in [160, 320], portrait with probability ``portrait_p``."
    long = int(rng.integers(224, 321))
    short = int(rng.integers(160, int(long * 0.85) + 1))
    return (short, long) if rng.random() < portrait_p else (long, short)


def _margin(size) -> int:
    "Distance kept from the border, so 2-decimal answers never leave the image."
    return max(4, math.ceil(0.02 * max(size)))


def _place(rng, size, wh, taken, gap: int = 4, tries: int = 60):
    "Top-left corner for a ``wh`` box clear of the ``taken`` boxes (and the margin), or ``None``."
    m = _margin(size)
    w, h = wh
    if w > size[0] - 2 * m or h > size[1] - 2 * m:
        return None
    for _ in range(tries):
        x = int(rng.integers(m, size[0] - m - w + 1))
        y = int(rng.integers(m, size[1] - m - h + 1))
        if all(x + w + gap <= a or x >= c + gap or y + h + gap <= b or y >= d + gap for a, b, c, d in taken):
            return x, y
    return None


def _overlap(a0, a1, b0, b1) -> bool:
    return a0 < b1 and b0 < a1


# -- shapes --------------------------------------------------------------------------------------
def _shape_polygon(shape: str, x: float, y: float, s: float) -> list[tuple[float, float]]:
    "Outline of ``shape`` inscribed in the square at ``(x, y)`` with side ``s`` (last pixel ``x+s-1``)."
    cx, cy, r = x + (s - 1) / 2, y + (s - 1) / 2, (s - 1) / 2

    def ring(n, radius, phase):
        angles = [phase + 2 * math.pi * k / n for k in range(n)]
        return [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles]

    if shape == "circle":
        return ring(32, r, 0.0)
    if shape == "square":
        lo, hi = 0.08 * s, s - 1 - 0.08 * s
        return [(x + lo, y + lo), (x + hi, y + lo), (x + hi, y + hi), (x + lo, y + hi)]
    if shape == "triangle":
        return [(cx, y), (x + s - 1, y + s - 1), (x, y + s - 1)]
    if shape == "star":
        outer, inner = ring(5, r, -math.pi / 2), ring(5, 0.42 * r, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "hexagon":
        return ring(6, r, 0.0)
    if shape == "diamond":
        return [(cx, y), (x + 0.82 * (s - 1), cy), (cx, y + s - 1), (x + 0.18 * (s - 1), cy)]
    if shape == "cross":
        a, b = x + 0.33 * (s - 1), x + 0.67 * (s - 1)
        c, d = y + 0.33 * (s - 1), y + 0.67 * (s - 1)
        e, f = x + s - 1, y + s - 1
        return [(a, y), (b, y), (b, c), (e, c), (e, d), (b, d),
                (b, f), (a, f), (a, d), (x, d), (x, c), (a, c)]
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


def _sample_specs(rng, n: int) -> list[tuple[str, str]]:
    "``(color, shape)`` pairs; a pair appears at most twice (so position words disambiguate it)."
    specs = []
    while len(specs) < n:
        if specs and rng.random() < 0.25:
            spec = specs[int(rng.integers(len(specs)))]
        else:
            spec = (str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)))
        if specs.count(spec) < 2:
            specs.append(spec)
    return specs


def _shapes_scene(rng, seed: int) -> Scene:
    size = _canvas_size(rng)
    background = str(rng.choice(list(BACKGROUNDS)))
    image = Image.new("RGB", size, _jitter(rng, BACKGROUNDS[background], 6))
    objects, taken = [], []
    for color, shape in _sample_specs(rng, int(rng.integers(1, 7))):
        side = int(min(size) * rng.uniform(0.14, 0.32))
        corner = _place(rng, size, (side, side), taken)
        if corner is None:
            continue
        polygon = _shape_polygon(shape, *corner, side)
        ink = _Ink(image)
        if shape == "circle":
            ink("ellipse", [corner[0], corner[1], corner[0] + side - 1, corner[1] + side - 1],
                color=_jitter(rng, COLORS[color]))
        else:
            ink("polygon", polygon, color=_jitter(rng, COLORS[color]))
        xyxy, area = ink.extent()
        taken.append(xyxy)
        objects.append(SceneObject(shape, xyxy, area, color=color,
                                   polygon=[round(float(v), 2) for p in polygon for v in p]))
    if not objects:  # the first placement always fits; kept for safety
        raise RuntimeError(f"no shape could be placed (seed {seed})")
    objects.sort(key=lambda o: (o.xyxy[0], o.xyxy[1]))  # left to right
    for obj, expression in zip(objects, _canonical_expressions(objects)):
        obj.expression = expression
    return Scene("shapes", seed, image, objects, background, _relations(objects))


def _position_word(obj, other) -> str:
    "Where ``obj`` is relative to its twin: ``on the left``, ``at the top``, ..."
    horizontal = not _overlap(obj.xyxy[0], obj.xyxy[2], other.xyxy[0], other.xyxy[2])
    vertical = not _overlap(obj.xyxy[1], obj.xyxy[3], other.xyxy[1], other.xyxy[3])
    dx = (obj.xyxy[0] + obj.xyxy[2]) - (other.xyxy[0] + other.xyxy[2])
    dy = (obj.xyxy[1] + obj.xyxy[3]) - (other.xyxy[1] + other.xyxy[3])
    if horizontal and (not vertical or abs(dx) >= abs(dy)):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def _canonical_expressions(objects) -> list[str]:
    "``the {color} {shape}``, plus a position word when the pair is not unique."
    out = []
    for obj in objects:
        twins = [o for o in objects if o is not obj and (o.color, o.category) == (obj.color, obj.category)]
        base = f"the {obj.color} {obj.category}"
        out.append(f"{base} {_position_word(obj, twins[0])}" if twins else base)
    return out


def _expressions(objects, index: int) -> list[str]:
    "Every valid unique referring expression for ``objects[index]``."
    obj = objects[index]
    found = [obj.expression]
    if sum(o.category == obj.category for o in objects) == 1:
        found.append(f"the {obj.category}")
    return found


def _relations(objects) -> list[tuple[int, str, int]]:
    "Strict pairwise relations: disjoint along one axis and overlapping along the other."
    out = []
    for i, a in enumerate(objects):
        for j, b in enumerate(objects):
            if i == j:
                continue
            x_overlap = _overlap(a.xyxy[0], a.xyxy[2], b.xyxy[0], b.xyxy[2])
            y_overlap = _overlap(a.xyxy[1], a.xyxy[3], b.xyxy[1], b.xyxy[3])
            if y_overlap and a.xyxy[2] <= b.xyxy[0]:
                out += [(i, "to the left of", j)]
            elif y_overlap and b.xyxy[2] <= a.xyxy[0]:
                out += [(i, "to the right of", j)]
            elif x_overlap and a.xyxy[3] <= b.xyxy[1]:
                out += [(i, "above", j)]
            elif x_overlap and b.xyxy[3] <= a.xyxy[1]:
                out += [(i, "below", j)]
    return out


# -- words ---------------------------------------------------------------------------------------
def _words_scene(rng, seed: int) -> Scene:
    size = _canvas_size(rng)
    background = str(rng.choice(list(BACKGROUNDS)))
    image = Image.new("RGB", size, _jitter(rng, BACKGROUNDS[background], 6))
    m = _margin(size)
    objects, y = [], m + int(rng.integers(0, 12))
    while len(objects) < 8:
        font = _font(int(rng.integers(12, 27)))
        line_h = font.size + 2
        if y + line_h > size[1] - m:
            break
        x = m + int(rng.integers(0, 20))
        for _ in range(int(rng.integers(1, 4))):
            word = str(rng.choice(WORDS))
            width = math.ceil(font.getlength(word))
            if x + width > size[0] - m or len(objects) >= 8:
                break
            ink = _Ink(image)
            ink("text", (x, y), word, font=font, color=_jitter(rng, INKS[int(rng.integers(len(INKS)))], 8))
            xyxy, area = ink.extent()
            objects.append(SceneObject("word", xyxy, area, text=word))
            x += width + int(rng.integers(font.size // 2, 3 * font.size))
        y += line_h + int(rng.integers(4, 24))
    if not objects:
        raise RuntimeError(f"no word fitted (seed {seed})")
    return Scene("words", seed, image, objects, background)


# -- stick figures -------------------------------------------------------------------------------
def _figure_points(rng, h: float) -> tuple[np.ndarray, float]:
    "COCO-17 key points of a front-facing figure of height ~``h``, head top at y=0, centre x=0."
    r = 0.08 * h
    pts = np.zeros((17, 2))
    pts[0] = (0, 1.15 * r)  # nose
    pts[1], pts[2] = (0.4 * r, 0.75 * r), (-0.4 * r, 0.75 * r)  # eyes: the person's left is image right
    pts[3], pts[4] = (r, r), (-r, r)  # ears, on the head outline
    shoulder_y, half = 2 * r + 0.07 * h, 0.11 * h * rng.uniform(0.8, 1.2)
    hip_y, hip_half = shoulder_y + 0.3 * h, 0.065 * h
    pts[5], pts[6] = (half, shoulder_y), (-half, shoulder_y)
    pts[11], pts[12] = (hip_half, hip_y), (-hip_half, hip_y)
    for side in (1, -1):  # +1: the person's left (image right)
        k = 0 if side == 1 else 1
        up = math.radians(rng.uniform(10, 160))
        fore = up + math.radians(rng.uniform(-60, 60))
        pts[7 + k] = pts[5 + k] + (side * 0.17 * h * math.sin(up), 0.17 * h * math.cos(up))
        pts[9 + k] = pts[7 + k] + (side * 0.15 * h * math.sin(fore), 0.15 * h * math.cos(fore))
        thigh = math.radians(rng.uniform(3, 30))
        shin = thigh + math.radians(rng.uniform(-15, 15))
        pts[13 + k] = pts[11 + k] + (side * 0.22 * h * math.sin(thigh), 0.22 * h * math.cos(thigh))
        pts[15 + k] = pts[13 + k] + (side * 0.2 * h * math.sin(shin), 0.2 * h * math.cos(shin))
    return pts, r


def _draw_figure(image, pts: np.ndarray, r: float, lw: int, color) -> _Ink:
    "Head outline, neck, skeleton lines and a dot on every key point."
    ink = _Ink(image)
    cx, cy = pts[3:5, 0].mean(), pts[3:5, 1].mean()
    ink("ellipse", [cx - r, cy - r, cx + r, cy + r], color=color, outline=True, width=lw)
    neck = pts[5:7].mean(axis=0)
    ink("line", [(cx, cy + r), tuple(neck)], color=color, width=lw)
    for a, b in SKELETON:
        if a > 5 and b > 5:  # limbs and torso; the head is the outline
            ink("line", [tuple(pts[a - 1]), tuple(pts[b - 1])], color=color, width=lw)
    dot = max(2, lw)
    for x, y in pts:
        ink("ellipse", [x - dot, y - dot, x + dot, y + dot], color=color)
    return ink


def _pose_scene(rng, seed: int) -> Scene:
    size = _canvas_size(rng)
    background = str(rng.choice(list(BACKGROUNDS)))
    image = Image.new("RGB", size, _jitter(rng, BACKGROUNDS[background], 6))
    objects, taken = [], []
    for _ in range(int(rng.integers(1, 4))):
        h = size[1] * rng.uniform(0.45, 0.85)
        pts, r = _figure_points(rng, h)
        extent = np.vstack([pts, (0, 0)])  # key points and the top of the head
        pad = 2 * (max(2, round(0.025 * h)) + 2) + 2
        room = np.array(size) - 2 * _margin(size) - pad
        scale = min(1.0, *(room / np.ptp(extent, axis=0)))  # wide arms in a narrow image: shrink
        pts, r, h, extent = pts * scale, r * scale, h * scale, extent * scale
        lw = max(2, round(0.025 * h))
        lo, hi = extent.min(axis=0) - lw - 2, extent.max(axis=0) + lw + 2
        corner = _place(rng, size, tuple(np.ceil(hi - lo).astype(int)), taken)
        if corner is None:
            continue
        pts = np.round(pts - lo + corner)  # integer pixels: dots centred on pixel centres
        ink = _draw_figure(image, pts, r, lw, _jitter(rng, INKS[int(rng.integers(len(INKS)))], 8))
        xyxy, area = ink.extent()
        taken.append(xyxy)
        keypoints = np.concatenate([pts + 0.5, np.full((17, 1), 2.0)], axis=1)
        objects.append(SceneObject("person", xyxy, area, keypoints=keypoints))
    if not objects:
        raise RuntimeError(f"no figure fitted (seed {seed})")
    objects.sort(key=lambda o: o.xyxy[0])
    return Scene("pose", seed, image, objects, background)


# -- documents -----------------------------------------------------------------------------------
def _doc_block(rng, image, kind: str, x: int, y: int, w: int, h: int) -> _Ink:
    "Draw one layout region in the box ``(x, y, w, h)``."
    ink = _Ink(image)
    if kind in ("text", "list"):
        line_h, step = 4, 8
        for k, top in enumerate(range(y, y + h - line_h + 1, step)):
            last = top + step > y + h - line_h
            indent = 8 if kind == "list" else 0
            length = int((w - indent) * (rng.uniform(0.4, 0.8) if last else rng.uniform(0.85, 1.0)))
            if kind == "list":
                ink("ellipse", [x, top, x + 3, top + 3], color=(40, 40, 40))
            ink("rectangle", [x + indent, top, x + indent + length - 1, top + line_h - 1],
                color=(120, 120, 120))
    elif kind == "table":
        rows, cols = int(rng.integers(2, 5)), int(rng.integers(2, 5))
        ink("rectangle", [x, y, x + w - 1, y + (h // rows) - 1], color=(215, 215, 225))
        ink("rectangle", [x, y, x + w - 1, y + h - 1], color=(60, 60, 60), outline=True)
        for k in range(1, rows):
            ink("line", [(x, y + k * h // rows), (x + w - 1, y + k * h // rows)], color=(60, 60, 60))
        for k in range(1, cols):
            ink("line", [(x + k * w // cols, y), (x + k * w // cols, y + h - 1)], color=(60, 60, 60))
    elif kind == "figure":
        ink("rectangle", [x, y, x + w - 1, y + h - 1], color=_jitter(rng, (225, 235, 245), 15))
        bars = int(rng.integers(3, 7))
        for k in range(bars):
            bh = int((h - 6) * rng.uniform(0.2, 0.95))
            bx = x + 3 + k * (w - 6) // bars
            ink("rectangle", [bx, y + h - 3 - bh, bx + max(1, (w - 6) // bars - 3), y + h - 4],
                color=COLORS[str(rng.choice(list(COLORS)))])
    return ink


def _document_scene(rng, seed: int) -> Scene:
    size = _canvas_size(rng, portrait_p=0.75)
    image = Image.new("RGB", size, _jitter(rng, (252, 252, 248), 3))
    m = _margin(size) + 4
    objects, top = [], m
    if rng.random() < 0.85:  # title
        font = _font(int(rng.integers(13, 20)))
        words = " ".join(str(w).capitalize() for w in rng.choice(WORDS, int(rng.integers(1, 3))))
        ink = _Ink(image)
        ink("text", (m, top), words, font=font, color=_jitter(rng, INKS[0], 8))
        xyxy, area = ink.extent()
        objects.append(SceneObject("title", xyxy, area, text=words))
        top = int(xyxy[3]) + 8
    columns = 2 if size[0] > size[1] and rng.random() < 0.6 else 1
    col_w = (size[0] - 2 * m - 8 * (columns - 1)) // columns
    for c in range(columns):
        x, y = m + c * (col_w + 8), top
        while True:
            kind = str(rng.choice(["text", "text", "list", "table", "figure"]))
            h = {"text": 8 * int(rng.integers(2, 6)) - 4, "list": 8 * int(rng.integers(2, 5)) - 4,
                 "table": int(rng.integers(2, 5)) * 10, "figure": int(size[1] * rng.uniform(0.15, 0.3))}[kind]
            if y + h > size[1] - m:
                break
            xyxy, area = _doc_block(rng, image, kind, x, y, col_w, h).extent()
            objects.append(SceneObject(kind, xyxy, area))
            y += h + int(rng.integers(7, 14))
    return Scene("document", seed, image, objects, "white")


_GENERATORS = {"shapes": _shapes_scene, "words": _words_scene, "pose": _pose_scene,
               "document": _document_scene}


def generate_scene(kind: str, seed: int) -> Scene:
    """Generate one scene; the same ``(kind, seed)`` always gives identical bytes.

    Args:
        kind: one of :data:`KINDS`.
        seed: any non-negative integer.

    Returns:
        The :class:`Scene`.

    Raises:
        ValueError: for an unknown kind.
    """
    if kind not in _GENERATORS:
        raise ValueError(f"unknown scene kind {kind!r}; kinds: {', '.join(KINDS)}")
    return _GENERATORS[kind](np.random.default_rng([int(seed), KINDS.index(kind)]), int(seed))


# -- answers in SPHINX's formats -----------------------------------------------------------------
def fmt_box(xyxy, image_wh) -> str:
    "Pixel box -> ``x1,y1,x2,y2`` padded-square fractions, 2 decimals (no brackets)."
    values = np.clip(_TRANSFORM.to_model_xyxy([xyxy], image_wh)[0], 0.0, 1.0)
    return ",".join(f"{v:.2f}" for v in values)


def fmt_point(xy, image_wh) -> str:
    "Pixel point -> ``x,y`` padded-square fractions, 2 decimals (no brackets)."
    values = np.clip(_TRANSFORM.to_model_xy(np.asarray(xy, dtype=np.float64), image_wh), 0.0, 1.0)
    return ",".join(f"{v:.2f}" for v in values)


def _boxes(objects, indices, wh) -> str:
    return "[" + ";".join(fmt_box(objects[i].xyxy, wh) for i in indices) + "]"


def _count_phrase(n: int, singular: str, plural: str) -> str:
    return f"a {singular}" if n == 1 else f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} {plural}"


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x")) else "s")


@lru_cache(maxsize=None)
def _task(name: str):
    from sphinx_tools.registry import get_task

    return get_task(name)


def _qa(task: str, answer: str, targets=(), **options) -> QA:
    "A QA whose question is the task's built-in template (user prompt configs are ignored)."
    t = _task(task)
    question = t.prompt(template=t.templates[options.get("variant", "default")], **options)
    return QA(task, json.loads(json.dumps(options)), question, answer, list(targets))


def _groups(objects, key) -> dict:
    "Object indices grouped by ``key(obj)``, groups in order of first appearance."
    out = {}
    for i, obj in enumerate(objects):
        out.setdefault(key(obj), []).append(i)
    return out


def _class_label(name: str, n: int) -> str:
    "The phrase of ``n`` objects of class ``name`` in a detection answer: circle, circles, people."
    return name if n == 1 else "people" if name == "person" else _plural(name)


def _shapes_qas(scene: Scene, rng) -> list[QA]:
    objs, wh = scene.objects, scene.size
    qas = [_qa("rec", f"[{fmt_box(o.xyxy, wh)}]", [i], expression=str(rng.choice(_expressions(objs, i))))
           for i, o in enumerate(objs)]
    for i in sorted(rng.choice(len(objs), min(3, len(objs)), replace=False)):
        qas.append(_qa("reg", objs[i].expression, [i], region=objs[i].xyxy, image_size=wh))
    by_shape = dict(sorted(_groups(objs, lambda o: o.category).items(), key=lambda kv: SHAPES.index(kv[0])))
    det = " ".join(f"<p>{_class_label(s, len(ix))}</p> {_boxes(objs, ix, wh)}"
                   for s, ix in by_shape.items())
    qas.append(_qa("detection", det, [i for ix in by_shape.values() for i in ix]))
    shape = str(rng.choice(list(by_shape)))
    ix = by_shape[shape]
    qas.append(_qa("detection", f"<p>{_class_label(shape, len(ix))}</p> {_boxes(objs, ix, wh)}", ix,
                   classes=[shape]))
    absent = [s for s in SHAPES if s not in by_shape]
    if absent and rng.random() < 0.3:
        s = str(rng.choice(absent))
        qas.append(_qa("detection", f"There are no {_plural(s)} in the image.", [], classes=[s]))
    qas += _caption_qas(scene, rng) + _relation_qas(scene, rng) + _vqa_qas(scene, rng)
    return qas


def _caption_qas(scene: Scene, rng) -> list[QA]:
    "Short caption and grounded caption of a shapes scene."
    objs, wh = scene.objects, scene.size
    groups = _groups(objs, lambda o: (o.color, o.category))
    phrases = [_count_phrase(len(ix), f"{c} {s}", f"{c} {_plural(s)}") for (c, s), ix in groups.items()]
    tail = f" on a {scene.background} background."
    grounded = [f"<p>{p}</p>{_boxes(objs, ix, wh)}" for p, ix in zip(phrases, groups.values())]
    grounded[0] = grounded[0][:3] + grounded[0][3].upper() + grounded[0][4:]
    phrases[0] = phrases[0][0].upper() + phrases[0][1:]
    return [_qa("caption", _join(phrases) + tail),
            _qa("grounded_caption", _join(grounded) + tail, [i for ix in groups.values() for i in ix])]


def _join(items) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _relation_qas(scene: Scene, rng) -> list[QA]:
    "Relation grounding (default variant) for up to 2 relations, and one triplets answer."
    objs, wh = scene.objects, scene.size
    if not scene.relations:
        return []

    def triple(s, p, o):
        return f"<p>{objs[s].expression}</p> [{fmt_box(objs[s].xyxy, wh)}] {p} <p>{objs[o].expression}</p> " \
               f"[{fmt_box(objs[o].xyxy, wh)}]"

    qas = []
    for k in rng.choice(len(scene.relations), min(2, len(scene.relations)), replace=False):
        s, p, o = scene.relations[k]
        qas.append(_qa("relation", triple(s, p, o), [s, o],
                       expression=f"{objs[s].expression} {p} {objs[o].expression}"))
    used, chosen = set(), []
    for s, p, o in scene.relations:  # disjoint pairs, so no object is repeated in one answer
        if s not in used and o not in used and s < o:
            used |= {s, o}
            chosen.append((s, p, o))
    qas.append(_qa("relation", ". ".join(triple(*t) for t in chosen) + ".",
                   [i for s, _, o in chosen for i in (s, o)], variant="triplets"))
    return qas


def _vqa_qas(scene: Scene, rng) -> list[QA]:
    "Counting, colour and existence questions with short answers."
    objs = scene.objects
    shape = str(rng.choice(SHAPES))
    count = sum(o.category == shape for o in objs)
    qas = [_qa("vqa", str(count), question=f"How many {_plural(shape)} are there?")]
    unique = [o for o in objs if sum(p.category == o.category for p in objs) == 1]
    if unique:
        obj = unique[int(rng.integers(len(unique)))]
        qas.append(_qa("vqa", obj.color.capitalize(), question=f"What color is the {obj.category}?"))
    color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
    present = any((o.color, o.category) == (color, shape) for o in objs)
    qas.append(_qa("vqa", "Yes" if present else "No", question=f"Is there a {color} {shape}?"))
    return qas


def _words_qas(scene: Scene, rng) -> list[QA]:
    objs, wh = scene.objects, scene.size
    spotting = " ".join(f"<p>{o.text}</p> [{fmt_box(o.xyxy, wh)}]" for o in objs)
    return [_qa("ocr", spotting, range(len(objs))),
            _qa("ocr", " ".join(o.text for o in objs), variant="read")]


def _pose_qas(scene: Scene, rng) -> list[QA]:
    objs, wh = scene.objects, scene.size
    persons = f"<p>{_class_label('person', len(objs))}</p> {_boxes(objs, range(len(objs)), wh)}"
    qas = [_qa("detection", persons, range(len(objs))),  # "all objects", as the label job asks
           _qa("detection", persons, range(len(objs)), classes=["person"])]
    for i, obj in enumerate(objs):
        points = " ".join(f"<p>{name}</p> [{fmt_point(xy, wh)}]"
                          for name, xy in zip(KEYPOINT_NAMES, obj.keypoints[:, :2]))
        qas.append(_qa("pose", points, [i], box=obj.xyxy, image_size=wh))
    n = len(objs)
    qas.append(_qa("caption", f"{_count_phrase(n, 'stick figure', 'stick figures').capitalize()} of "
                              f"{'a person' if n == 1 else 'people'} on a {scene.background} background."))
    qas.append(_qa("vqa", str(n), question="How many people are there?"))
    return qas


def _document_qas(scene: Scene, rng) -> list[QA]:
    objs, wh = scene.objects, scene.size
    groups = _groups(objs, lambda o: o.category)
    order = [c for c in LAYOUT_CLASSES if c in groups]
    layout = " ".join(f"<p>{c}</p> {_boxes(objs, groups[c], wh)}" for c in order)
    names = {"title": ("title", "titles"), "text": ("paragraph", "paragraphs"), "list": ("list", "lists"),
             "table": ("table", "tables"), "figure": ("figure", "figures")}
    parts = [_count_phrase(len(groups[c]), *names[c]) for c in order]
    qas = [_qa("layout", layout, [i for c in order for i in groups[c]],
               **TRAINED_TASK_OPTIONS["layout"])] if order else []
    caption = f"A document page with {_join(parts)}." if parts else "An empty document page."
    qas.append(_qa("caption", caption))
    return qas


def _class_list_qas(scene: Scene, rng) -> list[QA]:
    """Detection questions that name several classes, as a labeling job given a category file
    asks them (``label --categories``): every category of the synthetic datasets in their order;
    and, half of the time, a few classes in a random order, some of them absent. The answer lists
    the classes present, in the order asked."""
    objs, wh = scene.objects, scene.size
    groups = _groups(objs, lambda o: o.category)

    def qa(classes):
        shown = [c for c in classes if c in groups]
        answer = " ".join(f"<p>{_class_label(c, len(groups[c]))}</p> {_boxes(objs, groups[c], wh)}"
                          for c in shown)
        return _qa("detection", answer, [i for c in shown for i in groups[c]], classes=list(classes))

    qas = [qa(CATEGORY_NAMES)]
    if rng.random() < 0.5:
        present = list(groups)
        absent = [c for c in CATEGORY_NAMES if c not in groups]
        chosen = list(rng.choice(present, int(rng.integers(1, len(present) + 1)), replace=False))
        chosen += list(rng.choice(absent, int(rng.integers(1, 4)), replace=False))
        qas.append(qa([str(c) for c in rng.permutation(chosen)]))
    return qas


_QAS = {"shapes": _shapes_qas, "words": _words_qas, "pose": _pose_qas, "document": _document_qas}
CLASS_LIST_KINDS = ("shapes", "pose")  # the kinds a labeling job asks detection of


def scene_qas(scene: Scene, class_lists: bool = False) -> list[QA]:
    """Every question about ``scene`` with its SPHINX-format answer (deterministic per scene).

    Args:
        scene: a scene from :func:`generate_scene`.
        class_lists: also the detection questions that name several classes
            (:data:`CLASS_LIST_KINDS` only); the other questions do not change.

    Returns:
        :class:`QA` items: task name, options, question, answer, referenced objects.
    """
    kind = KINDS.index(scene.kind)
    qas = _QAS[scene.kind](scene, np.random.default_rng([scene.seed, kind, 1]))
    if class_lists and scene.kind in CLASS_LIST_KINDS:
        qas += _class_list_qas(scene, np.random.default_rng([scene.seed, kind, 2]))
    return qas


def make_conversations(scene: Scene, image_path: str = "", turns: int = 1,
                       class_lists: bool = False) -> list[dict]:
    """The scene's questions as LLaMA2-Accessory conversation records.

    Args:
        scene: a scene from :func:`generate_scene`.
        image_path: the value of each record's ``"image"``.
        turns: questions per record (1: single-turn records, as asked at inference).
        class_lists: also the detection questions that name several classes (:func:`scene_qas`).

    Returns:
        ``[{"image": path, "conversations": [{"from": "human", "value": q}, {"from": "gpt",
        "value": a}, ...], "tasks": [...], "options": [...]}]``; ``tasks``/``options`` name the
        built-in task and options of each turn (parse the answer with the same options).
    """
    return _records(scene_qas(scene, class_lists), image_path, turns)


def _records(qas, image_path: str, turns: int) -> list[dict]:
    records = []
    for start in range(0, len(qas), max(1, turns)):
        chunk = qas[start:start + max(1, turns)]
        conversations = [turn for qa in chunk for turn in
                         ({"from": "human", "value": qa.question}, {"from": "gpt", "value": qa.answer})]
        records.append({"image": image_path, "conversations": conversations,
                        "tasks": [qa.task for qa in chunk], "options": [qa.options for qa in chunk]})
    return records


# -- dataset files -------------------------------------------------------------------------------
def scene_seed(seed: int, index: int) -> int:
    "The seed of scene ``index`` of a dataset generated with ``seed``."
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def coco_annotations(scene: Scene, image_id: int, first_id: int) -> list[dict]:
    "COCO annotation dicts for the scene's objects (ids from ``first_id``)."
    out = []
    for k, obj in enumerate(scene.objects):
        extra = {}
        if obj.polygon is not None:
            extra["segmentation"] = [obj.polygon]
        if obj.color is not None:
            extra["color"] = obj.color
        if obj.text is not None:
            extra["text"] = obj.text
        if obj.keypoints is not None:
            extra["keypoints"] = [round(float(v), 2) for v in obj.keypoints.ravel()]
            extra["num_keypoints"] = int((obj.keypoints[:, 2] > 0).sum())
        out.append(coco_annotation(first_id + k, image_id, CATEGORY_ID[obj.category], obj.xyxy,
                                   area=float(obj.area), **extra))
    return out


def _render(args) -> tuple:
    "Worker: generate scene ``index``, save its PNG, return its annotations (picklable)."
    out_dir, index, seed, kind, turns, tasks, class_lists = args
    scene = generate_scene(kind, scene_seed(seed, index))
    name = f"{index:06d}.png"
    scene.image.save(Path(out_dir) / "images" / name, format="PNG", optimize=False)
    qas = scene_qas(scene, class_lists)
    records = _records([q for q in qas if tasks is None or q.task in tasks], f"images/{name}", turns)
    annotations = coco_annotations(scene, index + 1, 0)
    (w, h), rec = scene.size, []
    for k, qa in enumerate(q for q in qas if q.task == "rec"):
        rec.append({"question_id": f"{index:06d}_{k}_height{h}_width{w}", "image": f"images/{name}",
                    "question": qa.options["expression"], "width": w, "height": h,
                    "answer": list(scene.objects[qa.targets[0]].xyxy)})
    image = {"id": index + 1, "file_name": name, "width": scene.size[0], "height": scene.size[1],
             "kind": kind, "seed": scene.seed}
    return image, annotations, records, rec, scene.relations


def write_dataset(out_dir, n: int, seed: int = 0, kinds=KINDS, workers: int = 1, turns: int = 1,
                  absolute_paths: bool = False, progress: bool = True, tasks=None,
                  class_lists: bool = False) -> dict:
    """Generate ``n`` scenes (kinds in turn) and write images and ground truth.

    Files: ``images/NNNNNN.png``; ``conversations.json`` (LLaMA2-Accessory records, image paths
    relative to ``out_dir`` unless ``absolute_paths``); ``coco.json`` (COCO ground truth: boxes
    xywh, area, iscrowd, shape polygons and ``color``, person keypoints, word ``text``; the
    top-level ``relations`` list ``{image_id, subject_id, predicate, object_id}`` by annotation id);
    ``rec.json`` (RefCOCO-style: ``question``, pixel xyxy ``answer``, ``width``/``height``, and
    ``question_id`` ending in ``height{H}_width{W}`` as the official scorer reads it).

    Args:
        out_dir: output folder (created).
        n: number of scenes.
        seed: dataset seed; scene ``i`` uses :func:`scene_seed` ``(seed, i)``.
        kinds: scene kinds, used round-robin.
        workers: processes to render with (1: in this process); the output does not depend on it.
        turns: questions per conversation record (see :func:`make_conversations`).
        absolute_paths: write absolute image paths into ``conversations.json``.
        progress: show a tqdm progress bar.
        tasks: only these tasks' questions in ``conversations.json`` (``None``: every task); the
            ground truth files are the same.
        class_lists: also the detection questions that name several classes, as
            ``label --categories`` asks them (:func:`scene_qas`).

    Returns:
        ``{"images", "conversations", "annotations", "rec"}`` counts.

    Raises:
        ValueError: for an unknown kind or a negative ``n``.
    """
    from tqdm import tqdm

    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds or n < 0:
        raise ValueError(f"need n >= 0 and kinds from {', '.join(KINDS)}; got n={n}, kinds={kinds!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    tasks = None if tasks is None else tuple(tasks)
    jobs = [(str(out), i, int(seed), kinds[i % len(kinds)], turns, tasks, class_lists) for i in range(n)]
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = list(tqdm(pool.imap(_render, jobs, chunksize=8), total=n, disable=not progress,
                                desc="synth"))
    else:
        results = [_render(job) for job in tqdm(jobs, disable=not progress, desc="synth")]
    images, annotations, conversations, rec, relations = [], [], [], [], []
    for image, anns, records, rec_items, rels in results:
        images.append(image)
        first = len(annotations) + 1  # relations name the annotation ids of subject and object
        relations += [{"image_id": image["id"], "subject_id": first + s, "predicate": p,
                       "object_id": first + o} for s, p, o in rels]
        for ann in anns:
            annotations.append({**ann, "id": len(annotations) + 1})
        prefix = str(out.resolve()) + "/" if absolute_paths else ""
        conversations += [{**r, "image": prefix + r["image"]} for r in records]
        rec += rec_items
    coco = {"info": {"description": "sphinx-tools synthetic scenes", "seed": int(seed), "kinds": list(kinds)},
            "images": images, "annotations": annotations, "categories": CATEGORIES, "relations": relations}
    for name, data in (("conversations.json", conversations), ("coco.json", coco), ("rec.json", rec)):
        write_json(out / name, data)
    return {"images": len(images), "conversations": len(conversations), "annotations": len(annotations),
            "rec": len(rec)}


@click.command(name="synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--n", "n", default=1000, show_default=True, type=click.IntRange(0), help="number of scenes")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--kinds", default=",".join(KINDS), show_default=True,
              help=f"comma-separated scene kinds, from {', '.join(KINDS)}")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="rendering processes")
@click.option("--turns", default=1, show_default=True, type=click.IntRange(1),
              help="questions per conversation record")
@click.option("--absolute-paths", is_flag=True, help="absolute image paths in conversations.json")
@click.option("--class-lists", is_flag=True,
              help="also detection questions that name several classes (as label --categories asks)")
def synth_command(out, n, seed, kinds, workers, turns, absolute_paths, class_lists):
    "Write a deterministic synthetic dataset: images, conversations, COCO and REC ground truth."
    names = [k.strip() for k in kinds.split(",") if k.strip()]
    bad = [k for k in names if k not in KINDS]
    if bad or not names:
        raise click.BadParameter(f"unknown kind(s) {', '.join(bad) or '(none)'}; kinds: {', '.join(KINDS)}",
                                 param_hint="--kinds")
    counts = write_dataset(out, n, seed, names, workers=workers, turns=turns, absolute_paths=absolute_paths,
                           class_lists=class_lists)
    click.echo(f"wrote {counts['images']} images, {counts['conversations']} conversations, "
               f"{counts['annotations']} COCO annotations and {counts['rec']} REC items to {out}")
