"""Auto-labeling benchmark: multi-task labeling with shared work vs independent ``generate`` calls.

Run:  .venv/bin/python benchmarks/bench_autolabel.py [--out benchmarks/results/autolabel.json]

Both arms run the full ``label_dataset`` loop (read, hash, decode, generate, parse, durable log
write) with the same tiny SPHINX-1k-shaped random-weight model on CPU, the same images, tasks
and greedy settings:

- ``shared``: ``Labeler`` with ``model.generate_multi`` (each image encoded once, its common
  prompt prefix prefilled once, every question of every image in the batch decoded together);
- ``independent``: the same ``Labeler`` over ``SequentialModel`` (one ``generate`` call per
  question: the image encoded and the whole prompt prefilled for every task).

Targets: ``shared`` >= 3x the images/s of ``independent`` with >= 5 tasks per image (8 images
x 6 tasks, the defaults), >= 4x with 4 images x 5 tasks (``--images 4 --tasks 5``), and identical
labels. The breakdown splits generation into image encoding, prefill and decode
(timed by wrapping the runtime's functions) and adds parse, write and image loading.

Both arms first run once untimed (the shapes they will see, so first-call costs are not timed),
then ``--repeats`` times, interleaved (shared, independent, independent, shared, ...) so that
load from other processes falls on both; figures are medians, the speedup the median of the
per-pair ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import sphinx_tools.generate as gen
from sphinx_tools import SphinxModel, make_tiny_checkpoint
from sphinx_tools.pipelines.autolabel import Labeler, label_dataset, open_source
from sphinx_tools.pipelines.autolabel.engine import SequentialModel
from sphinx_tools.pipelines.autolabel.worklog import WorkLog, log_dir_for
from sphinx_tools.demo.synth import write_dataset

TASKS = ["detection", "ocr", "caption", "layout", "grounded_caption", "relation"]


class Sections:
    "Times the runtime's image encoder, prefill and decode steps while active."

    def __init__(self, model: SphinxModel):
        self.model, self.seconds = model, {"encode": 0.0, "prefill": 0.0, "decode": 0.0}

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        return timed

    @contextmanager
    def active(self):
        saved = (gen.prefill, gen.decode_one_token, gen.SharedRows.refill, gen.SharedRows.step,
                 self.model.encode_images)
        gen.prefill = self._wrap("prefill", saved[0])  # prompts, or shared prefixes
        gen.decode_one_token = self._wrap("decode", saved[1])
        gen.SharedRows.refill = self._wrap("prefill", saved[2])  # the prompts after a prefix
        gen.SharedRows.step = self._wrap("decode", saved[3])
        self.model.encode_images = self._wrap("encode", saved[4])
        try:
            yield self
        finally:
            gen.prefill, gen.decode_one_token, gen.SharedRows.refill, gen.SharedRows.step = \
                saved[:4]
            del self.model.encode_images


def run_arm(model, wrapped, source, out: Path, batch_size: int, max_gen_len: int,
            limit: int | None = None, tasks=TASKS) -> dict:
    labeler = Labeler(wrapped, tasks, max_gen_len=max_gen_len, model_id="bench")
    with Sections(model).active() as sections:
        summary = label_dataset(labeler, source, out, batch_size=batch_size, progress=False,
                                limit=limit, workers=1)
    s = summary.sections
    generate = s.get("generate", 0.0)
    breakdown = {**{k: round(v, 3) for k, v in sections.seconds.items()},
                 "generate_other": round(generate - sum(sections.seconds.values()), 3),
                 "parse": round(s.get("parse", 0.0), 3), "write": round(s.get("write", 0.0), 3),
                 "load_wait": round(s.get("load", 0.0), 3)}
    return {"images": summary.labeled, "seconds": round(summary.seconds, 3),
            "images_per_s": round(summary.images_per_s, 3), "breakdown_s": breakdown}


def median_arm(runs: list[dict]) -> dict:
    "Median of each figure over repeated runs of one arm."
    med = lambda xs: round(statistics.median(xs), 3)  # noqa: E731
    return {"images": runs[0]["images"], "seconds": med([r["seconds"] for r in runs]),
            "images_per_s": med([r["images_per_s"] for r in runs]),
            "breakdown_s": {k: med([r["breakdown_s"][k] for r in runs])
                            for k in runs[0]["breakdown_s"]},
            "seconds_each": [r["seconds"] for r in runs]}


def results_of(out: Path) -> list:
    records = WorkLog(log_dir_for(out)).records()
    return sorted((r["file_name"], r["task"], json.dumps(r["result"], sort_keys=True))
                  for r in records)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/autolabel.json")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-gen-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tasks", type=int, default=len(TASKS), help=f"the first N of {TASKS}")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each arm, interleaved")
    args = ap.parse_args()
    tasks = TASKS[:args.tasks]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = SphinxModel.from_pretrained(make_tiny_checkpoint(tmp / "ckpt", variant="sphinx-1k"))
        write_dataset(tmp / "data", args.images, seed=0, progress=False)
        source = open_source(tmp / "data" / "images")
        arms = {"shared": (model, args.batch_size),
                "independent": (SequentialModel(model), 1)}
        runs = {name: [] for name in arms}
        labels = set()
        for r in range(-1, args.repeats):  # r = -1: untimed warm-up of both arms
            order = list(arms) if r % 2 else list(arms)[::-1]
            for name in order:
                wrapped, batch_size = arms[name]
                out = tmp / f"{name}-{r}.json"
                run = run_arm(model, wrapped, source, out, batch_size, args.max_gen_len,
                              tasks=tasks)
                labels.add(json.dumps(results_of(out)))
                if r >= 0:
                    runs[name].append(run)
        shared, independent = median_arm(runs["shared"]), median_arm(runs["independent"])
        ratios = [s["images_per_s"] / i["images_per_s"]
                  for s, i in zip(runs["shared"], runs["independent"])]
        identical = len(labels) == 1
    result = {
        "config": {"model": "tiny sphinx-1k (random weights)", "image_size": model.cfg.image_size,
                   "tasks": tasks, "images": args.images, "batch_size": args.batch_size,
                   "max_gen_len": args.max_gen_len, "threads": args.threads, "device": "cpu",
                   "repeats": args.repeats,
                   "torch": torch.__version__, "python": platform.python_version()},
        "shared": shared,
        "independent": independent,
        "speedup": round(statistics.median(ratios), 2),
        "speedup_each": [round(x, 2) for x in ratios],
        "identical_labels": identical,
        "target": ">= 3x images/s with identical greedy labels (>= 4x for 4 images x 5 tasks)",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
