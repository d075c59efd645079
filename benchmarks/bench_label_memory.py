"""Peak memory of ``sphinx-tools label`` on large images against ordinary ones.

Run:  .venv/bin/python benchmarks/bench_label_memory.py [--key after]
          [--out benchmarks/results/label_memory.json]

Each arm runs ``sphinx-tools label`` in a fresh process (CPU, the tiny random-weight checkpoint,
one short caption per image, the default batch size and reading threads) on a folder of PNGs
and reads the process's peak resident memory (``ru_maxrss`` from ``wait4``):

- ``small``: ``--count`` PNGs of 320x240;
- ``large``: ``--count`` PNGs of ``--side`` x ``--side`` (under ``--max-pixels``).

The difference is what the images cost. Labeling holds each decoded image only as the model's
input tensor (and, with SAM, a copy at SAM's input size), so ``large`` should stay near ``small``
instead of growing with the images' pixels. The results are stored under ``--key`` in the JSON
file (other keys are kept), e.g. ``before`` from a checkout without that change (run with its
tree first on ``PYTHONPATH``) and ``after``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder: Path, count: int, size: tuple[int, int]) -> None:
    "``count`` PNGs with some structure (gradients, a block per image), quick to write."
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    base = np.zeros((h, w, 3), np.uint8)
    base[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
    base[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    for i in range(count):
        image = base.copy()
        image[(i * h) // (2 * count): h // 2 + (i * h) // (2 * count), w // 4: w // 2, 2] = 255
        Image.fromarray(image).save(folder / f"{i:03d}.png", compress_level=1)


def peak_rss(command: list[str], cwd: Path) -> tuple[float, float, int, str]:
    "Run ``command``; ``(peak RSS in MB, wall seconds, exit code, last output)``."
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return (usage.ru_maxrss / 1024, time.perf_counter() - t0, proc.returncode,
            output.strip().splitlines()[-1] if output.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=6, help="images per arm")
    parser.add_argument("--side", type=int, default=6000, help="side of the large images")
    parser.add_argument("--key", default="after", help="where the results go in the JSON file")
    parser.add_argument("--note", help="a note stored with the results (what code was run)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "label_memory.json")
    args = parser.parse_args()

    from sphinx_tools import make_tiny_checkpoint
    from sphinx_tools.pipelines.autolabel import engine

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = make_tiny_checkpoint(tmp / "ckpt", seed=1)
        arms = {"small": (320, 240), "large": (args.side, args.side)}
        results = {}
        for name, size in arms.items():
            write_images(tmp / name, args.count, size)
            command = [sys.executable, "-m", "sphinx_tools.cli", "label", str(tmp / name),
                       "-c", str(ckpt), "--out", str(tmp / f"{name}.json"), "--tasks",
                       "caption", "--max-gen-len", "4", "--no-progress"]
            rss, seconds, code, last = peak_rss(command, tmp)
            if code != 0:
                raise SystemExit(f"label on {name} images failed ({code}): {last}")
            results[name] = {"images": args.count, "size": list(size),
                             "megapixels_per_image": round(size[0] * size[1] / 1e6, 3),
                             "peak_rss_mb": round(rss, 1), "seconds": round(seconds, 1)}
        results["large_minus_small_mb"] = round(results["large"]["peak_rss_mb"]
                                                - results["small"]["peak_rss_mb"], 1)
        results["held_images"] = hasattr(engine.Labeler, "hold")  # this change in the code run
        if args.note:
            results["note"] = args.note
    stored = json.loads(args.out.read_text()) if args.out.is_file() else {}
    stored["config"] = {"python": platform.python_version(), "machine": platform.machine(),
                        "cpus": os.cpu_count(), "model": "tiny random checkpoint, CPU",
                        "task": "caption, --max-gen-len 4, default --batch-size 8, --workers 2"}
    stored[args.key] = results
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(stored, indent=2) + "\n")
    print(json.dumps({args.key: results}, indent=2))


if __name__ == "__main__":
    main()
