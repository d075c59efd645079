"""Do a demo model's visual encoders learn to read? A words-only encoder warm-up with the pooled
word target (``encoder_warmup.read: text``), then the ``words`` measure of ``sphinx_tools.demo
probe``: a linear probe of each word of fresh scenes from the patch tokens on it and its box size,
next to the box size alone (what a reader of sizes gets).

The OCR task needs tokens that tell the word; this asks an encoder configuration that in a few
minutes, before any language model training is spent on it. Each ``--vision`` is one variant of the
recipe's vision overrides (JSON, merged into them); the first run is the recipe's own.

Run:  .venv/bin/python benchmarks/bench_encoder_reading.py [--shape single-view-staged]
          [--steps 6000] [--vision '{"convnext_depths": [2, 2, 2, 2]}' ...]
          [--out benchmarks/results/encoder_reading.json]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from sphinx_tools import SphinxModel
from sphinx_tools.demo.probe import probe_words
from sphinx_tools.demo.recipe import _changed, base_recipe
from sphinx_tools.demo.synth import write_dataset
from sphinx_tools.tiny import train_tokenizer
from sphinx_tools.train import check_encoder_warmup, init_model
from sphinx_tools.train.data import conversation_text
from sphinx_tools.train.loop import save
from sphinx_tools.train.warmup import warmup_encoders


def run(recipe: dict, vision: dict, work: Path, args) -> dict:
    model_spec = _changed(recipe["model"], {"overrides": {"vision": vision}})
    model, tok = init_model(SimpleNamespace(init={**model_spec, "tokenizer": str(work / "tok.model")}))
    spec = check_encoder_warmup({"coco": "data/coco.json", "images": "data/images", "steps": args.steps,
                                 "batch_size": args.batch_size, "lr": args.lr, "warmup": 100,
                                 "categories": ["word"], "read": "text"}, work)
    t = time.perf_counter()
    losses = warmup_encoders(model, spec, "cpu", progress=True)
    minutes = (time.perf_counter() - t) / 60
    ckpt = work / "ckpt"
    save(model, tok, ckpt)
    probe = probe_words(SphinxModel.from_pretrained(ckpt), args.seed, args.probe_scenes)
    tail = max(1, len(losses) // 20)
    return {"vision": vision, "minutes": round(minutes, 2),
            "loss_first": round(sum(losses[:tail]) / tail, 3), "loss_last": round(sum(losses[-tail:]) / tail, 3),
            "words_probe": probe}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="single-view-staged")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--scenes", type=int, default=4000, help="words scenes the warm-up cycles over")
    ap.add_argument("--probe-scenes", type=int, default=400)
    ap.add_argument("--seed", type=int, default=555, help="the probe's scenes (not trained on)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vision", action="append", default=[], help="JSON vision overrides of a variant")
    ap.add_argument("--out", default="benchmarks/results/encoder_reading.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = base_recipe(args.shape, False)
    if recipe is None:
        raise SystemExit(f"no full recipe for the {args.shape} shape")
    variants = [{}] + [json.loads(v) for v in args.vision]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_dataset(work / "data", args.scenes, seed=0, kinds=("words",), workers=args.threads)
        convs = json.loads((work / "data" / "conversations.json").read_text())
        train_tokenizer(work / "tok.model", 512, corpus=[conversation_text(c["conversations"])[0] for c in convs])
        for vision in variants:
            runs.append(run(recipe, vision, work, args))
            print(json.dumps(runs[-1]), flush=True)
    result = {"about": __doc__.split("\n\n")[0], "shape": args.shape,
              "recipe_vision": recipe["model"]["overrides"]["vision"], "steps": args.steps,
              "batch_size": args.batch_size, "lr": args.lr, "scenes": args.scenes, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
