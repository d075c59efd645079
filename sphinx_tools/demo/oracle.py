"""Oracle image tokens: can a pilot's language model pick the named object when the image
tokens say exactly what and where each object is?

Run:  python -m sphinx_tools.demo oracle --work runs/pilot [--hypothesis what-warmup] [--steps N]

(``--work``: the work folder of a single-view pilot build, for its scenes and tokenizer.)

It trains the language model of a pilot hypothesis from scratch with that hypothesis' recipe
(the same scenes, questions, tokenizer, batch, optimizer and learning-rate schedule), but the
image tokens come from the ground truth instead of the encoders: each patch of the view's grid
becomes a learned linear map (and LayerNorm) of ``[colour | shape | box of its object | row |
column]`` (one-hots, the box in fractions of the padded image; background patches hold their row
and column only). An object that holds no patch centre takes the patch of its own centre. Then it
takes the pilot's teacher-forced measures on the same fresh scenes as ``quality --pilot``
(``named_object_nearest`` and the first-corner error on scenes of 3 or more objects).

Read next to the pilot's figure with the encoders: if the oracle picks the named object, the
language model, the data and the steps suffice and the encoders' tokens are what fail; if it
stays near chance too, the language-model side (its size, the steps, the answer format) is what
fails. ``--attend L [--attend-question Q]`` also trains the language model's own attention on
both hops of a referring expression (:class:`~sphinx_tools.train.losses.ObjectAttention`), which
tries a training signal in minutes before a pilot build spends its hour on it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np
import torch

from ..errors import SphinxToolsError
from ..train.warmup import patch_owners, read_coco
from ..transforms import PaddedResize
from .recipe import HYPOTHESES
from .synth import COLORS, SHAPES


def feature_width(grid: int) -> int:
    "The width of :func:`oracle_features`' rows."
    return len(COLORS) + len(SHAPES) + 4 + 2 * grid


def oracle_features(objects, size, grid: int, box: bool = True) -> torch.Tensor:
    """(grid * grid, :func:`feature_width`) row-major patch features of one image.

    ``objects``: ``(colour, shape, (x1, y1, x2, y2) pixels)``; ``size``: the image's (w, h);
    without ``box`` the box columns stay zero (a patch says only its row and column, as a ViT
    position embedding does)."""
    nc, ns = len(COLORS), len(SHAPES)
    boxes = PaddedResize().to_model_xyxy([o[2] for o in objects], size) if objects else np.zeros((0, 4))
    owner = patch_owners(boxes, 1, grid)[0]
    for k, b in enumerate(boxes):  # smaller than a patch and off every patch centre
        if not (owner == k).any():
            cell = (min(int((b[1] + b[3]) / 2 * grid), grid - 1) * grid
                    + min(int((b[0] + b[2]) / 2 * grid), grid - 1))
            if owner[cell] < 0:
                owner[cell] = k
    out = torch.zeros(grid * grid, feature_width(grid))
    cells = torch.arange(grid * grid)
    out[cells, nc + ns + 4 + cells // grid] = 1
    out[cells, nc + ns + 4 + grid + cells % grid] = 1
    for p in np.flatnonzero(owner >= 0):
        color, shape, _ = objects[owner[p]]
        out[p, list(COLORS).index(color)] = 1
        out[p, nc + SHAPES.index(shape)] = 1
        if box:
            out[p, nc + ns:nc + ns + 4] = torch.from_numpy(np.asarray(boxes[owner[p]], dtype=np.float32))
    return out


def scene_features(scene, grid: int, box: bool = True) -> torch.Tensor:
    "(grid * grid, width): :func:`oracle_features` of a generated scene."
    return oracle_features([(o.color, o.category, o.xyxy) for o in scene.objects], scene.size, grid, box)


class OracleTargets:
    """Per-image oracle features of a COCO json's images, for ``ConversationData(places=...)``
    (the training batches then carry them where the token_position targets go)."""

    def __init__(self, coco: Path, images: Path, grid: int, box: bool = True):
        data = read_coco(coco, categories=True)
        names = {c["id"]: c["name"] for c in data.categories}
        objects: dict = {}
        for a in data.annotations:
            x, y, w, h = a["bbox"]
            objects.setdefault(a["image_id"], []).append(
                (a["color"], names[a["category_id"]], (x, y, x + w, y + h)))
        self.by_path = {Path(images, im["file_name"]).resolve(): (objects.get(im["id"], []),
                                                                  (im["width"], im["height"]))
                        for im in data.images}
        self.grid, self.box = grid, box

    def targets(self, image_path) -> torch.Tensor:
        found = self.by_path[Path(image_path).resolve()]
        return oracle_features(*found, self.grid, self.box)


class OracleTokens(torch.nn.Module):
    "Oracle features (B, P, width) -> image tokens (B, P, dim), as ``visual_proj`` maps encoder features."

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.proj = torch.nn.Sequential(torch.nn.Linear(width, dim), torch.nn.LayerNorm(dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


def oracle_config(work: Path, hypothesis: str, steps: int | None, tasks: list[str] | None = None,
                  batch_size: int | None = None):
    """The TrainConfig of a pilot hypothesis' language model on ``work``'s scenes and tokenizer: its
    global batch in one process, without the encoder warm-up and the auxiliary losses. With
    ``tasks``, only those tasks' questions are trained on (written to ``oracle-data-TASKS.json``
    in ``work``)."""
    from ..train import TrainConfig
    from .recipe import pilot_recipe, training_config

    recipe = pilot_recipe(hypothesis)
    spec = training_config(recipe)
    for key in ("encoder_warmup", "token_position", "object_pointer", "object_attention", "max_minutes"):
        spec.pop(key, None)
    work = Path(work).resolve()
    spec["init"]["tokenizer"] = str(work / "tokenizer.model")
    spec["data"][0].update(path=str(work / "data" / "conversations.json"), root=str(work / "data"))
    if tasks:
        spec["data"][0]["path"] = str(_task_subset(work / "data" / "conversations.json", tasks))
    spec["out"] = str(work / f"oracle-{hypothesis}")
    spec["batch_size"] *= recipe.get("procs", 1)
    spec["train"] = ["llm"]
    if steps is not None:
        spec["steps"] = steps
    if batch_size is not None:
        spec["batch_size"] = batch_size
    return TrainConfig(**spec)


def _task_subset(path: Path, tasks: list[str]) -> Path:
    "The records of ``path`` with only the question/answer pairs of ``tasks`` (records left empty dropped)."
    out = []
    for rec in json.loads(path.read_text()):
        keep = [k for k, task in enumerate(rec["tasks"]) if task in tasks]
        if keep:
            turns = [t for k in keep for t in rec["conversations"][2 * k:2 * k + 2]]
            out.append({**rec, "conversations": turns, "tasks": [rec["tasks"][k] for k in keep],
                        "options": [rec["options"][k] for k in keep]})
    if not out:
        raise SphinxToolsError(f"{path} has no questions of the tasks {', '.join(tasks)}")
    dest = path.parent.parent / f"oracle-data-{'-'.join(tasks)}.json"
    dest.write_text(json.dumps(out))
    return dest


def check_attend(box: bool, attend: int | None, attend_question: int | None):
    "The attention options of an oracle run go together: a clear error where they do not."
    if attend is not None and not box:
        raise SphinxToolsError("--attend needs --box (the box features tell the answer's object)")
    if attend_question is not None and attend is None:
        raise SphinxToolsError("--attend-question goes with --attend")


def train_oracle(cfg, box: bool = True, attend: int | None = None, attend_question: int | None = None,
                 progress: bool = True):
    """Train ``cfg``'s language model on oracle image tokens; returns ``(transformer, tokenizer,
    oracle tokens, losses)`` (``losses``: the mean answer loss of each 50 steps; with ``attend``
    ``{"answer": those, "attend": the attention losses'}``).

    ``attend``: also train head 0 of that LLM layer to attend, from the hidden state that predicts
    each answer's first coordinate, to the patches of the answer's object, and with
    ``attend_question`` head 0 of that layer to the question's referring expression
    (:class:`~sphinx_tools.train.losses.ObjectAttention`, weight 1; needs ``box``)."""
    from tqdm import tqdm

    from ..train.data import ConversationData, batches
    from ..train.loop import init_model, set_trainable
    from ..train.losses import ObjectAttention, coordinate_values, loss_fn
    from ..train.schedule import lr_at

    check_attend(box, attend, attend_question)
    torch.manual_seed(cfg.seed)
    model, tok = init_model(cfg)
    grid = model.cfg.vision.grid
    set_trainable(model, cfg.train)
    oracle = OracleTokens(feature_width(grid), model.cfg.dim)
    model.encode_image = oracle.forward  # loss_fn's "images" are the oracle features
    params = [p for p in model.parameters() if p.requires_grad] + list(oracle.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    spec = cfg.data[0]
    places = OracleTargets(Path(spec["root"]) / "coco.json", Path(spec["root"]) / "images", grid, box)
    data = ConversationData(cfg.data, tok, model.cfg.image_size, cfg.max_len, cfg.seed, places)
    feed = batches(data, cfg.batch_size, 0, 0)
    values = coordinate_values(tok) if attend is not None else None
    nc, ns, patches = len(COLORS), len(SHAPES), 1 + torch.arange(grid * grid)  # after BOS
    model.train()
    losses, window, aux_losses, aux_window = [], [], [], []
    for step in tqdm(range(cfg.steps), desc="oracle", disable=not progress):
        (ids, labels, _, segments, features), _ = next(feed)
        if attend is None:
            loss = lang = loss_fn(model, ids, labels, features, segments)
        else:
            boxes = features[..., nc + ns:nc + ns + 4].masked_fill(  # background patches: no box
                features[..., :nc].sum(-1, keepdim=True) == 0, float("nan"))
            attention = ObjectAttention(attend, attend_question, 0, boxes, values, tok, 1.0, patches)
            loss, lang, aux = loss_fn(model, ids, labels, features, segments, attention=attention)
            aux_window.append(sum(float(v.detach()) for v in aux.values()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.step()
        window.append(float(lang.detach()))
        if len(window) == 50:
            losses.append(round(sum(window) / 50, 4))
            window = []
            if aux_window:
                aux_losses.append(round(sum(aux_window) / 50, 4))
                aux_window = []
    model.eval()
    return model, tok, oracle, {"answer": losses, "attend": aux_losses} if attend is not None else losses


def oracle_quality(model, tok, oracle, seed: int, n: int, box: bool = True) -> dict:
    "The pilot's teacher-forced REC and detection measures with oracle image tokens."
    from .quality import TEACHER_FORCED, teacher_forced

    grid = model.cfg.vision.grid
    return teacher_forced(SimpleNamespace(transformer=model, tokenizer=tok), seed, n,
                          tasks=TEACHER_FORCED[:2],
                          encode=lambda scene: oracle(scene_features(scene, grid, box)[None]))


def summary(tf: dict) -> dict:
    "The pilot table's teacher-forced columns of a ``teacher_forced`` result."
    rec = tf["rec"]
    named = rec["named_object_by_objects"].get("3+", {})
    corner = rec["first_corner_by_objects"].get("3+", {})
    return {"named_object_nearest_3plus": named.get("named_object_nearest"),
            "chance_3plus": named.get("named_object_nearest_chance"),
            "named_object_questions_3plus": named.get("named_object_questions"),
            "first_corner_mae_3plus": corner.get("first_corner_mae"),
            "first_corner_mae_median_guess_3plus": corner.get("first_corner_mae_median_guess")}


def run_name(hypothesis: str, cfg, box: bool, tasks, attend, attend_question) -> str:
    "HYPOTHESIS-STEPSxBATCH[-no-box][-TASKS][-attendL][-qQ]: what an oracle run changed."
    parts = [hypothesis, f"{cfg.steps}x{cfg.batch_size}"] + ([] if box else ["no-box"]) + (tasks or [])
    parts += [] if attend is None else [f"attend{attend}"]
    parts += [] if attend_question is None else [f"q{attend_question}"]
    return "-".join(parts)


@click.command("oracle")
@click.option("--work", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="a single-view pilot build's work folder (its data/ and tokenizer.model)")
@click.option("--hypothesis", default="what-warmup", show_default=True, type=click.Choice(list(HYPOTHESES)),
              help="the pilot hypothesis whose language model and recipe to train")
@click.option("--steps", type=click.IntRange(1), default=None, help="[default: the hypothesis' steps]")
@click.option("--seed", default=777, show_default=True, help="the fresh scenes' seed")
@click.option("--n", default=48, show_default=True, help="fresh scenes measured")
@click.option("--box/--no-box", default=True, show_default=True,
              help="whether an object patch's features hold its object's box (else its row and column only)")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="scenes per step  [default: the hypothesis' global batch]")
@click.option("--tasks", default=None, help="train on these tasks' questions only (comma-separated)")
@click.option("--attend", type=click.IntRange(0), default=None,
              help="also train head 0 of this LLM layer to attend to the answer's object")
@click.option("--attend-question", type=click.IntRange(0), default=None,
              help="with --attend: also train head 0 of this LLM layer to attend to the question's expression")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1))
@click.option("--out", type=click.Path(path_type=Path),
              help="result JSON  [default: oracle-HYPOTHESIS-STEPSxBATCH[-...].json in --work]")
def oracle_command(work, hypothesis, steps, seed, n, box, batch_size, tasks, attend, attend_question,
                   threads, out):
    "Train a pilot's language model on ground-truth image tokens and take the pilot's measures."
    try:
        check_attend(box, attend, attend_question)
    except SphinxToolsError as e:
        raise click.UsageError(str(e)) from None
    torch.set_num_threads(threads)
    tasks = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    cfg = oracle_config(work, hypothesis, steps, tasks, batch_size)
    t0 = time.time()
    model, tok, oracle, losses = train_oracle(cfg, box, attend, attend_question)
    minutes = round((time.time() - t0) / 60, 1)
    with torch.inference_mode():
        tf = oracle_quality(model, tok, oracle, seed, n, box)
    res = {"hypothesis": hypothesis, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
           "box": box, "tasks": tasks, "attend": attend, "attend_question": attend_question,
           "llm": {k: getattr(model.cfg, k) for k in ("dim", "n_layers", "n_heads")},
           "train_minutes": minutes, "seed": seed, "scenes": n, **summary(tf),
           "loss_every_50_steps": losses, "teacher_forced": tf}
    out = out or Path(work) / f"oracle-{run_name(hypothesis, cfg, box, tasks, attend, attend_question)}.json"
    out.write_text(json.dumps(res, indent=1))
    click.echo(json.dumps({k: v for k, v in res.items() if k not in ("teacher_forced", "loss_every_50_steps")},
                          indent=1))
