"""The demo model's label quality through the public CLI, as a user measures it on a fresh
generator seed: ``sphinx-tools synth`` (one dataset per scene kind), ``sphinx-tools label`` (with
``--categories`` from the dataset, REC from its ``rec.json``) and ``sphinx-tools evaluate --json``.

Run:  .venv/bin/python benchmarks/bench_demo_cli.py [--seeds 31337 4242] [--n 48]
      [--checkpoint demo] [--out benchmarks/results/demo_cli.json]

Each seed's measures are detection AP50, REC Acc@0.5, pose keypoint AP (and PCK@0.1), OCR text
accuracy and layout AP50, the five targets of ``python -m sphinx_tools.demo quality``, which
measures the same model on its own seed with the same engine; this one runs the commands.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sphinx_tools.demo.quality import TARGETS

# kind -> (label input, tasks, evaluate ground truth, [(measure, metrics key path)])
JOBS = {
    "shapes": ("coco.json", "detection", "coco.json", [("detection_ap50", ("bbox", "AP50"))]),
    "rec": ("rec.json", "rec", "rec.json", [("rec_acc50", ("rec", "accuracy"))]),
    "pose": ("coco.json", "detection,pose", "coco.json",
             [("pose_keypoint_ap", ("keypoints", "AP")), ("pose_pck@0.1", ("pck", "pck@0.1"))]),
    "words": ("coco.json", "ocr", "coco.json", [("ocr_word_accuracy", ("text", "accuracy"))]),
    "document": ("coco.json", "layout", "coco.json", [("layout_ap50", ("bbox", "AP50"))]),
}


def cli(*args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    run = subprocess.run([sys.executable, "-m", "sphinx_tools.cli", *map(str, args)], env=env,
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"sphinx-tools {' '.join(map(str, args))} failed:\n{run.stderr[-2000:]}")


def measure(seed: int, n: int, checkpoint: str, tmp: Path) -> dict:
    out = {}
    for job, (src, tasks, gt, keys) in JOBS.items():
        kind = "shapes" if job == "rec" else job
        data = tmp / f"{kind}_{seed}"
        if not data.exists():
            cli("synth", data, "--n", n, "--seed", seed, "--kinds", kind)
        labels, metrics = tmp / f"{job}_{seed}.json", tmp / f"{job}_{seed}_metrics.json"
        extra = [] if job == "rec" else ["--categories", data / "coco.json"]
        cli("label", data / src, "--checkpoint", checkpoint, "--tasks", tasks, "--out", labels,
            "--no-progress", *extra)
        cli("evaluate", labels, data / gt, "--json", metrics)
        scored = json.loads(metrics.read_text())
        for name, (group, key) in keys:
            out[name] = round((scored.get(group) or {}).get(key, 0.0), 4)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[31337, 4242])
    ap.add_argument("--n", type=int, default=48, help="scenes per kind")
    ap.add_argument("--checkpoint", default="demo")
    ap.add_argument("--out", default="benchmarks/results/demo_cli.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        seeds = {str(s): measure(s, args.n, args.checkpoint, Path(tmp)) for s in args.seeds}
    result = {"checkpoint": args.checkpoint, "scenes_per_kind": args.n, "seeds": seeds,
              "targets": TARGETS,
              "met_on_every_seed": {k: all(m[k] >= v for m in seeds.values())
                                    for k, v in TARGETS.items()},
              "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
