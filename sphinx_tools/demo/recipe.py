"""The build recipe of the embedded demo model: ``python -m sphinx_tools.demo build``.

::

    python -m sphinx_tools.demo build --work runs/demo

writes the synthetic training set (:mod:`.synth`), trains a SentencePiece tokenizer on its
conversations, writes the training configs and runs the finetuning code (``sphinx_tools.train``
in ``procs`` data-parallel processes; each scene's questions are packed as one-turn prompts that
share the image, ``independent_turns``), one resumable run per stage. The shipped model is the
full recipe of ``SHIPPED_SHAPE`` (``SINGLE_VIEW_READ``); the final checkpoint, its training
configs and its training logs are copied into ``weights/``. ``--scale K --dest DIR`` trains the same model
on K x the scenes and K x the images per step (:func:`scaled_recipe`), for a machine with more
compute.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import yaml

from ..errors import SphinxToolsError
from . import DEMO_DIR
from .synth import LAYOUT_CLASSES, SHAPES

# The SPHINX-1k-shaped recipe (5 views; the model shipped before SINGLE_VIEW_READ), and the base
# every other recipe here changes.
RECIPE = {
    "scenes": 12000,  # steps x procs x batch_size = 12800: a few scenes are seen twice
    "data_seed": 0,
    "turns": 32,  # all of a scene's questions in one record: the image is encoded once per step
    "independent_turns": True,  # ... and each question is trained as a one-turn prompt
    "vocab_size": 1024,
    # "0.41" is one token, and the 101 coordinate tokens start with embeddings that vary smoothly
    # with their value (tiny.init_coordinate_rows_)
    "coordinate_tokens": True,
    "model": {
        "preset": "tiny", "seed": 0,
        # 56-px patches and 4 Q-Former queries: 23 tokens per view, 115 for the 5 views; encoders
        # 96 wide (CLIP, DINOv2, Q-Former vision) and ConvNeXt up to 128 channels
        "overrides": {"dim": 128, "n_layers": 4, "n_heads": 4,
                      "vision": {"patch_size": 56, "qf_queries": 4,
                                 "clip_width": 96, "clip_head_width": 16, "dino_width": 96, "dino_heads": 4,
                                 "qf_vision_width": 96, "qf_vision_heads": 4, "qf_vision_mlp": 192,
                                 "convnext_dims": [16, 32, 64, 128]}},
    },
    "train": {
        # the encoders learn what and where first (train/warmup.py), then stay frozen: on the
        # shapes scenes only, with class targets (so that the LLM can tell the shapes apart) and
        # the box of the object under each patch
        "encoder_warmup": {"coco": "data/coco.json", "images": "data/images", "steps": 1500,
                           "batch_size": 4, "categories": list(SHAPES), "position": True},
        # the LLM's first two layers learn where each patch token's object is in the whole image
        # (train.TokenPlaces): a quadrant view's token only knows its place within the quadrant
        "token_position": {"coco": "data/coco.json", "images": "data/images", "layer": 1, "weight": 10.0},
        "train": ["llm", "proj", "tokens"],
        "steps": 3200,
        "batch_size": 2,  # per process
        "grad_accum": 1,
        "lr": 2.0e-3,
        "min_lr": 5.0e-5,
        "warmup": 100,
        "weight_decay": 0.0,
        "clip": 1.0,
        "max_len": 2560,
        "save_every": 250,
        "log_every": 10,
        "seed": 0,
        "max_minutes": 43,  # a 45-min CPU budget: on a slow machine the guard saves and ends the run
    },
    # data parallel: one-thread processes use 2 cores better than one process with 2 threads
    # (the encoders' small convolutions and attention use a second thread poorly)
    "procs": 2,
}

def _changed(recipe: dict, changes: dict) -> dict:
    "A copy of ``recipe`` with ``changes`` merged in (nested dicts key by key, other values replaced)."
    import copy

    out = copy.deepcopy(recipe)
    for key, value in changes.items():
        out[key] = (_changed(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict)
                    else copy.deepcopy(value))
    return out


# The single-view pilot (``build --shape single-view --pilot``): the same LLM in the SPHINX (224)
# shape, on shapes scenes and their REC and detection questions only. One 224 view, so each patch
# token's ViT position embedding says where it is in the whole image (a SPHINX-1k quadrant token
# only knows its place in its quadrant): no token_position stage. 28-px patches (8 x 8) and 4
# Q-Former queries: 70 image tokens a step instead of 115. Measured by `quality --pilot`.
PILOT = _changed({k: v for k, v in RECIPE.items() if k != "train"}, {
    "kinds": ["shapes"],
    "tasks": ["rec", "detection"],
    "vocab_size": 512,  # the REC and detection texts hold fewer than 1024 pieces
    "model": {"preset": "tiny-224", "overrides": {"vision": {"patch_size": 28}}},
})
PILOT["train"] = _changed({k: v for k, v in RECIPE["train"].items() if k != "token_position"}, {
    "encoder_warmup": {"steps": 1200},
    "steps": 3000,
    "max_minutes": 30,  # the pilot's budget, encoder warm-up included
})
PILOT_SCENES = 48  # fresh shapes scenes (seed 777) that measure a pilot
# The pilot's hypotheses (``--hypothesis NAME``), each a change of PILOT's model overrides and
# training keys (their figures: benchmarks/results/demo_pilot.json):
# - deeper-llm: 6 LLM layers, partly paid for by one Q-Former query instead of 4 (67 image
#   tokens), 2000 steps;
# - token-places: that with the shipped recipe's token_position loss (without it both pilots read
#   y but not x from one-object scenes, which the 5-view model, trained with it, reads on both);
# - object-pointer: that with the object_pointer loss, a signal for picking the named object;
# - what-warmup: token-places with a colour term in a twice longer encoder warm-up (the single
#   view's object patches told colour 50% and shape 74% of the time);
# - NAME-4x, NAME-8x: 4 or 8 x the steps;
# - wider-llm-4x: what-warmup with a twice wider LLM (256, 8 heads of 32) at 8000 steps, its
#   learning rate halved with the width (hidden-layer Adam updates scale with it);
# - two-hop: what-warmup with the object_attention loss on both hops of a referring expression
#   (head 0 of layer 1 attends to the question's expression, head 0 of layer 3 to the object): with
#   ground-truth image tokens (``python -m sphinx_tools.demo oracle``) it is what moved the named
#   object, where more steps, width and vocabulary did not;
# - two-hop-every-4x: two-hop-4x with the object hop trained from both corners of every box of an
#   answer (each box of a detection list, and the second corner), not only the first coordinate.
_DEEPER = {"model": {"n_layers": 6, "vision": {"qf_queries": 1}},
           "train": {"steps": 2000, "max_minutes": 22}}
_PLACES = _changed(_DEEPER, {"train": {"token_position": RECIPE["train"]["token_position"]}})
_POINTER = _changed(_PLACES, {"train": {"object_pointer": {"layer": 3, "weight": 1.0, "width": 32}}})
_WHAT = _changed(_PLACES, {"train": {"encoder_warmup": {"steps": 2400, "attributes": ["color"]}}})


def _times(change: dict, k: int) -> dict:
    "``change`` with k x its 2000 steps (and a time guard that fits them on 2 cores)."
    return _changed(change, {"train": {"steps": 2000 * k, "max_minutes": {4: 30, 8: 50}[k]}})


_WIDER = _changed(_WHAT, {"model": {"dim": 256, "n_heads": 8}, "train": {"lr": 1.0e-3}})
_TWO_HOP = _changed(_WHAT, {"train": {"object_attention": {"layer": 3, "question_layer": 1}}})
HYPOTHESES = {"base": {}, "deeper-llm": _DEEPER, "token-places": _PLACES,
              "object-pointer": _POINTER, "what-warmup": _WHAT,
              "token-places-4x": _times(_PLACES, 4), "object-pointer-4x": _times(_POINTER, 4),
              "what-warmup-8x": _times(_WHAT, 8),
              "wider-llm-4x": _changed(_times(_WIDER, 4), {"train": {"max_minutes": 80}}),
              "two-hop": _TWO_HOP,
              "two-hop-4x": _changed(_times(_TWO_HOP, 4), {"train": {"max_minutes": 40}}),
              "two-hop-every-4x": _changed(_times(_TWO_HOP, 4), {
                  "train": {"max_minutes": 40, "object_attention": {"boxes": "every"}}})}


# The single-view full recipe (``build --shape single-view``): the two-hop pilot's model and
# losses on every scene kind and task, in a 60-min budget on 2 cores. The encoder warm-up sees the
# shapes and document scenes, twice the pilot's steps, so that the shapes get the pilot's share (a
# warm-up over every kind's boxes left the patch tokens telling shape 0.69 of the time, against
# the pilot's 0.91: benchmarks/results/demo_single_view.json); the LLM gets the time left.
SINGLE_VIEW = _changed(RECIPE, {
    "model": {"preset": "tiny-224",
              "overrides": {"n_layers": 6, "vision": {"patch_size": 28, "qf_queries": 1}}},
    "train": {"encoder_warmup": {"steps": 4800, "categories": list(SHAPES) + list(LAYOUT_CLASSES),
                                 "attributes": ["color"]},
              "object_attention": {"layer": 3, "question_layer": 1},
              "steps": 6200,  # 2.2 steps/s measured on 2 cores: about 47 min
              "max_minutes": 58},  # encoder warm-up included
})


# The staged single-view recipe (``build --shape single-view-staged``): SINGLE_VIEW's model,
# scenes and encoder warm-up; the LLM first learns what the two-hop pilot binds (REC and detection
# on the shapes scenes, where the pilot found the named object 0.80 of the time at 2000 steps),
# then every task, with the first stage's records replayed in the mix so that the binding stays;
# the object hop is trained from every box, as in the two-hop-every-4x pilot, and from the text
# that names each box (an OCR word is written before its box: without this nothing made the model
# look at the word while naming it; with it, it names words by their size, all its tokens say of
# them). The shapes and pose scenes also ask detection of several named classes, as a labeling job
# given a category file asks it (``label --categories``): that wording, never trained, found 0.04.
# Each stage is its own resumable run; a later one starts from the last one's checkpoint.
SINGLE_VIEW_STAGED = _changed(SINGLE_VIEW, {
    "class_lists": True,
    "stages": [{"kinds": ["shapes"], "tasks": ["rec", "detection"],
                "train": {"steps": 3000, "max_minutes": 24}}],  # the encoder warm-up included
    "replay": 0.5,  # the last stage's mix: every record, and this share of each earlier stage's
    "train": {"steps": 4600, "max_minutes": 36,  # 2.2 steps/s: about 35 min
              # the object hop from both corners of every box (two-hop-every-4x), and from the
              # words that name each box (an OCR word is read while looking at it)
              "object_attention": {"boxes": "named"}},
})


# The reading single-view recipe (``build --shape single-view-read``): SINGLE_VIEW_STAGED with
# every fused encoder twice as wide, warmed up one and a half times as long, on both its box terms
# and on each OCR word's box and reading it from its pooled tokens (weight 0.1: the tokens told 0.89 of fresh words
# and kept shape 0.91 and their own box to 0.022, against 0.20 / 0.91 / 0.023 for
# SINGLE_VIEW_STAGED's warm-up: benchmarks/results/encoder_gate.json, ``shared-wide-0.1``). The
# wider encoders cost the warm-up about an hour on 2 cores; the guards grow with it.
SINGLE_VIEW_READ = _changed(SINGLE_VIEW_STAGED, {
    "model": {"overrides": {"vision": {"clip_width": 192, "clip_head_width": 16, "dino_width": 192,
                                       "dino_heads": 8, "convnext_dims": [32, 64, 128, 256]}}},
    "stages": [_changed(stage, {"train": {"max_minutes": 100}})  # warm-up (~60 min) included
               for stage in SINGLE_VIEW_STAGED["stages"]],
    "train": {"encoder_warmup": {
                  "steps": 7200, "read": "text", "read_weight": 0.1,
                  "categories": SINGLE_VIEW_STAGED["train"]["encoder_warmup"]["categories"] + ["word"]},
              "max_minutes": 70},  # 1.45 steps/s measured on 2 cores: about 53 min
    # a last run from the every-task stage's weights: every record again, with the pose and words
    # scenes' records twice (data/polish.json), at half the peak learning rate. Against the model
    # without it (seeds 777 / 2027), pose AP 0.012 / 0.021 -> 0.073 / 0.078, OCR 0.20 / 0.19 ->
    # 0.31 / 0.36, layout 0.53 / 0.62 -> 0.63 / 0.67 (benchmarks/results/demo_single_view.json)
    "polish": {"kinds": ["pose", "words"], "ratio": 1.0,
               "train": {"steps": 2400, "lr": 1.0e-3, "warmup": 50,
                         "max_minutes": 45}},  # 1.0-1.2 steps/s on 2 cores: about 39 min
})


def pilot_recipe(hypothesis: str = "base") -> dict:
    "PILOT with the changes of ``HYPOTHESES[hypothesis]`` (its model keys are model overrides)."
    change = HYPOTHESES[hypothesis]
    return _changed(PILOT, {"model": {"overrides": change.get("model", {})},
                            "train": change.get("train", {})})


def base_recipe(shape: str, pilot: bool) -> dict | None:
    "The recipe of a shape (its pilot with ``pilot``), or None where there is none yet."
    return {("sphinx-1k", False): RECIPE, ("single-view", True): PILOT,
            ("single-view", False): SINGLE_VIEW,
            ("single-view-staged", False): SINGLE_VIEW_STAGED,
            ("single-view-read", False): SINGLE_VIEW_READ}.get((shape, pilot))


def scaled_recipe(scale: int, procs: int, recipe: dict = RECIPE) -> dict:
    """The recipe with ``scale`` x the scenes and the images per step (finetuning and encoder
    warm-up), the same steps and learning rates, run by ``procs`` processes: ``scale`` x the
    images seen, for a machine with the compute (a GPU takes a bigger batch in about the time of a
    small one). The global batch is kept whatever ``procs`` is; no ``max_minutes`` guard unless
    ``scale`` is 1 and ``procs`` the recipe's."""
    import copy

    if not isinstance(scale, int) or scale < 1:
        raise SphinxToolsError(f"scale must be a positive integer, got {scale!r}")
    out = copy.deepcopy(recipe)
    base = recipe.get("procs", 1)
    if scale == 1 and procs == base:
        return out
    train = out["train"]
    for spec in (train, train.get("encoder_warmup") or {}):
        if "batch_size" in spec:
            total = spec["batch_size"] * base * scale
            if total % procs:
                raise SphinxToolsError(f"{procs} processes cannot share a global batch of {total} "
                                       f"(scale {scale}); use a divisor of it")
            spec["batch_size"] = total // procs
    out["scenes"] = recipe["scenes"] * scale
    out["procs"] = procs
    train["max_minutes"] = None
    for stage in [*out.get("stages", ()), *([out["polish"]] if out.get("polish") else [])]:
        stage["train"]["max_minutes"] = None  # a stage's batch is the scaled one; its guard goes too
    return out


def write_training_files(work: Path, recipe: dict = RECIPE, progress: bool = True,
                         workers: int = 1) -> list[Path]:
    """Synthetic data, tokenizer and training configs of the recipe (each unless written
    already); returns the config paths, one per stage in training order (``train.yaml`` last).

    ``workers`` processes render the scenes (the files do not depend on it)."""
    work.mkdir(parents=True, exist_ok=True)
    _write_scenes(work / "data", recipe, progress, workers)
    for k, stage in enumerate(recipe.get("stages", ()), 1):
        _write_stage_records(work / "data", stage, work / "data" / f"stage{k}.json")
    if recipe.get("polish"):
        _write_stage_records(work / "data", recipe["polish"], work / "data" / "polish.json")
    paths = []
    for name, config in training_configs(recipe):
        paths.append(work / name)
        paths[-1].write_text(yaml.safe_dump(config, sort_keys=False))
    _write_tokenizer(work, recipe)
    return paths


def training_config(recipe: dict) -> dict:
    "The training config of a recipe (its last stage's), its paths relative to the work folder."
    return training_configs(recipe)[-1][1]


def training_configs(recipe: dict) -> list[tuple[str, dict]]:
    """``(file name, training config)`` of each stage of a recipe, in training order: one
    ``train_stageK.yaml`` per entry of ``recipe["stages"]`` (its records ``data/stageK.json``,
    its training keys merged into the recipe's), then ``train.yaml``, then, where the recipe has a
    ``polish`` run, ``train_polish.yaml``: every record once more, with ``polish["ratio"]`` x
    those of its kinds (``data/polish.json``) on top. Only the first stage warms the encoders up;
    each later one starts from the checkpoint of the one before, and ``train.yaml``'s mix replays
    ``recipe["replay"]`` x each earlier stage's records."""
    def data(path: str, ratio: float) -> dict:
        return {"path": path, "root": "data", "ratio": ratio,
                "independent_turns": recipe["independent_turns"]}

    stages = recipe.get("stages", ())
    runs = [(f"train_stage{k}.yaml", f"run_stage{k}", [data(f"data/stage{k}.json", 1.0)],
             _changed(recipe["train"], stage.get("train", {}))) for k, stage in enumerate(stages, 1)]
    replay = [data(f"data/stage{k}.json", recipe["replay"]) for k in range(1, len(stages) + 1)]
    runs.append(("train.yaml", "run", [data("data/conversations.json", 1.0), *replay],
                 dict(recipe["train"])))
    polish = recipe.get("polish")
    if polish:
        runs.append(("train_polish.yaml", "run_polish",
                     [data("data/conversations.json", 1.0), data("data/polish.json", polish["ratio"])],
                     _changed(recipe["train"], polish["train"])))
    out, init = [], {**recipe["model"], "tokenizer": "tokenizer.model"}
    for k, (name, run, mix, train) in enumerate(runs):
        if k:
            train.pop("encoder_warmup", None)
        out.append((name, {"init": init, "data": mix, "out": run, **train}))
        init = {"checkpoint": f"{run}/last"}
    return out


def _write_stage_records(data: Path, stage: dict, path: Path):
    """The records of a stage: the scenes of ``stage["kinds"]`` (every kind if absent) with only the
    questions of ``stage["tasks"]`` (every task if absent); a scene left without any is dropped."""
    if path.is_file():
        return
    kinds = stage.get("kinds")
    tasks = stage.get("tasks")
    images = json.loads((data / "coco.json").read_text())["images"]
    kind_of = {im["file_name"]: im["kind"] for im in images}
    out = []
    for rec in json.loads((data / "conversations.json").read_text()):
        if kinds is not None and kind_of[Path(rec["image"]).name] not in kinds:
            continue
        keep = [i for i, t in enumerate(rec["tasks"]) if tasks is None or t in tasks]
        if keep:
            pairs = rec["conversations"]
            out.append({**rec, "conversations": [t for i in keep for t in pairs[2 * i:2 * i + 2]],
                        "tasks": [rec["tasks"][i] for i in keep],
                        "options": [rec["options"][i] for i in keep]})
    if not out:
        raise SphinxToolsError(f"stage {stage} keeps no question of the scenes in {data}")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(path)


def _write_scenes(data: Path, recipe: dict, progress: bool, workers: int):
    "The recipe's synthetic scenes in ``data``, unless a previous run of this build wrote them."
    from .synth import write_dataset

    scenes = recipe["scenes"]
    if not (data / "conversations.json").is_file():
        kinds = {"kinds": recipe["kinds"]} if "kinds" in recipe else {}
        write_dataset(data, scenes, seed=recipe["data_seed"], turns=recipe["turns"], progress=progress,
                      workers=workers, tasks=recipe.get("tasks"),
                      class_lists=recipe.get("class_lists", False), **kinds)
    have = len(json.loads((data / "coco.json").read_text())["images"])
    if have != scenes:  # a resumed build must not train on another build's scenes
        raise SphinxToolsError(f"{data} holds {have} scenes, this build wants {scenes}: "
                               "use a fresh --work folder")


def _write_tokenizer(work: Path, recipe: dict):
    "A SentencePiece tokenizer trained on the scenes' conversations, unless written already."
    from ..tiny import train_tokenizer
    from ..train.data import conversation_text

    tok = work / "tokenizer.model"
    if not tok.is_file():
        convs = json.loads((work / "data" / "conversations.json").read_text())
        corpus = [conversation_text(c["conversations"])[0] for c in convs]
        train_tokenizer(tok, recipe["vocab_size"], corpus=corpus,
                        coordinate_tokens=recipe.get("coordinate_tokens", False))


def install(checkpoint: Path, dest: Path = DEMO_DIR) -> Path:
    """Copy a trained checkpoint (weights, tokenizer, config, meta; no optimizer state) to ``dest``,
    with the task options its scenes ask in (``task_options.json``)."""
    from ..checkpoint import write_task_options
    from .synth import TRAINED_TASK_OPTIONS

    dest.mkdir(parents=True, exist_ok=True)
    for f in checkpoint.iterdir():
        if f.name.startswith("consolidated.") or f.name in ("tokenizer.model", "config.json", "meta.json"):
            shutil.copyfile(f, dest / f.name)
    write_task_options(dest, TRAINED_TASK_OPTIONS)
    return dest


SHIPPED_SHAPE = "single-view-read"  # the shape whose full recipe trained sphinx_tools/demo/weights


@click.group()
def cli():
    "Build and measure the embedded demo model."


@cli.command()
@click.option("--work", default="runs/demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--dest", default=str(DEMO_DIR), show_default=True, type=click.Path(path_type=Path))
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1),
              help="CPU cores to use (shared by the recipe's training processes)")
@click.option("--scale", default=1, show_default=True, type=click.IntRange(1),
              help="train on SCALE x the scenes with SCALE x the images per step (same steps); "
                   "not the shipped recipe unless 1, so it needs --dest")
@click.option("--device", default="auto", show_default=True,
              help="auto (the GPUs where CUDA is, else the CPU), cpu or cuda; the recipe is a CPU one")
@click.option("--procs", default=None, type=click.IntRange(1),
              help="training processes  [default: one per GPU on CUDA, else the recipe's]")
@click.option("--loader-workers", default=0, show_default=True, type=click.IntRange(0),
              help="processes preparing batches (GPU runs: 4-16; the batches are the same)")
@click.option("--shape", default=SHIPPED_SHAPE, show_default=True,
              type=click.Choice(["sphinx-1k", "single-view", "single-view-staged", "single-view-read"]),
              help="the model's shape: SPHINX-1k (5 views) or SPHINX (one 224 view; -staged: "
                   "trained on shapes REC and detection first, then every task; -read: -staged with "
                   "wider encoders that also learn to read words, the shipped model)")
@click.option("--pilot", is_flag=True,
              help="the shape's pilot (PILOT: shapes scenes, REC and detection; measure it with "
                   "`quality --pilot`); needs --dest")
@click.option("--hypothesis", default="base", show_default=True, type=click.Choice(list(HYPOTHESES)),
              help="with --pilot: the pilot's model changes (HYPOTHESES)")
def build(work, dest, threads, device, scale, procs, loader_workers, shape, pilot, hypothesis):
    "Generate data, train the tokenizer and the model, install the result."
    import torch

    from ..train import TrainConfig, train_device, train_local

    base = base_recipe(shape, pilot)
    if hypothesis != "base":
        if not pilot:
            raise click.UsageError("--hypothesis is a pilot's: add --pilot")
        base = pilot_recipe(hypothesis)
    if base is None:
        raise click.UsageError(f"no {'pilot' if pilot else 'full recipe'} for the {shape} shape yet")
    try:
        cuda = train_device(device).type == "cuda"
    except SphinxToolsError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    if procs is None:
        procs = torch.cuda.device_count() if cuda else base.get("procs", 1)
    recipe = scaled_recipe(scale, procs, base)
    if recipe != base_recipe(SHIPPED_SHAPE, False) and Path(dest).resolve() == DEMO_DIR.resolve():
        raise click.UsageError("a build with another --scale, --procs or --shape than the recipe's, or a "
                               "--pilot, is not the shipped model: give it its own --dest")
    configs = write_training_files(work, recipe, workers=threads)  # resumes if interrupted
    runs = []
    for config in configs:  # a finished stage's run returns at once
        cfg = TrainConfig.load(config)
        cfg.num_threads = max(1, threads // procs)
        cfg.loader_workers = loader_workers
        cfg.device = device
        ckpt = train_local(cfg, procs)
        runs.append(Path(cfg.out))
    install(ckpt, dest)
    for stale in [*dest.glob("train*.yaml"), *dest.glob("train*_log.jsonl")]:
        stale.unlink()
    for config, out in zip(configs, runs):  # the training configs and logs travel with the weights
        shutil.copyfile(config, dest / config.name)
        log = out.parent / f"{out.name}_log.jsonl"
        if log.is_file():  # train_log.jsonl, train_stageK_log.jsonl
            shutil.copyfile(log, dest / f"{config.stem}_log.jsonl")
    click.echo(f"installed demo model at {dest}")
    if pilot:
        click.echo(f"measure it: python -m sphinx_tools.demo quality --pilot --checkpoint {dest} "
                   f"--n {PILOT_SCENES} (writes {Path(dest) / 'pilot.json'})")


if __name__ == "__main__":
    cli()
