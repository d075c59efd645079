"""Runtime benchmark: prefill and decode throughput, decode cost vs position, load time and memory.

Run:  .venv/bin/python benchmarks/bench_runtime.py [--out benchmarks/results/runtime.json]
      [--parts all|moe]   (``moe`` measures only the MoE line and updates it in --out)

Uses the "small" preset (dim 512, 8 layers, 8 heads, vocab 32000, tiny encoders) with random
weights on CPU, and a checkpoint of the same LLM widths (tokenizer-sized vocab) for loading.
The MoE line runs the SPHINX-MoE code (sparse top-2 of 8 experts) at the same small widths
against a dense model with the same active parameters (one SwiGLU of twice the expert width).
Targets: batch-8 decode throughput >= 4x batch-1; the 500th token costs <= 1.5x the 10th; load
peak RSS <= 1.2x the weight bytes; an MoE decode step <= 1.5x the dense step at batch 1 and 8.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sphinx_tools import SphinxConfig, SphinxModel, make_tiny_checkpoint
from sphinx_tools.generate import decode_stream, make_batch, prefill


def rows(model: SphinxModel, batch: int, length: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        ids = torch.randint(3, model.cfg.vocab_size, (1, length), generator=g)
        with torch.inference_mode():
            out.append(model.transformer.tok_embeddings(ids)[0])
    return out


def bench_prefill(model: SphinxModel, length: int, repeats: int = 3) -> float:
    r = rows(model, 1, length)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.inference_mode():
            prefill(model.transformer, make_batch(model.transformer, r, 8))
        times.append(time.perf_counter() - t)
    return length / min(times)


def step_times(model: SphinxModel, batch: int, prompt_len: int, n: int) -> list[float]:
    "Wall time of each decode step (the first yield includes prefill and is dropped)."
    times, last = [], None
    for _ in decode_stream(model.transformer, rows(model, batch, prompt_len), n):
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    return times


def bench_decode(model: SphinxModel) -> dict:
    out = {}
    for b in (1, 8):
        t = step_times(model, b, 16, 64)
        out[f"decode_tok_s_batch{b}"] = b / statistics.median(t[8:])
    out["batch8_over_batch1"] = out["decode_tok_s_batch8"] / out["decode_tok_s_batch1"]
    t = step_times(model, 1, 4, 510)
    at10 = statistics.median(t[6:14])
    at500 = statistics.median(t[492:502])
    out.update(step_ms_pos10=at10 * 1e3, step_ms_pos500=at500 * 1e3, pos500_over_pos10=at500 / at10)
    return out


LOAD_SNIPPET = r"""
import json, sys, threading, time, torch, psutil
from sphinx_tools import SphinxConfig, SphinxModel
from sphinx_tools.dist import init_model_parallel
from sphinx_tools.checkpoint import build_meta
init_model_parallel()
build_meta(SphinxConfig.from_name("tiny"))  # imports the encoder libraries before the baseline
torch.set_num_threads(1)
proc = psutil.Process()
base = proc.memory_info().rss
peak = [base]
def sample():  # RSS sampled every millisecond while loading
    while True:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.001)
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
m = SphinxModel.from_pretrained(sys.argv[1])
dt = time.perf_counter() - t
time.sleep(0.01)
kept = sum(p.numel() * p.element_size() for p in m.transformer.parameters())
print(json.dumps(dict(load_s=dt, weight_bytes=kept, rss_before=base, peak_rss=peak[0],
                      peak_over_weights=(peak[0] - base) / kept)))
"""


def bench_load(tmp: Path) -> dict:
    out = {}
    for mp in (1, 2):
        ckpt = make_tiny_checkpoint(tmp / f"small-mp{mp}", mp=mp, dim=512, n_layers=8, n_heads=8,
                                    multiple_of=256)
        res = subprocess.run([sys.executable, "-c", LOAD_SNIPPET, str(ckpt)], capture_output=True,
                             text=True, check=True)
        out[f"checkpoint_mp{mp}"] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


ENCODE_SNIPPET = r"""
import json, os, sys, time, statistics, torch
from sphinx_tools import SphinxModel
from sphinx_tools.dist import init_local_world
torch.set_num_threads(1)
init_local_world(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[3])
m = SphinxModel.from_pretrained(sys.argv[1])  # one model-parallel rank per process of the world
images = torch.randn(int(sys.argv[2]), 3, m.cfg.image_size, m.cfg.image_size)
times = []
for _ in range(6):
    t = time.perf_counter()
    m.encode_images(images)
    times.append(time.perf_counter() - t)
if int(os.environ["RANK"]) == 0:
    print(json.dumps(dict(encode_ms=statistics.median(times[1:]) * 1e3)))
"""


def bench_encode_mp(tmp: Path, images: int = 4) -> dict:
    """Image encoding (SPHINX-1k's 5 views per image) with 1 and 2 model-parallel processes of one
    thread each: the encoders are replicated, and each rank encodes its share of the views."""
    ckpt = make_tiny_checkpoint(tmp / "enc", variant="sphinx-1k")
    out = {"images": images, "views": images * 5}
    for mp in (1, 2):
        store = tmp / f"store-mp{mp}"  # the processes meet in this file: no port
        env = lambda r: {**os.environ, "RANK": str(r), "WORLD_SIZE": str(mp), "LOCAL_RANK": str(r),
                         "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, "-c", ENCODE_SNIPPET, str(ckpt), str(images),
                                   str(store)], env=env(r), stdout=subprocess.PIPE, text=True)
                 for r in range(mp)]
        outs = [p.communicate()[0] for p in procs]
        out[f"encode_ms_mp{mp}"] = json.loads(outs[0].strip().splitlines()[-1])["encode_ms"]
    out["mp2_speedup"] = out["encode_ms_mp1"] / out["encode_ms_mp2"]
    return out


MOE_EXPERT_WIDTH = 768  # the dense twin's SwiGLU is 2 x 768 = 1536 wide (= 2 active experts)


def bench_moe() -> dict:
    """Decode tokens/s at batch 1 and 8 and prefill tokens/s of a small SPHINX-MoE (8 experts of
    768, top-2) and of a dense twin with the same active parameters (SwiGLU 1536), same attention
    (8 heads, 2 K/V heads); step time ratios MoE / dense."""
    small = dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=32000, vision="tiny")
    moe_cfg = SphinxConfig.from_name("tiny-moe", **small, hidden_dim=MOE_EXPERT_WIDTH,
                                     moe=dict(num_experts=8, num_experts_per_tok=2))
    dense_cfg = SphinxConfig.from_name("tiny-224", **small, multiple_of=2 * MOE_EXPERT_WIDTH)
    assert dense_cfg.ffn_hidden == 2 * MOE_EXPERT_WIDTH
    out = {"config": {**{k: v for k, v in small.items() if k != "vision"},
                      "experts": 8, "top_k": 2, "expert_width": MOE_EXPERT_WIDTH,
                      "dense_ffn_width": dense_cfg.ffn_hidden}}
    for name, cfg in (("moe", moe_cfg), ("dense", dense_cfg)):
        model = SphinxModel.from_config(cfg, device="cpu")
        llm = sum(p.numel() for n, p in model.transformer.named_parameters()
                  if n.startswith("layers."))
        line = {"layer_params": llm, "prefill_tok_s_len512": bench_prefill(model, 512)}
        for b in (1, 8):
            t = step_times(model, b, 16, 48)
            line[f"decode_step_ms_batch{b}"] = statistics.median(t[8:]) * 1e3
            line[f"decode_tok_s_batch{b}"] = b / statistics.median(t[8:])
        out[name] = line
    for b in (1, 8):
        out[f"moe_over_dense_step_batch{b}"] = (out["moe"][f"decode_step_ms_batch{b}"]
                                                / out["dense"][f"decode_step_ms_batch{b}"])
    with tempfile.TemporaryDirectory() as tmp:  # 2 shards merged per expert at MP=1
        widths = {k: v for k, v in small.items() if k not in ("vision", "vocab_size")}
        ckpt = make_tiny_checkpoint(Path(tmp) / "moe-mp2", variant="sphinx-moe", mp=2, **widths,
                                    hidden_dim=MOE_EXPERT_WIDTH,
                                    moe=dict(num_experts=8, num_experts_per_tok=2))
        res = subprocess.run([sys.executable, "-c", LOAD_SNIPPET, str(ckpt)], capture_output=True,
                             text=True, check=True)
        out["load_checkpoint_mp2_at_mp1"] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/runtime.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", choices=["all", "moe"], default="all")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.parts == "moe":  # only the MoE line, updated in the existing result file
        path = Path(args.out)
        result = json.loads(path.read_text()) if path.is_file() else {}
        result["moe_vs_dense"] = bench_moe()
        met = result.setdefault("targets_met", {})
        met["moe_step_le_1.5x_dense"] = all(
            result["moe_vs_dense"][f"moe_over_dense_step_batch{b}"] <= 1.5 for b in (1, 8))
        met["moe_load_peak_rss_le_1.2x_weights"] = (
            result["moe_vs_dense"]["load_checkpoint_mp2_at_mp1"]["peak_over_weights"] <= 1.2)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["moe_vs_dense"], indent=1))
        return
    cfg = SphinxConfig.from_name("small")
    model = SphinxModel.from_config(cfg, device="cpu")
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__},
        "preset": {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                   "vocab_size": cfg.vocab_size},
        "prefill_tok_s_len512": bench_prefill(model, 512),
        **bench_decode(model),
    }
    with tempfile.TemporaryDirectory() as tmp:
        result["load"] = bench_load(Path(tmp))
        result["image_encode_model_parallel"] = bench_encode_mp(Path(tmp))
    result["moe_vs_dense"] = bench_moe()
    result["targets_met"] = {
        "batch8_ge_4x_batch1": result["batch8_over_batch1"] >= 4,
        "pos500_le_1.5x_pos10": result["pos500_over_pos10"] <= 1.5,
        "load_peak_rss_le_1.2x_weights": all(
            v["peak_over_weights"] <= 1.2 for v in result["load"].values()),
        "moe_step_le_1.5x_dense": all(
            result["moe_vs_dense"][f"moe_over_dense_step_batch{b}"] <= 1.5 for b in (1, 8)),
        "moe_load_peak_rss_le_1.2x_weights":
            result["moe_vs_dense"]["load_checkpoint_mp2_at_mp1"]["peak_over_weights"] <= 1.2,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
