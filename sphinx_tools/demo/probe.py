"""What a model's image tokens hold: linear probes on fresh synthetic shapes scenes.

Run:  python -m sphinx_tools.demo probe [--checkpoint demo] [--seed 555]

(the demo model's result is ``weights/token_probe.json``).

The language model reads the image only through ``Transformer.encode_image``'s tokens. These
probes ask whether what a box answer needs is in them, so a failing model can be told apart from
failing encoders:

- ``what``: each patch token of the four quadrant views (of the one view of a single-view model),
  labelled with the colour and the shape of the object whose box holds the patch centre (or
  background); a linear classifier trained on 80% of the tokens, accuracy on the rest (on object
  patches, next to always answering the commonest);
- ``where``: one-object scenes; ridge regression from all image tokens (flattened) to the box
  ``x1, y1, x2, y2`` (fractions of the padded image), mean absolute error on held-out scenes next
  to always answering the median box;
- ``own_box``: scenes of several objects; ridge regression from one patch token on an object to
  that object's ``x1, y1`` (global view and quadrants apart): whether a token, once picked, tells
  where its object is; the same from the LLM's hidden state of that token after each layer
  (``llm_layers``; the image tokens come first, so they see only the image): whether the language
  model has turned a quadrant token's place in its quadrant into a place in the image;
- ``words``: words scenes; a linear classifier of each word (43 classes) from the mean and the
  maximum of each view's patch tokens whose centre lies in its box, with the box's width,
  height and aspect, held out as ``what``; next to the box alone (a word's length and height
  narrow it down) and the commonest word: whether the tokens say which word is written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F

from ..train.losses import patch_token_index
from ..train.warmup import patch_owners
from .synth import COLORS, SHAPES, WORDS, generate_scene


def patch_objects(scene, transform, grid: int, n_views: int = 5) -> np.ndarray:
    """(n_views, grid * grid): index of the object whose box holds each patch centre, -1 for
    background (later objects win where boxes overlap); view 0 is the global view, 1..4 the
    quadrants."""
    boxes = transform.to_model_xyxy([o.xyxy for o in scene.objects], scene.size)
    return patch_owners(boxes, n_views, grid)


def probed_views(n_views: int) -> list[int]:
    "The views the ``what`` probe reads: the four quadrants, or the one view of a single-view model."
    return [0] if n_views == 1 else [1, 2, 3, 4]


def patch_labels(scene, transform, grid: int, n_views: int = 5) -> np.ndarray:
    """(probed views, grid * grid, 2): (colour, shape) index of the object whose box holds each
    patch centre of :func:`probed_views`, -1 for background (later objects win where boxes
    overlap)."""
    labels = [(list(COLORS).index(o.color), SHAPES.index(o.category)) for o in scene.objects]
    idx = patch_objects(scene, transform, grid, n_views)[probed_views(n_views)]
    out = np.full(idx.shape + (2,), -1)
    out[idx >= 0] = np.array(labels).reshape(-1, 2)[idx[idx >= 0]]
    return out


def linear_probe(x: torch.Tensor, y: torch.Tensor, n_train: int) -> torch.Tensor:
    "Multinomial logistic regression (L-BFGS, small L2) on standardized ``x``; held-out predictions."
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mu) / sd
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    torch.nn.init.zeros_(lin.weight)  # a convex fit from a fixed start: the same answer every run
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=300)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x[:n_train]), y[:n_train]) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return lin(x[n_train:]).argmax(-1)


@torch.inference_mode()
def tokens(model, scene) -> np.ndarray:
    "(image_tokens, dim) of one scene."
    return model.encode_images(model.preprocess(scene.image)[None])[0].float().cpu().numpy()


def hidden_states(model, img: torch.Tensor) -> np.ndarray:
    """(layers, image_tokens, dim): the LLM's hidden state of each image token after each layer,
    from one image's ``encode_images`` tokens (1, image_tokens, dim)."""
    t = model.transformer
    seen = []
    hooks = [layer.register_forward_hook(lambda m, args, out: seen.append(out[0, 1:1 + img.shape[1]]))
             for layer in t.layers]
    try:
        with torch.no_grad():
            h = t.embed(torch.tensor([[model.tokenizer.bos_id]], device=img.device), img)
            t(h, torch.arange(h.shape[1], device=img.device)[None], last_only=True)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(seen).float().cpu().numpy()


def view_patches(cfg) -> np.ndarray:
    "(n_views, grid * grid): each view's patch tokens' indices among the image tokens (no BOS)."
    return (patch_token_index(cfg) - 1).view(cfg.n_views, -1).numpy()


def probe_what(model, seed: int, scenes: int) -> dict:
    cfg = model.transformer.cfg
    g, views = cfg.vision.grid, view_patches(cfg)
    feats, labels = [], []
    for k in range(scenes):
        scene = generate_scene("shapes", seed * 1000 + k)
        t = tokens(model, scene)
        for v in probed_views(cfg.n_views):  # view 0 is the global view, 1..4 the quadrants
            feats.append(t[views[v]])
        labels.append(patch_labels(scene, model.transform, g, cfg.n_views).reshape(-1, 2))
    x = torch.tensor(np.concatenate(feats))
    y = np.concatenate(labels)
    n = int(len(x) * 0.8)
    out = {"patches": len(x), "object_share": round(float((y[:, 0] >= 0).mean()), 4)}
    for col, name in ((0, "color"), (1, "shape")):
        pred = linear_probe(x, torch.tensor(y[:, col] + 1), n).numpy() - 1
        truth = y[n:, col]
        obj = truth >= 0
        out[f"{name}_accuracy_on_objects"] = round(float((pred[obj] == truth[obj]).mean()), 4)
        out[f"{name}_commonest_on_objects"] = round(float(np.bincount(truth[obj]).max() / obj.sum()), 4)
    return out


def probe_where(model, seed: int, scenes: int, lam: float = 100.0) -> dict:
    feats, boxes, k = [], [], 0
    while len(feats) < scenes:
        scene = generate_scene("shapes", seed * 1000 + 500_000 + k)
        k += 1
        if len(scene.objects) != 1:
            continue
        feats.append(tokens(model, scene).ravel())
        boxes.append(model.transform.to_model_xyxy([scene.objects[0].xyxy], scene.size)[0])
    x, y = np.array(feats, np.float64), np.array(boxes)
    n = int(len(x) * 0.8)
    mu, sd = x[:n].mean(0), x[:n].std(0) + 1e-6
    x = (x - mu) / sd
    # ridge in its dual form: the features outnumber the scenes
    alpha = np.linalg.solve(x[:n] @ x[:n].T + lam * np.eye(n), y[:n] - y[:n].mean(0))
    pred = x[n:] @ (x[:n].T @ alpha) + y[:n].mean(0)
    return {"scenes": scenes, "ridge_lambda": lam,
            "box_mae": round(float(np.abs(pred - y[n:]).mean()), 4),
            "box_mae_median_guess": round(float(np.abs(np.median(y[:n], 0) - y[n:]).mean()), 4)}


def probe_own_box(model, seed: int, scenes: int, lam: float = 1.0) -> dict:
    """Whether one patch token tells where its own object is: on scenes of several objects, ridge
    regression from each patch token on an object to that object's ``x1, y1`` (fractions of the
    padded image), for the global view's tokens and for the quadrants' (whose place in the image
    also depends on the quadrant, which a token cannot know). A language model that has picked
    the named object's tokens can copy its place from them only if this is small; next to it the
    error of a regression from the patch's own grid place (what a token could say about itself)."""
    cfg = model.transformer.cfg
    g, views = cfg.vision.grid, view_patches(cfg)
    rows = {"global": ([], [], []), "quadrants": ([], [], [])}  # features, corners, grid places
    llm = [{"global": [], "quadrants": []} for _ in range(cfg.n_layers)]  # hidden states
    k = used = 0
    cells = np.array([(j / g, i / g) for i in range(g) for j in range(g)])
    while used < scenes:
        scene = generate_scene("shapes", seed * 1000 + 700_000 + k)
        k += 1
        if len(scene.objects) < 2:
            continue
        used += 1
        img = model.encode_images(model.preprocess(scene.image)[None])  # once for both
        t = img[0].float().cpu().numpy()
        hs = hidden_states(model, img)
        idx = patch_objects(scene, model.transform, g, cfg.n_views)
        boxes = np.asarray(model.transform.to_model_xyxy([o.xyxy for o in scene.objects], scene.size))
        for v in range(cfg.n_views):
            on = idx[v] >= 0
            name = "global" if v == 0 else "quadrants"
            feats, corners, places = rows[name]
            patches = views[v]
            feats.append(t[patches][on])
            corners.append(boxes[idx[v][on], :2])
            places.append(cells[on])
            for layer, h in zip(llm, hs):
                layer[name].append(h[patches][on])
    out = {"scenes": scenes, "ridge_lambda": lam}
    for name, (feats, corners, places) in rows.items():
        if not corners:  # a single-view model has no quadrants
            continue
        y = np.concatenate(corners)
        n = int(len(y) * 0.8)

        def ridge(x):
            x = x.astype(np.float64)
            mu, sd = x[:n].mean(0), x[:n].std(0) + 1e-6
            x = np.c_[(x - mu) / sd, np.ones(len(x))]
            w = np.linalg.solve(x[:n].T @ x[:n] + lam * np.eye(x.shape[1]), x[:n].T @ y[:n])
            return round(float(np.abs(x[n:] @ w - y[n:]).mean()), 4)

        out[name] = {"patches": len(y), "corner_mae": ridge(np.concatenate(feats)),
                     "corner_mae_from_grid_place": ridge(np.concatenate(places)),
                     "corner_mae_median_guess": round(float(np.abs(np.median(y[:n], 0) - y[n:]).mean()), 4),
                     "llm_layers_corner_mae": [ridge(np.concatenate(layer[name])) for layer in llm]}
    return out


def probe_words(model, seed: int, scenes: int) -> dict:
    cfg = model.transformer.cfg
    views = view_patches(cfg)
    pooled, sizes, labels = [], [], []
    for k in range(scenes):
        scene = generate_scene("words", seed * 1000 + 700_000 + k)
        t = tokens(model, scene)
        owner = patch_objects(scene, model.transform, cfg.vision.grid, cfg.n_views)
        boxes = model.transform.to_model_xyxy([o.xyxy for o in scene.objects], scene.size)
        for i, obj in enumerate(scene.objects):
            parts, seen = [], False
            for v in range(cfg.n_views):  # each view's patches on the word: mean and max (zeros if none)
                own = t[views[v]][owner[v] == i]
                seen |= len(own) > 0
                parts += [own.mean(0), own.max(0)] if len(own) else [np.zeros(t.shape[1])] * 2
            if not seen:  # a word between patch centres
                continue
            w, h = boxes[i][2] - boxes[i][0], boxes[i][3] - boxes[i][1]
            pooled.append(np.concatenate(parts))
            sizes.append([w, h, w / max(h, 1e-3)])
            labels.append(WORDS.index(obj.text))
    y = torch.tensor(labels)
    n = int(len(y) * 0.8)

    def accuracy(x):
        return round(float((linear_probe(torch.tensor(np.asarray(x), dtype=torch.float32), y, n) == y[n:])
                           .float().mean()), 4)

    return {"words": len(labels), "accuracy": accuracy(np.c_[np.array(pooled), np.array(sizes)]),
            "accuracy_from_box_alone": accuracy(sizes),
            "commonest": round(float(np.bincount(labels[n:]).max() / max(len(y) - n, 1)), 4)}


@click.command("probe")
@click.option("--checkpoint", default="demo", show_default=True)
@click.option("--seed", default=555, show_default=True, help="a seed the model was not trained on")
@click.option("--scenes", default=400, show_default=True, help="shapes scenes for the `what` probe")
@click.option("--where-scenes", default=600, show_default=True, help="one-object scenes for `where`")
@click.option("--word-scenes", default=400, show_default=True, help="words scenes for `words`")
@click.option("--out", type=click.Path(path_type=Path),
              help="result JSON  [default: token_probe.json in the checkpoint folder]")
def probe_command(checkpoint, seed, scenes, where_scenes, word_scenes, out):
    "Probe what a model's image tokens hold (linear probes on fresh shapes and words scenes)."
    from . import resolve
    from ..sphinx_model import SphinxModel

    t0 = time.perf_counter()
    model = SphinxModel.from_pretrained(checkpoint)
    result = {"checkpoint": str(checkpoint), "seed": seed,
              "what": probe_what(model, seed, scenes),
              "where": probe_where(model, seed, where_scenes),
              "own_box": probe_own_box(model, seed, scenes),
              "words": probe_words(model, seed, word_scenes),
              "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(out) if out is not None else resolve(checkpoint) / "token_probe.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    click.echo(json.dumps(result, indent=1))
