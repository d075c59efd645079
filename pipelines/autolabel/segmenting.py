"""SAM masks for the boxes of box-carrying results, as COCO compressed RLE
(``sphinx_tools.coco.encode_rle``).

Drives a ``segment_anything.SamPredictor`` the way ``sphinx_tools.pipelines.segment`` does (box
prompts, three candidate masks each, the one with the best predicted IoU kept), on an image that
may be held smaller than the original: the embedding is computed from that image and the masks
are made at the original size, as SAM itself makes them from its own smaller input.
"""

from __future__ import annotations

import numpy as np

from sphinx_tools.coco import encode_rle

MASK_BUDGET_PX = 1 << 24  # pixels of masks made per SAM call (boxes x height x width)


def masks_for_boxes(predictor, image, boxes: dict, size=None) -> dict:
    """Segment every box of every task on one image.

    Args:
        predictor: a ``segment_anything.SamPredictor``.
        image: the RGB PIL image SAM is given: the original, or a smaller copy of it (exact when
            it is what SAM's ``transform.apply_image`` makes of the original).
        boxes: ``{task: (n, 4) pixel xyxy}`` in pixels of the original image.
        size: ``(width, height)`` of the original image (``None``: ``image.size``).

    Returns:
        ``{"type": "masks", "masks": {task: [RLE dict | None, ...]}}``, aligned with ``boxes``;
        each mask has the original size.
    """
    out = {}
    array = np.asarray(image.convert("RGB"))
    w, h = (array.shape[1], array.shape[0]) if size is None else (int(size[0]), int(size[1]))
    is_set = False
    step = max(1, MASK_BUDGET_PX // (w * h))  # boxes per call: bounds the masks held at once
    for task, xyxy in boxes.items():
        xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4).clip(0, [w, h, w, h])
        if not is_set and len(xyxy):
            _set_image(predictor, array, (h, w))
            is_set = True
        out[task] = []
        for start in range(0, len(xyxy), step):
            masks = _predict(predictor, xyxy[start: start + step])
            out[task] += [encode_rle(m) if m.any() else None for m in masks]
    return {"type": "masks", "masks": out}


def _set_image(predictor, array: np.ndarray, original_hw) -> None:
    "Embed ``array`` (the image, or a smaller copy) for masks of size ``original_hw``."
    import torch

    if getattr(predictor.model, "image_format", "RGB") != "RGB":
        array = array[..., ::-1]
    resized = predictor.transform.apply_image(array)  # a copy when already at SAM's size
    tensor = torch.as_tensor(resized, device=predictor.device).permute(2, 0, 1).contiguous()
    predictor.set_torch_image(tensor[None], tuple(original_hw))


def _predict(predictor, xyxy: np.ndarray) -> np.ndarray:
    "Best-of-three masks (b, H, W) bool at the original size for pixel boxes (b, 4)."
    import torch

    boxes = torch.as_tensor(xyxy, dtype=torch.float32, device=predictor.device)
    boxes = predictor.transform.apply_boxes_torch(boxes, predictor.original_size)
    with torch.inference_mode():
        masks, iou, _ = predictor.predict_torch(None, None, boxes=boxes, multimask_output=True)
    best = iou.argmax(dim=1)
    return masks[torch.arange(len(best), device=best.device), best].cpu().numpy().astype(bool)
