"""Would a change of the demo recipe's encoder warm-up keep what the box answers need and add
reading? Each variant runs the staged recipe's own encoder warm-up (its scenes, data parallel as
the build runs it) with the variant's ``encoder_warmup`` keys merged in, then the token probes of
``sphinx_tools.demo probe`` on fresh scenes: ``words`` (the word from its pooled tokens, next to
its box size alone), ``what`` (colour and shape of each object patch) and ``own_box`` (each global
patch token's own object corner, next to its grid place alone).

A full build takes about an hour; this asks the encoders alone in a third of that. The LLM later
reads these tokens through a projection it trains, so a build's own probe differs a little.

Run:  .venv/bin/python benchmarks/bench_encoder_gate.py [--work runs/encoder_gate]
          [--variant NAME='{"read": "text", "read_branch": "dinov2", ...}' ...]
          [--out benchmarks/results/encoder_gate.json]

A variant's keys are ``encoder_warmup`` keys, and ``vision``: overrides of the encoders' widths
(e.g. ``{"dino_width": 192}``). With no ``--variant``, the recipe's warm-up alone. A variant measured already (its name in
``--out`` with the same keys) is kept, so an interrupted run goes on where it stopped.
"""

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import yaml

from sphinx_tools import SphinxModel
from sphinx_tools.demo.probe import probe_own_box, probe_what, probe_words
from sphinx_tools.demo.recipe import _changed, base_recipe, write_training_files
from sphinx_tools.train import TrainConfig, train_local


def variant(text: str) -> tuple[str, dict]:
    name, _, keys = text.partition("=")
    try:
        return name, json.loads(keys)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: NAME='{{JSON keys}}' ({e})") from None


def run(work: Path, stage1: dict, name: str, keys: dict, args) -> dict:
    cfg = copy.deepcopy(stage1)
    cfg.update(out=f"run_{name}", steps=1, max_minutes=None)  # the warm-up, then one LLM step
    cfg["encoder_warmup"].update({k: v for k, v in keys.items() if k != "vision"})
    if "vision" in keys:  # encoder widths: the model's vision overrides
        cfg["init"] = _changed(cfg["init"], {"overrides": {"vision": keys["vision"]}})
    path = work / f"gate_{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t = time.perf_counter()
    train_cfg = TrainConfig.load(path)
    train_cfg.num_threads = max(1, args.threads // args.procs)
    ckpt = train_local(train_cfg, args.procs)
    minutes = (time.perf_counter() - t) / 60
    torch.set_num_threads(args.threads)
    model = SphinxModel.from_pretrained(ckpt)
    own = probe_own_box(model, args.seed, args.scenes)["global"]
    what = probe_what(model, args.seed, args.scenes)
    return {"keys": keys, "warmup": cfg["encoder_warmup"], "vision": cfg["init"]["overrides"]["vision"],
            "minutes": round(minutes, 1),
            "words": probe_words(model, args.seed, args.scenes),
            "color_accuracy_on_objects": what["color_accuracy_on_objects"],
            "shape_accuracy_on_objects": what["shape_accuracy_on_objects"],
            "own_box_corner_mae": own["corner_mae"],
            "own_box_corner_mae_from_grid_place": own["corner_mae_from_grid_place"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="single-view-staged")
    ap.add_argument("--work", type=Path, default=Path("runs/encoder_gate"))
    ap.add_argument("--variant", type=variant, action="append", default=[],
                    help="NAME='{JSON encoder_warmup keys, and vision overrides}'")
    ap.add_argument("--scenes", type=int, default=400, help="fresh scenes of each probe")
    ap.add_argument("--seed", type=int, default=555, help="the probes' scenes (not trained on)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/encoder_gate.json"))
    args = ap.parse_args()
    recipe = base_recipe(args.shape, False)
    if recipe is None or not recipe["train"].get("encoder_warmup"):
        raise SystemExit(f"no full recipe with an encoder warm-up for the {args.shape} shape")
    stage1 = yaml.safe_load(write_training_files(args.work, recipe, workers=args.threads)[0].read_text())
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if result.get("shape") != args.shape:
        result = {"about": __doc__.split("\n\n")[0], "shape": args.shape, "probe_seed": args.seed,
                  "probe_scenes": args.scenes, "runs": {}}
    for name, keys in args.variant or [("recipe", {})]:
        if result["runs"].get(name, {}).get("keys") == keys:
            continue
        result["runs"][name] = run(args.work, stage1, name, keys, args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))  # each variant as it ends
        print(name, json.dumps(result["runs"][name]), flush=True)


if __name__ == "__main__":
    main()
