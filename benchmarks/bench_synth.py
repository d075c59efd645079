"""Synthetic-scene generator throughput: scenes/s writing a full dataset.

Run:  .venv/bin/python benchmarks/bench_synth.py [--n 1000] [--out benchmarks/results/synth.json]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from sphinx_tools.demo import synth


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", default="benchmarks/results/synth.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        synth.write_dataset(Path(tmp), args.n, seed=0, progress=False)
        dt = time.perf_counter() - t
    result = {"scenes": args.n, "seconds": dt, "scenes_per_s": args.n / dt}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
