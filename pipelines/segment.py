"""SPHINX + Segment Anything: task boxes -> SAM box prompts -> ``Detections.mask``.

Two levels:

- :func:`segment_detections` fills the masks of already-parsed ``sv.Detections`` with a
  ``SamPredictor``: every box of an image goes to SAM in one batched ``predict_torch`` call, and
  the image embedding is computed once per image and reused while the same image comes back.
- :class:`SphinxSamPipeline` asks SPHINX a task first (detection, rec, ocr, layout, reg,
  grounded_caption, relation, pose) and segments what it found.

Weights are loaded by the caller; :func:`load_sam` is a thin, checked wrapper around
``segment_anything.sam_model_registry`` that reads the weights with ``weights_only=True``::

    sphinx = SphinxModel.from_pretrained("/ckpt/sphinx-1k")
    sam = load_sam("/ckpt/sam_vit_h_4b8939.pth", device="cuda")
    out = SphinxSamPipeline(sphinx, sam)(image, "detection", classes=["dog", "ball"])
    out.detections[0].mask  # (n, H, W) bool
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import supervision as sv
import torch

from sphinx_tools.annotations import CLASS_NAME_FIELD, GroundedCaption, SceneGraph
from sphinx_tools.errors import CheckpointError
from sphinx_tools.registry import get_task
from sphinx_tools.run import run_task
from sphinx_tools.tasks import Task, image_size_of

MASK_SCORE_FIELD = "mask_score"  # (n,) SAM's predicted IoU of the chosen mask
PROMPT_BOX_FIELD = "prompt_box"  # (n, 4) the box given to SAM (kept when boxes are tightened)
SOURCE_INDEX_FIELD = "source_index"  # (n,) row of the task result each mask belongs to
BOX_TOLERANCE_PX = 1.0  # parsed boxes are clipped to the image; more than this means another image
SEGMENTABLE = (sv.Detections, sv.KeyPoints, GroundedCaption, SceneGraph)
_IMAGE_KEY = "_sphinx_tools_image_key"  # attribute set on the predictor: which image is embedded


# -- loading ---------------------------------------------------------------------------------------
def load_sam(checkpoint, model_type: str = "vit_h", device="cpu"):
    """Build a ``SamPredictor`` from a local SAM checkpoint (never downloads).

    The checkpoint is read with ``torch.load(weights_only=True)``: tensors only, so a planted file
    cannot run code. The model is built without a checkpoint and gets the state dict afterwards
    (``segment_anything``'s own builders would unpickle the file with torch's defaults).

    Args:
        checkpoint: path of the ``.pth`` file (e.g. ``sam_vit_h_4b8939.pth``).
        model_type: a key of ``segment_anything.sam_model_registry`` (``vit_h``, ``vit_l``,
            ``vit_b``); it must match the checkpoint.
        device: where the model goes (``"cpu"``, ``"cuda"``, ...).

    Returns:
        ``segment_anything.SamPredictor`` on ``device``, in eval mode.

    Raises:
        FileNotFoundError: if ``checkpoint`` is not a file.
        ValueError: if ``model_type`` is unknown.
        CheckpointError: if the file holds anything but a state dict of tensors, cannot be read,
            or does not fit ``model_type``.
    """
    from segment_anything import SamPredictor, sam_model_registry

    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint {str(checkpoint)!r} does not exist")
    if model_type not in sam_model_registry:
        raise ValueError(
            f"unknown SAM `model_type` {model_type!r}; expected one of "
            f"{', '.join(sorted(sam_model_registry))}"
        )
    state = read_sam_state(path)
    sam = sam_model_registry[model_type]()  # no checkpoint: random weights, replaced below
    want = sam.state_dict()
    problems = []
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(t.shape)})" for k, t in want.items()
             if k in state and state[k].shape != t.shape]
    for what, names in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("wrong shapes", wrong)):
        if names:
            problems.append(f"{what} ({len(names)}): {', '.join(names[:5])}")
    if problems:
        raise CheckpointError(
            f"SAM checkpoint {path} does not fit model_type {model_type!r}: {'; '.join(problems)}"
        )
    sam.load_state_dict(state)
    return SamPredictor(sam.to(device).eval())


def read_sam_state(path: Path) -> dict:
    "A SAM checkpoint's state dict, read with ``weights_only=True``; errors name the file."
    import pickle
    import zipfile

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"SAM checkpoint {path} holds something other than tensors (refused by weights-only "
            f"loading): {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read SAM checkpoint {path} (corrupt or truncated?): {e}"
        ) from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in state.items()):
        raise CheckpointError(f"SAM checkpoint {path} is not a state dict of tensors")
    return state


# -- images ----------------------------------------------------------------------------------------
def as_rgb_array(image) -> np.ndarray:
    """A PIL image or an array -> HWC uint8 RGB array (what ``SamPredictor.set_image`` expects).

    Args:
        image: PIL image (any mode), or array of shape (H, W, 3) / (H, W) with dtype uint8.

    Raises:
        ValueError: naming the type, shape or dtype that is not an image.
    """
    if hasattr(image, "convert") and not isinstance(image, np.ndarray):
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected a PIL image or an HWC uint8 array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 in [0, 255], got dtype {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"image arrays must have shape (H, W, 3), got {image.shape}")
    return image


def image_key(array: np.ndarray) -> tuple:
    "Identity of an image's pixels: ``(shape, blake2b digest)``."
    return array.shape, hashlib.blake2b(np.ascontiguousarray(array).data, digest_size=16).digest()


def set_image_once(sam_predictor, array: np.ndarray) -> bool:
    """Run SAM's image encoder on ``array`` unless the predictor already holds its embedding.

    The embedding is reused only if the pixels match and nobody called ``set_image`` since (the
    predictor's ``features`` tensor is the one this function saw).

    Returns:
        ``True`` if the encoder ran.
    """
    key = image_key(array)
    held = getattr(sam_predictor, _IMAGE_KEY, None)
    if sam_predictor.is_image_set and held == (key, id(sam_predictor.features)):
        return False
    sam_predictor.set_image(array, image_format="RGB")
    setattr(sam_predictor, _IMAGE_KEY, (key, id(sam_predictor.features)))
    return True


# -- masks from detections -------------------------------------------------------------------------
def check_prompts(detections, image_wh, point_coords=None, point_labels=None) -> None:
    """Validate the boxes and optional points that go to SAM.

    Raises:
        ValueError: naming the bad value: not ``sv.Detections``, a box outside the image (the
            detections were parsed for an image of another size), or points of the wrong shape.
    """
    if not isinstance(detections, sv.Detections):
        raise ValueError(f"`detections` must be sv.Detections, got {type(detections).__name__}")
    w, h = image_wh
    xyxy = detections.xyxy
    outside = (xyxy < -BOX_TOLERANCE_PX).any(axis=1) | (
        xyxy > np.array([w, h, w, h]) + BOX_TOLERANCE_PX
    ).any(axis=1)
    if outside.any():
        box = np.round(xyxy[np.flatnonzero(outside)[0]], 1).tolist()
        raise ValueError(
            f"box {box} lies outside the image of size (width, height) = {(w, h)}; "
            "were the detections parsed for an image of another size?"
        )
    if (point_coords is None) != (point_labels is None):
        raise ValueError("give both `point_coords` and `point_labels`, or neither")
    if point_coords is None:
        return
    n = len(detections)
    coords, labels = np.asarray(point_coords), np.asarray(point_labels)
    if coords.ndim != 3 or coords.shape[0] != n or coords.shape[2] != 2:
        raise ValueError(f"`point_coords` must have shape ({n}, k, 2), got {coords.shape}")
    if labels.shape != coords.shape[:2]:
        raise ValueError(f"`point_labels` must have shape {coords.shape[:2]}, got {labels.shape}")


def segment_detections(
    sam_predictor,
    image,
    detections: sv.Detections,
    *,
    multimask: bool = True,
    tighten_boxes: bool = False,
    min_area: int = 0,
    point_coords=None,
    point_labels=None,
    batch_size: int | None = None,
) -> sv.Detections:
    """Fill ``detections.mask`` with SAM masks prompted by the boxes (and optional points).

    Args:
        sam_predictor: a ``segment_anything.SamPredictor`` (any device and dtype).
        image: the image the detections were parsed for: PIL image or HWC uint8 RGB array.
        detections: n rows with ``xyxy`` (n, 4) pixel ``[x1, y1, x2, y2]`` boxes.
        multimask: ask SAM for 3 masks per prompt and keep the one with the best predicted IoU;
            ``False`` asks for one mask.
        tighten_boxes: replace each box by the extent of its mask (the SAM prompt box is kept in
            ``data["prompt_box"]``); a row whose mask is empty keeps its box.
        min_area: drop rows whose mask has fewer pixels than this (0 keeps every row).
        point_coords: optional (n, k, 2) pixel ``[x, y]`` points per row, added to the box prompt.
        point_labels: (n, k) labels for the points: 1 foreground, 0 background, -1 padding.
        batch_size: prompts per ``predict_torch`` call; ``None`` sends all boxes in one call.

    Returns:
        A new ``sv.Detections``: ``mask`` (m, H, W) bool, ``data["mask_score"]`` (m,) float,
        ``data["source_index"]`` (m,) int row of ``detections``, with m <= n (``min_area``).
        Metadata is kept. An empty input returns an empty result without calling SAM.

    Raises:
        ValueError: for a box outside the image (wrong image size), bad points or options.
    """
    array = as_rgb_array(image)
    h, w = array.shape[:2]
    check_prompts(detections, (w, h), point_coords, point_labels)
    if min_area < 0:
        raise ValueError(f"`min_area` must be >= 0 pixels, got {min_area!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1 or None, got {batch_size!r}")
    n = len(detections)
    if n == 0:
        return _with_masks(detections, np.zeros((0, h, w), bool), np.zeros(0), tighten_boxes)
    set_image_once(sam_predictor, array)
    step = batch_size or n
    masks, scores = [], []
    for start in range(0, n, step):
        rows = slice(start, start + step)
        m, s = _predict(
            sam_predictor,
            detections.xyxy[rows],
            None if point_coords is None else np.asarray(point_coords)[rows],
            None if point_labels is None else np.asarray(point_labels)[rows],
            multimask,
        )
        masks.append(m)
        scores.append(s)
    result = _with_masks(detections, np.concatenate(masks), np.concatenate(scores), tighten_boxes)
    return result[result.mask.sum(axis=(1, 2)) >= min_area] if min_area else result


def _predict(sam_predictor, xyxy, coords, labels, multimask):
    "One ``predict_torch`` call -> masks (b, H, W) bool and scores (b,) float, on the CPU."
    device, size = sam_predictor.device, sam_predictor.original_size
    boxes = torch.as_tensor(xyxy, dtype=torch.float32, device=device)
    boxes = sam_predictor.transform.apply_boxes_torch(boxes, size)  # (b, 4) in SAM's input frame
    if coords is not None:
        coords = torch.as_tensor(coords, dtype=torch.float32, device=device)
        coords = sam_predictor.transform.apply_coords_torch(coords, size)  # (b, k, 2)
        labels = torch.as_tensor(labels, dtype=torch.int64, device=device)  # (b, k)
    with torch.inference_mode():
        masks, iou, _ = sam_predictor.predict_torch(
            coords, labels, boxes=boxes, multimask_output=multimask
        )  # masks (b, c, H, W) bool, iou (b, c)
    best = iou.argmax(dim=1)  # (b,)
    rows = torch.arange(len(best), device=best.device)
    return masks[rows, best].cpu().numpy(), iou[rows, best].float().cpu().numpy()


def _with_masks(detections, masks, scores, tighten_boxes) -> sv.Detections:
    "A copy of ``detections`` with masks (n, H, W), scores, source rows and optionally new boxes."
    out = sv.Detections(
        xyxy=detections.xyxy.astype(np.float64, copy=True),
        mask=masks.astype(bool),
        confidence=detections.confidence,
        class_id=detections.class_id,
        tracker_id=detections.tracker_id,
        data={
            **detections.data,
            MASK_SCORE_FIELD: scores.astype(np.float32),
            SOURCE_INDEX_FIELD: np.arange(len(masks)),
        },
        metadata=dict(detections.metadata),
    )
    if tighten_boxes:
        out.data[PROMPT_BOX_FIELD] = detections.xyxy.copy()
        filled = masks.reshape(len(masks), -1).any(axis=1)
        if filled.any():
            out.xyxy[filled] = sv.mask_to_xyxy(masks[filled]).astype(np.float64)
            out.xyxy[filled, 2:] += 1  # mask_to_xyxy gives the last pixel; boxes end after it
    return out


# -- task results -> prompts -----------------------------------------------------------------------
def keypoint_prompts(key_points: sv.KeyPoints, image_wh, margin: float = 0.1):
    """Boxes and point prompts for the people of a pose result.

    Each person's box is the extent of its visible key points, grown by ``margin`` of its size
    and kept inside the box the pose was asked for (``data["person_box"]``) and the image.

    Args:
        key_points: n people, ``xy`` (n, 17, 2) pixels and ``visible`` (n, 17).
        image_wh: ``(width, height)``.
        margin: growth of the key-point extent, as a fraction of its width / height.

    Returns:
        ``(detections, point_coords (n, 17, 2), point_labels (n, 17))``; labels are 1 for visible
        points and -1 (ignored by SAM) for the others.
    """
    w, h = image_wh
    n = len(key_points)
    xy = np.asarray(key_points.xy, dtype=np.float64)  # (n, k, 2)
    visible = (
        np.ones(xy.shape[:2], bool)
        if key_points.visible is None
        else np.asarray(key_points.visible, bool)
    )
    limits = np.asarray(key_points.data.get("person_box", np.tile([0, 0, w, h], (n, 1))), float)
    boxes = np.zeros((n, 4))
    for i in range(n):
        pts = xy[i][visible[i]] if visible[i].any() else limits[i].reshape(2, 2)
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        pad = np.maximum((hi - lo) * margin, 2.0)
        box = np.concatenate([lo - pad, hi + pad])
        box[:2] = np.maximum(box[:2], np.maximum(limits[i, :2], 0))
        box[2:] = np.minimum(box[2:], np.minimum(limits[i, 2:], [w, h]))
        boxes[i] = box
    data = {CLASS_NAME_FIELD: np.asarray(key_points.data.get(CLASS_NAME_FIELD, ["person"] * n))}
    detections = sv.Detections(
        xyxy=boxes,
        confidence=key_points.detection_confidence,
        class_id=key_points.class_id,
        data=data,
    )
    return detections, xy, np.where(visible, 1, -1)


def result_prompts(result, image_wh, point_prompts: bool = True):
    """The SAM prompts for one task result.

    Args:
        result: ``sv.Detections``, ``GroundedCaption``/``SceneGraph`` (their ``detections``) or
            ``sv.KeyPoints`` (see :func:`keypoint_prompts`).
        image_wh: ``(width, height)``.
        point_prompts: for key points, also prompt with the visible points.

    Returns:
        ``(detections, point_coords or None, point_labels or None)``.
    """
    if isinstance(result, sv.KeyPoints):
        detections, coords, labels = keypoint_prompts(result, image_wh)
        return (detections, coords, labels) if point_prompts else (detections, None, None)
    if isinstance(result, (GroundedCaption, SceneGraph)):
        return result.detections, None, None
    return result, None, None


# -- pipeline --------------------------------------------------------------------------------------
@dataclass
class SphinxSamOutput:
    """Output of :class:`SphinxSamPipeline`, one entry per image.

    Attributes:
        detections: ``sv.Detections`` with ``mask`` (n, H, W) bool in each image's pixels,
            ``data["mask_score"]`` and ``data["source_index"]`` (row of the task result's
            detections, or person index for pose).
        results: SPHINX's parsed task results (``sv.Detections``, ``sv.KeyPoints``,
            ``GroundedCaption`` or ``SceneGraph``), before segmentation.
    """

    detections: list[sv.Detections]
    results: list[Any] = field(default_factory=list)


class SphinxSamPipeline:
    """Image + task -> SPHINX answer -> parsed boxes -> SAM masks.

    Args:
        sphinx: a model with ``generate(prompts, images, ...)`` (``sphinx_tools.SphinxModel``).
        sam_predictor: a ``segment_anything.SamPredictor`` (see :func:`load_sam`).

    Example:
        >>> pipe = SphinxSamPipeline(sphinx, load_sam("sam_vit_h.pth"))  # doctest: +SKIP
        >>> out = pipe(image, "rec", expression="the red car", tighten_boxes=True)  # doctest: +SKIP
        >>> out.detections[0].mask.shape  # (1, H, W)  # doctest: +SKIP
    """

    def __init__(self, sphinx, sam_predictor):
        self.sphinx = sphinx
        self.sam_predictor = sam_predictor

    def check_inputs(self, images, task, min_area, task_options) -> Task:
        """Validate the call before anything runs; returns the task object.

        Raises:
            ValueError: for a task whose result has no boxes (``caption``, ``vqa``), bad options,
                an empty image list or a value that is not an image.
            sphinx_tools.UnknownTaskError: for a task name nobody registered.
        """
        task = get_task(task) if isinstance(task, str) else task
        if not isinstance(task, Task):
            raise ValueError(f"`task` must be a task name or a Task, got {task!r}")
        if not issubclass(task.output, SEGMENTABLE):
            raise ValueError(
                f"task {task.name!r} returns {task.output.__name__}, which has no boxes to "
                "segment; use a grounded task (detection, rec, ocr, layout, reg, "
                "grounded_caption, relation, pose)"
            )
        task.options(**task_options)
        if not images:
            raise ValueError("`image` must be an image or a non-empty list of images, got []")
        for image in images:
            as_rgb_array(image)
        if min_area < 0:
            raise ValueError(f"`min_area` must be >= 0 pixels, got {min_area!r}")
        return task

    def __call__(
        self,
        image,
        task,
        *,
        multimask: bool = True,
        tighten_boxes: bool = False,
        min_area: int = 0,
        point_prompts: bool = True,
        batch_size: int | None = None,
        sphinx_kwargs: dict | None = None,
        **task_options,
    ) -> SphinxSamOutput:
        """Ask SPHINX ``task`` about each image and segment every object it found.

        Args:
            image: one image or a list (PIL images or HWC uint8 RGB arrays; any sizes).
            task: a task name or ``Task`` whose result has boxes (or key points, for ``pose``).
            multimask: see :func:`segment_detections`.
            tighten_boxes: see :func:`segment_detections`.
            min_area: see :func:`segment_detections`.
            point_prompts: ``pose`` only: also prompt SAM with each person's visible key points.
            batch_size: see :func:`segment_detections`.
            sphinx_kwargs: generation arguments for ``run_task`` (``max_gen_len``,
                ``temperature``, ``top_p``, ``sampling``).
            **task_options: the task's options (``classes=...``, ``expression=...``). For
                ``pose`` without ``box``/``boxes``, people are found with ``detection`` first.

        Returns:
            :class:`SphinxSamOutput` with one entry per image.
        """
        # 1. Check inputs
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        task = self.check_inputs(images, task, min_area, task_options)
        detections, results = [], []
        for img in images:
            # 2. Ask SPHINX and parse its answer
            result = self.ask(img, task, sphinx_kwargs or {}, task_options)
            # 3. Boxes (and key points) -> SAM prompts
            prompts, coords, labels = result_prompts(result, image_size_of(img), point_prompts)
            # 4. Prompt SAM: one image embedding, one batched call for all boxes
            detections.append(
                segment_detections(
                    self.sam_predictor,
                    img,
                    prompts,
                    multimask=multimask,
                    tighten_boxes=tighten_boxes,
                    min_area=min_area,
                    point_coords=coords,
                    point_labels=labels,
                    batch_size=batch_size,
                )
            )
            results.append(result)
        # 5. Output
        return SphinxSamOutput(detections=detections, results=results)

    def ask(self, image, task: Task, sphinx_kwargs: dict, task_options: dict):
        "One task result for one image; ``pose`` without boxes asks ``detection`` for people."
        if task.name == "pose" and "box" not in task_options and "boxes" not in task_options:
            found = run_task(self.sphinx, image, "detection", classes=["person"], **sphinx_kwargs)
            people = found.xyxy[found.data[CLASS_NAME_FIELD] == "person"]
            task_options = {**task_options, "boxes": people.tolist()}
        return run_task(self.sphinx, image, task, **sphinx_kwargs, **task_options)


SphinxSam = SphinxSamPipeline
