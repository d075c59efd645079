"""Dense warm-up of the visual encoders from COCO boxes, before finetuning.

The released SPHINX starts from pretrained encoders (CLIP, ConvNeXt, DINOv2, Q-Former). A model
trained from scratch (the tiny demo model) starts from random ones, and the language loss alone
teaches them where things are very slowly. This stage first trains the encoders and the fused
visual projection on a dense task read from COCO ground truth; finetuning then teaches the LLM to
read their tokens.

Targets of each fused patch token of each view (the global view and, for SPHINX-1k, the four
quadrants): the fraction of each of its ``sub x sub`` cells that object boxes cover (mean squared
error), and what the patch shows: background or a category, as the distribution of the patch's
area over them (cross entropy). The class term is there so the language model can later pick "the
circle" among several objects: coverage alone does not tell the shapes apart. A linear head
(discarded afterwards) predicts both. Config (``encoder_warmup`` in the training YAML; its keys,
defaults and checks are in ``config.py``)::

    encoder_warmup:
      coco: data/coco.json     # boxes and categories; file names relative to `images`
      images: data/images
      steps: 600
      batch_size: 4            # per process
      lr: 2.0e-3               # warmup + cosine, like finetuning
      sub: 4                   # sub-cells per patch side
      categories: [circle, ...] # optional: only the images that show one of these categories
      position: false          # optional: also the box of the object under each patch (see below)
      attributes: [color]      # optional: annotation keys whose values a patch also learns
      read: text               # optional: an annotation key each object's pooled tokens learn
      read_weight: 1.0         # optional: that term's weight next to the dense one
      read_branch: dinov2      # optional: the one encoder (clip, convnext, dinov2) that reads

With ``position``, each patch token also learns the box of the object under its centre (or its
own cell on background), in fractions of its view: a patch token of the global view then says
where its object is in the image (measured by ``own_box`` of ``sphinx_tools.demo.probe``).

With ``attributes``, each named annotation key (``color`` in the synthetic scenes) is one more
class term: background or one of the key's values, as the distribution of the patch's area over
them, so that the language model can also pick "the blue triangle". An object without the key
counts as background there.

With ``read``, every annotation that has the key (``text``: the word of an OCR box) is also
learned whole: the global view's patch tokens under its box, averaged with the share of the box
each patch holds, tell the value (cross entropy over the values seen, through a second linear
head). A word is a few patches wide and no patch holds all of it, so a per-patch target does not
ask for the glyphs; the pooled one does. By default the encoders are shared by both terms:
``read_weight`` sets how much of their capacity reading takes from telling the objects apart.

With ``read_branch``, reading gets an encoder of its own. The fused token is a layer norm of a sum
of one linear map per encoder (``visual_proj``), so the two terms can split it. The read term's
gradient reaches only that encoder and its columns of the projection. The dense term's gradient
reaches the other encoders, the rest of the projection and its norm. Each term still sees the
whole fused token that the language model will read, with the other part held fixed.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist
from ..errors import SphinxToolsError
from ..transforms import PaddedResize
from .schedule import lr_at, sync_grads

TRAINS = ("clip.", "openclip_convnext_xxl.", "dinov2_vitg14.", "visual_proj.")  # the fused path


def read_coco(coco, categories: bool = False) -> SimpleNamespace:
    """The ``images`` (each with ``id``, ``file_name``, ``width``, ``height``) and ``annotations``
    of the COCO json at ``coco``, and its ``categories`` (each with ``id``) when asked; a file that
    cannot be read or lacks one of these raises an error naming it."""
    try:
        data = json.loads(Path(coco).read_text())
        images, annotations = list(data["images"]), list(data["annotations"])
        cats = list(data["categories"]) if categories else None
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise SphinxToolsError(f"cannot read COCO boxes from {coco}: {e!r}") from None
    for kind, items, keys in (("image", images, ("id", "file_name", "width", "height")),
                              ("category", cats or [], ("id",))):
        for item in items:
            if not isinstance(item, dict) or any(k not in item for k in keys):
                raise SphinxToolsError(f"cannot read COCO boxes from {coco}: {kind} {item!r} "
                                       f"needs {', '.join(keys)}")
    return SimpleNamespace(images=images, annotations=annotations, categories=cats)


def view_squares(n_views: int) -> list[tuple[float, float, float]]:
    "``(left, top, side)`` of each view in fractions of the padded image, in ``Transformer.views`` order."
    full = [(0.0, 0.0, 1.0)]
    return full if n_views == 1 else full + [(j / 2, i / 2, 0.5) for i in (0, 1) for j in (0, 1)]


def patch_owners(boxes, n_views: int, grid: int) -> np.ndarray:
    """(n_views, grid * grid): index of the box (``x1, y1, x2, y2`` fractions of the padded image)
    that holds each patch centre, -1 where none does; a later box wins where boxes overlap."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    c, r = np.tile(np.arange(grid), grid), np.repeat(np.arange(grid), grid)  # row-major patches
    out = np.full((n_views, grid * grid), -1)
    if not len(b):
        return out
    for v, (left, top, span) in enumerate(view_squares(n_views)):
        cx, cy = left + (c + 0.5) * span / grid, top + (r + 0.5) * span / grid
        inside = (b[:, :1] <= cx) & (cx < b[:, 2:3]) & (b[:, 1:2] <= cy) & (cy < b[:, 3:4])  # (boxes, patches)
        out[v] = np.where(inside.any(0), len(b) - 1 - inside[::-1].argmax(0), -1)
    return out


class DenseTargets:
    """COCO images and their per-patch targets for a model's views.

    Args:
        coco: path of the COCO json (``images``, ``annotations`` with ``bbox``, ``categories``).
        images: folder the ``file_name`` entries are relative to.
        image_size: the model's input side (448 for SPHINX-1k).
        n_views: 5 (global + quadrants) or 1 (global).
        grid: patch tokens per view side.
        sub: sub-cells per patch side.
        categories: names; when given, only the images with a box of one of them are used.
        position: also the box ``x1, y1, x2, y2`` (fractions of the view) of the object under
            each patch centre, or the patch's own cell where there is none.
        attributes: annotation keys (e.g. ``["color"]``); each is one more class term over
            background and the key's values (sorted), after the categories.
        read: an annotation key (e.g. ``"text"``); each annotation with it is also an object
            whose pooled tokens learn its value (:meth:`objects`); ``values`` lists them, sorted.
    """

    def __init__(self, coco, images, image_size: int, n_views: int, grid: int, sub: int,
                 categories: list[str] | None = None, position: bool = False,
                 attributes: list[str] | None = None, read: str | None = None):
        data = read_coco(coco, categories=True)
        self.images, annotations = data.images, data.annotations
        category_ids = [c["id"] for c in data.categories]
        if not self.images:
            raise SphinxToolsError(f"{coco} has no images")
        if categories is not None:
            names = {c.get("name"): c["id"] for c in data.categories}
            unknown = sorted(set(categories) - set(names))
            if unknown:
                raise SphinxToolsError(f"encoder_warmup.categories {unknown} are not in {coco}; "
                                       f"it has {sorted(n for n in names if n)}")
            wanted = {names[c] for c in categories}
            keep = {a.get("image_id") for a in annotations if a.get("category_id") in wanted}
            self.images = [im for im in self.images if im["id"] in keep]
            if not self.images:
                raise SphinxToolsError(f"no image of {coco} shows any of {categories}")
        self.root, self.sub, self.grid, self.n_views = Path(images), sub, grid, n_views
        self.position = position
        self.channel = {cid: i for i, cid in enumerate(category_ids)}
        self.boxes: dict = {im["id"]: [] for im in self.images}
        kept = [a for a in annotations
                if a.get("image_id") in self.boxes and a.get("category_id") in self.channel]
        # each attribute's values (sorted, as str) and their map channels after the categories
        self.attributes = {}
        start = 1 + len(self.channel)
        for key in attributes or []:
            values = sorted({str(a[key]) for a in kept if a.get(key) is not None})
            if not values:
                raise SphinxToolsError(f"encoder_warmup.attributes: no annotation of {coco} has "
                                       f"`{key}`")
            self.attributes[key] = {v: start + i for i, v in enumerate(values)}
            start += len(values)
        for a in kept:
            extra = [self.attributes[k][str(a[k])] for k in self.attributes if a.get(k) is not None]
            self.boxes[a["image_id"]].append((a["bbox"], self.channel[a["category_id"]], extra))
        self.read, self.values, self.reads = read, [], {im["id"]: [] for im in self.images}
        if read is not None:
            self.values = sorted({str(a[read]) for a in kept if a.get(read) is not None})
            if not self.values:
                raise SphinxToolsError(f"encoder_warmup.read: no annotation of {coco} has `{read}`")
            index = {v: i for i, v in enumerate(self.values)}
            for a in kept:
                if a.get(read) is not None:
                    self.reads[a["image_id"]].append((a["bbox"], index[str(a[read])]))
        self.transform = PaddedResize(image_size)
        self.res = grid * sub * (2 if n_views == 5 else 1)  # target map cells per image side

    @property
    def regressed(self) -> int:
        "Leading target values fitted by squared error: sub-cell coverage (and the box)."
        return self.sub * self.sub + 4 * self.position

    @property
    def groups(self) -> list[int]:
        "Widths of the class terms after :attr:`regressed`: categories, then each attribute."
        return [1 + len(self.channel)] + [1 + len(v) for v in self.attributes.values()]

    @property
    def width(self) -> int:
        "Target values per patch token: :attr:`regressed`, then the class terms' shares."
        return self.regressed + sum(self.groups)

    def __len__(self) -> int:
        return len(self.images)

    def coverage(self, index: int) -> torch.Tensor:
        """(1 + categories + attribute values, res, res): box coverage of each map cell, all boxes,
        per category and per attribute value."""
        im = self.images[index]
        w, h = im["width"], im["height"]
        side = max(w, h)
        px, py = self.transform.offsets((w, h))
        r = self.res
        maps = np.zeros((1 + len(self.channel) + sum(map(len, self.attributes.values())), r, r),
                        np.float32)
        edges = np.arange(r, dtype=np.float64)
        for (x, y, bw, bh), c, extra in self.boxes[im["id"]]:
            x1, x2 = (x + px) / side * r, (x + bw + px) / side * r
            y1, y2 = (y + py) / side * r, (y + bh + py) / side * r
            cov = np.outer(np.clip(np.minimum(edges + 1, y2) - np.maximum(edges, y1), 0, 1),
                           np.clip(np.minimum(edges + 1, x2) - np.maximum(edges, x1), 0, 1))
            for channel in (0, 1 + c, *extra):
                maps[channel] = np.maximum(maps[channel], cov)
        return torch.from_numpy(maps)

    def places(self, index: int) -> torch.Tensor:
        """(n_views, grid * grid, 4): for each patch, the box of the object under its centre (the
        last listed wins) or else the patch's own cell, as fractions of the view."""
        im = self.images[index]
        boxes = self.transform.to_model_xyxy(
            [(x, y, x + bw, y + bh) for (x, y, bw, bh), *_ in self.boxes[im["id"]]], (im["width"], im["height"]))
        owner = patch_owners(boxes, self.n_views, self.grid)
        g = self.grid
        c, r = np.tile(np.arange(g), g), np.repeat(np.arange(g), g)  # row-major patches
        out = []
        for v, (left, top, span) in enumerate(view_squares(self.n_views)):
            cells = np.stack([left + c * span / g, top + r * span / g,
                              left + (c + 1) * span / g, top + (r + 1) * span / g], axis=1)
            chosen = np.where(owner[v][:, None] >= 0, boxes[owner[v]], cells) if len(boxes) else cells
            out.append((chosen - [left, top, left, top]) / span)
        return torch.from_numpy(np.stack(out)).float()

    def objects(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights (n, grid * grid), values (n,))`` of the image's ``read`` annotations: the
        share of each box's area in each global-view patch (rows sum to 1), and the index of its
        value in :attr:`values`. A box outside the padded square is left out."""
        im = self.images[index]
        found = self.reads[im["id"]]
        g = self.grid
        if not found:
            return torch.zeros(0, g * g), torch.zeros(0, dtype=torch.long)
        b = self.transform.to_model_xyxy([(x, y, x + bw, y + bh) for (x, y, bw, bh), _ in found],
                                         (im["width"], im["height"]))
        c, r = np.tile(np.arange(g), g) / g, np.repeat(np.arange(g), g) / g  # row-major patches
        wx = np.clip(np.minimum(c + 1 / g, b[:, 2:3]) - np.maximum(c, b[:, 0:1]), 0, None)
        wy = np.clip(np.minimum(r + 1 / g, b[:, 3:4]) - np.maximum(r, b[:, 1:2]), 0, None)
        area = wx * wy
        keep = area.sum(1) > 0
        weights = area[keep] / area[keep].sum(1, keepdims=True)
        values = np.array([v for _, v in found])[keep]
        return torch.from_numpy(weights).float(), torch.from_numpy(values).long()

    def __getitem__(self, index: int) -> tuple:
        "``(image, targets)`` (:meth:`example`), and :meth:`objects` where ``read`` is set."
        return self.example(index) + ((self.objects(index),) if self.read is not None else ())

    def example(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        "``(image (3, S, S), targets (n_views, grid * grid, width))`` of one COCO image."
        from PIL import Image

        path = self.root / self.images[index]["file_name"]
        try:
            with Image.open(path) as pil:
                image = self.transform.apply_image(pil)
        except OSError as e:
            raise SphinxToolsError(f"cannot read warm-up image {path}: {e}") from None
        maps = self.coverage(index)
        half = self.res // 2
        views = [maps] if self.n_views == 1 else [maps] + [
            maps[:, i:i + half, j:j + half] for i in (0, half) for j in (0, half)]  # as Transformer.views
        g, s = self.grid, self.sub
        out = []
        for v in views:
            cells = F.adaptive_avg_pool2d(v[:1], g * s)  # (1, g*s, g*s)
            cells = cells.view(g, s, g, s).permute(0, 2, 1, 3).reshape(g * g, s * s)
            shares = F.adaptive_avg_pool2d(v[1:], g).flatten(1).T  # (g*g, categories + values)
            terms = [cells]
            for part in shares.split([n - 1 for n in self.groups], dim=1):
                background = (1 - part.sum(dim=1, keepdim=True)).clamp(min=0)
                classes = torch.cat([background, part], dim=1)
                terms.append(classes / classes.sum(dim=1, keepdim=True))
            out.append(torch.cat(terms, dim=1))
        out = torch.stack(out)
        if self.position:
            s2 = self.sub * self.sub
            out = torch.cat([out[..., :s2], self.places(index), out[..., s2:]], dim=-1)
        return image, out


def _by_image(cfg, fused: torch.Tensor, batch: int) -> torch.Tensor:
    "view-major fused tokens (V*B, 1 + g*g, dim) -> (B, V, g*g, dim), the class tokens dropped"
    g = cfg.vision.grid
    return fused[:, 1:1 + g * g].reshape(cfg.n_views, batch, g * g, -1).transpose(0, 1)


def patch_tokens(model, images: torch.Tensor) -> torch.Tensor:
    "(B, 3, S, S) -> (B, n_views, grid * grid, dim): the fused patch tokens of every view."
    fused = model.fused_tokens(model.encode_views(model.views(images)))  # view-major: (V*B, ...)
    return _by_image(model.cfg, fused, images.shape[0])


def routed_tokens(model, images: torch.Tensor, branch: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`patch_tokens` twice, with the same values and split gradients: ``(dense, read)``.
    ``read``'s gradient reaches only the ``branch`` encoder and its columns of the projection;
    ``dense``'s everything of the fused path but them."""
    names = model.fused_parts  # the projection's column order; a light model has no CLIP
    if branch not in names:
        raise SphinxToolsError(f"encoder_warmup.read_branch {branch!r} is not an encoder of this "
                               f"model's fused tokens ({', '.join(names)})")
    f = model.encode_views(model.views(images))
    lin, norm = model.visual_proj
    parts, start = {}, 0
    for n in names:  # the projection of the concatenation = the sum of each part's columns
        width = f[n].shape[-1]
        parts[n] = F.linear(f[n], lin.weight[:, start:start + width])
        start += width
    own = parts[branch]
    rest = sum(parts[n] for n in names if n != branch) + lin.bias
    dense = norm(own.detach() + rest)
    read = F.layer_norm(own + rest.detach(), norm.normalized_shape, norm.weight.detach(),
                        norm.bias.detach(), norm.eps)
    B = images.shape[0]
    return _by_image(model.cfg, dense, B), _by_image(model.cfg, read, B)


def dense_loss(pred: torch.Tensor, targets: torch.Tensor, cells: int,
               groups: list[int] | None = None) -> torch.Tensor:
    """10 x MSE of the first ``cells`` values (coverage, box) + the cross entropy of each class
    term after them (``groups``: their widths; default one term, the rest)."""
    coverage = F.mse_loss(pred[..., :cells], targets[..., :cells]) * 10
    rest = pred.shape[-1] - cells
    loss = coverage
    for p, t in zip(pred[..., cells:].split(groups or [rest], -1), targets[..., cells:].split(groups or [rest], -1)):
        loss = loss + -(t * F.log_softmax(p, dim=-1)).sum(-1).mean()
    return loss


def read_loss(tokens: torch.Tensor, objects: list, head: nn.Module) -> torch.Tensor:
    """Cross entropy of each object's value from the global view's patch tokens (``tokens``
    (B, grid * grid, dim)) averaged with its weights (``objects``: each image's :meth:`DenseTargets.objects`)."""
    pooled = torch.cat([w.to(tokens.dtype) @ tokens[i] for i, (w, _) in enumerate(objects)])
    values = torch.cat([v for _, v in objects])
    if not len(values):
        return tokens.sum() * 0  # no object in this batch: no term, the graph kept for the gradient sync
    return F.cross_entropy(head(pooled), values.to(tokens.device))


def _linear_head(dim: int, width: int, gen: torch.Generator) -> nn.Linear:
    "A linear head drawn from ``gen`` (the same start on every data-parallel rank), bias zero."
    head = nn.Linear(dim, width)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * dim ** -0.5)
        head.bias.zero_()
    return head


def _stack(examples):
    out = torch.stack([e[0] for e in examples]), torch.stack([e[1] for e in examples])
    return out + ([e[2] for e in examples],) if len(examples[0]) > 2 else out


def warmup_encoders(model, spec: dict, device, log=None, progress: bool = True, workers: int = 0) -> list[float]:
    """Train the encoders and the visual projection on :class:`DenseTargets` (see the module
    docstring); data parallel like finetuning (each rank its share of every batch, gradients
    averaged). ``workers`` processes read the images ahead (the batches are the same). Writes
    ``{"warmup_step", "loss"}`` records to ``log``; returns the losses."""
    from tqdm.auto import tqdm

    schedule = SimpleNamespace(lr=spec["lr"], min_lr=0.0, warmup=spec["warmup"], steps=spec["steps"])

    data = DenseTargets(spec["coco"], spec["images"], model.cfg.image_size, model.cfg.n_views,
                        model.cfg.vision.grid, spec["sub"], spec.get("categories"), spec.get("position", False),
                        spec.get("attributes"), spec.get("read"))
    gen = torch.Generator().manual_seed(int(spec["seed"]))
    head = _linear_head(model.cfg.dim, data.width, gen).to(device)
    reader = None
    if data.read is not None:  # the pooled object values: a head of their own
        reader = _linear_head(model.cfg.dim, len(data.values), gen).to(device)
    params = [p for n, p in model.named_parameters() if n.startswith(TRAINS)]
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    params += list(head.parameters()) + (list(reader.parameters()) if reader is not None else [])
    opt = torch.optim.AdamW(params, lr=spec["lr"], betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    dp, dpw = dist.dp_rank(), dist.dp_world_size()
    rng = random.Random(int(spec["seed"]))
    order: list[int] = []
    plan = []  # this rank's examples of each step, drawn up front so that loader workers can read ahead
    for step in range(spec["steps"]):
        mine = []
        for k in range(spec["batch_size"] * dpw):  # the global batch; this rank keeps its share
            if not order:
                order = list(range(len(data)))
                rng.shuffle(order)
            i = order.pop()
            if k % dpw == dp:
                mine.append(i)
        plan.append(mine)
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=plan, collate_fn=_stack, num_workers=workers,
        pin_memory=torch.device(device).type == "cuda", prefetch_factor=4 if workers else None,
        generator=torch.Generator())  # its own: the loader's seed draw leaves the training RNG alone
    losses = []
    bar = tqdm(total=spec["steps"], disable=not progress or dp > 0 or dist.mp_rank() > 0,
               desc="encoder warm-up", unit="step")
    t0 = time.perf_counter()
    model.train()
    for step, (images, targets, *objects) in enumerate(loader):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if spec.get("read_branch"):  # checked: only with a reader
            tokens, reading = routed_tokens(model, images, spec["read_branch"])
        else:
            tokens = reading = patch_tokens(model, images)
        loss = dense_loss(head(tokens), targets, data.regressed, data.groups)
        if reader is not None:
            loss = loss + spec.get("read_weight", 1.0) * read_loss(reading[:, 0], objects[0], reader)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, schedule)
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if log is not None and ((step + 1) % 10 == 0 or step + 1 == spec["steps"]):
            log.write(json.dumps({"warmup_step": step + 1, "loss": losses[-1],
                                  "s": round(time.perf_counter() - t0, 1)}) + "\n")
            log.flush()
    bar.close()
    for p, flag in saved.items():
        p.requires_grad_(flag)
    for p in model.parameters():
        p.grad = None
    return losses
