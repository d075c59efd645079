"""Speed benchmark: threads under contention, live-cache decoding, continuous batching, shared
prefixes, int8 weights and the memory-bandwidth bound of a decode step.

Run:  .venv/bin/python benchmarks/bench_speed.py [--only threads,bandwidth,...]
      [--out benchmarks/results/speed.json] [--device cuda]

Each section writes its own key of the JSON file (a run of some sections keeps the others).
With ``--device cuda`` the sections but ``threads`` (a CPU matter) run on the GPU and write
under the file's ``gpu`` key, with the GPU's name; nothing else fills that key.
Models are random-weight presets on CPU ("small": dim 512, 8 layers, vocab 32000) unless a
section says otherwise. Targets:

- threads: decode tok/s with a competing busy process and the default environment (what
  ``import sphinx_tools`` sets) >= 0.8x the same run with ``OMP_WAIT_POLICY=PASSIVE`` set by hand;
  the old default (torch loaded first, spinning threads) is measured beside it;
- shared_prefix: one image x 5 task prompts, ``generate_multi`` >= 4x five ``generate`` calls,
  with identical greedy answers;
- bandwidth: a batch-1 decode step >= 0.75 of the bound (bytes read per token over the memcpy
  bandwidth measured in the same run), fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sphinx_tools  # noqa: F401  (before torch: the threading policy, see sphinx_tools/threads.py)
import torch

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cpu")  # where the models and tensors of a run live (--device)


def _sync():
    "Wait for the device's queued work (CUDA runs asynchronously)."
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()

# -- threads ----------------------------------------------------------------------------------

DECODE_SNIPPET = r"""
import json, statistics, sys, time
{imports}
from sphinx_tools import SphinxConfig, SphinxModel
from sphinx_tools.generate import decode_stream
torch.set_num_threads(2)
m = SphinxModel.from_config(SphinxConfig.from_name("small"), device="cpu")
g = torch.Generator().manual_seed(0)
with torch.inference_mode():
    rows = [m.transformer.tok_embeddings(torch.randint(3, 32000, (1, 16), generator=g))[0]]
times, last = [], None
for _ in decode_stream(m.transformer, rows, {tokens}):
    now = time.perf_counter()
    if last is not None:
        times.append(now - last)
    last = now
print(json.dumps({{"tok_s": 1 / statistics.median(times[4:])}}))
"""

THREAD_ARMS = {
    # name: (imports before sphinx_tools, environment changes)
    "old_default": ("import torch", {}),  # torch loaded first: the runtime's spinning default
    "default": ("import sphinx_tools, torch", {}),  # what every entry point gets now
    "passive_by_hand": ("import torch", {"OMP_WAIT_POLICY": "PASSIVE"}),
}


def _decode_in_subprocess(imports: str, env: dict, tokens: int) -> float:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    code = DECODE_SNIPPET.format(imports=imports, tokens=tokens)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**base, **env}, cwd=ROOT, timeout=900)
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])["tok_s"]


def bench_threads(rounds: int = 3, tokens: int = 40) -> dict:
    "Batch-1 decode tok/s per arm, alone and beside a busy-loop process; arms interleaved."
    out = {}
    for busy in (False, True):
        runs = {name: [] for name in THREAD_ARMS}
        for _ in range(rounds):
            for name, (imports, env) in THREAD_ARMS.items():
                hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
                try:
                    runs[name].append(_decode_in_subprocess(imports, env, tokens))
                finally:
                    if hog is not None:
                        hog.kill()
                        hog.wait()
        key = "busy" if busy else "alone"
        out[key] = {name: {"tok_s_median": round(statistics.median(v), 2),
                           "tok_s_runs": [round(x, 2) for x in v]} for name, v in runs.items()}
    busy = out["busy"]
    out["busy_default_over_passive"] = round(
        busy["default"]["tok_s_median"] / busy["passive_by_hand"]["tok_s_median"], 3)
    out["busy_old_default_over_passive"] = round(
        busy["old_default"]["tok_s_median"] / busy["passive_by_hand"]["tok_s_median"], 3)
    out["alone_default_over_old_default"] = round(
        out["alone"]["default"]["tok_s_median"] / out["alone"]["old_default"]["tok_s_median"], 3)
    out["config"] = {"preset": "small", "batch": 1, "threads": 2, "tokens": tokens,
                     "rounds": rounds, "competitor": "one python busy loop"}
    out["target_met"] = out["busy_default_over_passive"] >= 0.8
    return out


# -- shared prefix ------------------------------------------------------------------------------

QUESTIONS = ["Detect all objects shown in the image.", "What text is written in the image?",
             "Describe the image briefly.", "Describe the layout of the page.",
             "Describe the image and locate what you mention."]


def small_checkpoint(folder: Path) -> Path:
    "The small LLM widths (dim 512, 8 layers) with SPHINX-1k's 5 views of tiny encoders."
    from sphinx_tools import make_tiny_checkpoint

    if not (folder / "config.json").is_file():
        make_tiny_checkpoint(folder, variant="sphinx-1k", dim=512, n_layers=8, n_heads=8,
                             multiple_of=256)
    return folder


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_shared_prefix(tmp: Path, max_gen_len: int = 32, repeats: int = 4) -> dict:
    "One image x 5 prompts: one generate_multi against 5 generate calls, greedy."
    from PIL import Image

    from sphinx_tools import SphinxModel, build_prompt

    torch.manual_seed(0)
    model = SphinxModel.from_pretrained(small_checkpoint(tmp / "small"), device=DEVICE)
    image = Image.fromarray((torch.rand(300, 400, 3) * 255).byte().numpy())
    prompts = [build_prompt([[q, None]]) for q in QUESTIONS]
    kw = dict(max_gen_len=max_gen_len, stop=())
    multi = lambda: model.generate_multi([image], [prompts], **kw)[0]  # noqa: E731
    single = lambda: [model.generate([p], [image], **kw)[0] for p in prompts]  # noqa: E731
    same = [g.token_ids for g in multi()] == [g.token_ids for g in single()]
    t_multi, t_single = [], []
    for _ in range(repeats):  # interleaved: a busy spell of the machine hits both alike
        t_multi.append(_best(multi, 1))
        t_single.append(_best(single, 1))
    t_multi, t_single = min(t_multi), min(t_single)
    return {"config": {"model": "small LLM + tiny encoders, SPHINX-1k views (random weights)",
                       "image_tokens": model.cfg.image_tokens, "prompts": len(prompts),
                       "max_gen_len": max_gen_len, "threads": torch.get_num_threads()},
            "generate_multi_s": round(t_multi, 3), "five_generate_s": round(t_single, 3),
            "speedup": round(t_single / t_multi, 2), "identical_greedy_tokens": same,
            "device": DEVICE.type,
            "target_met": same and t_single / t_multi >= 4}


# -- continuous batching ----------------------------------------------------------------------


def bench_continuous(tmp: Path, images: int = 4, budgets=(4, 8, 16, 32, 96),
                     rounds: int = 3) -> dict:
    """Answers of mixed lengths (per-prompt budgets) for images x prompts, greedy: static
    batching (every row stays in the batch until the longest answer ends) against continuous
    batching (a finished row leaves, or its slot goes to the next prompt)."""
    from PIL import Image

    from sphinx_tools import SphinxModel, build_prompt

    model = SphinxModel.from_pretrained(small_checkpoint(tmp / "small"), device=DEVICE)
    g = torch.Generator().manual_seed(0)
    ims = [Image.fromarray((torch.rand(300, 400, 3, generator=g) * 255).byte().numpy())
           for _ in range(images)]
    prompts = [[build_prompt([[q, None]]) for q in QUESTIONS] for _ in ims]
    per = [list(budgets) for _ in ims]
    useful = sum(map(sum, per))
    arms = {"static": dict(max_gen_len=max(budgets)),  # rows run to the longest, cut afterwards
            "continuous": dict(max_gen_len=per),
            "continuous_8_slots": dict(max_gen_len=per, max_rows=8)}
    out, answers, times = {}, {}, {name: [] for name in arms}
    for name, kw in arms.items():  # warm-up, and the answers
        gens = model.generate_multi(ims, prompts, stop=(), **kw)
        answers[name] = [g.token_ids[:b] for gs, bs in zip(gens, per) for g, b in zip(gs, bs)]
    for _ in range(rounds):  # arms interleaved: a busy spell of the machine hits each alike
        for name, kw in arms.items():
            times[name].append(_best(lambda: model.generate_multi(ims, prompts, stop=(), **kw), 1))
    for name, ts in times.items():
        t = min(ts)
        out[name] = {"seconds": round(t, 3), "useful_tok_s": round(useful / t, 1),
                     "seconds_runs": [round(x, 2) for x in ts]}
    out["continuous_over_static"] = round(
        out["static"]["seconds"] / out["continuous"]["seconds"], 2)
    out["slots_over_static"] = round(
        out["static"]["seconds"] / out["continuous_8_slots"]["seconds"], 2)
    out["identical_answers"] = all(a == answers["static"] for a in answers.values())
    out["config"] = {"images": images, "prompts_per_image": len(QUESTIONS), "budgets": budgets,
                     "useful_tokens": useful, "threads": torch.get_num_threads(),
                     "timing": f"best of {rounds} interleaved runs"}
    return out


# -- bandwidth and int8 ---------------------------------------------------------------------------


def memcpy_gb_s(mb: int = 256, repeats: int = 5) -> float:
    "Bytes read plus bytes written per second by a large tensor copy (the machine's bandwidth)."
    src = torch.ones(mb * 2**20 // 4, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best(lambda: dst.copy_(src), repeats) / 1e9


def read_gb_s(mb: int = 256, repeats: int = 5) -> float:
    "Bytes per second of a read-only pass (a sum) over a large tensor."
    src = torch.ones(mb * 2**20 // 4, device=DEVICE)
    return src.numel() * 4 / _best(lambda: src.sum(), repeats) / 1e9


def decode_step_s(model, steps: int = 40, prompt: int = 16) -> float:
    "Median wall time of a batch-1 decode step."
    from sphinx_tools.generate import decode_stream

    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        rows = [model.transformer.tok_embeddings(
            torch.randint(3, model.cfg.vocab_size, (1, prompt), generator=g).to(DEVICE))[0]]
    times, last = [], None
    for _ in decode_stream(model.transformer, rows, steps):
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    return statistics.median(times[4:])


def bytes_per_token(model, kv_slots: int) -> int:
    """Bytes a batch-1 decode step reads: every LLM weight but the embedding table, one
    embedding row, and the K/V slots attended."""
    from sphinx_tools.quantize import weight_bytes

    cfg, tr = model.cfg, model.transformer
    emb = tr.tok_embeddings.weight
    kv = 2 * cfg.n_layers * kv_slots * cfg.n_kv_heads * cfg.head_dim * emb.element_size()
    return weight_bytes(tr) - emb.numel() * emb.element_size() + cfg.dim * emb.element_size() + kv


def bench_bandwidth(tmp: Path, rounds: int = 5) -> dict:
    """Batch-1 decode against the memory-bandwidth bound, fp32 / bf16 / int8 weights: the bound
    is (bytes read per token) / (memcpy bandwidth). The machine's bandwidth swings when other
    processes share it, so each round measures the bandwidth right before each decode run and
    the fraction is the median over rounds of (bound of that round) / (step of that round)."""
    from sphinx_tools import SphinxModel
    from sphinx_tools.generate import LIVE_BUCKET

    ckpt = small_checkpoint(tmp / "small")
    arms = {name: SphinxModel.from_pretrained(ckpt, device=DEVICE, **kw) for name, kw in (
        ("fp32", {}), ("bf16", {"dtype": torch.bfloat16}), ("int8", {"quantize": "int8"}))}
    runs = {name: [] for name in arms}  # (memcpy GB/s, read GB/s, step s) per round
    for _ in range(rounds):
        for name, model in arms.items():
            runs[name].append((memcpy_gb_s(), read_gb_s(), decode_step_s(model)))
    out = {}
    for name, model in arms.items():
        nbytes = bytes_per_token(model, LIVE_BUCKET)  # 16 + 40 slots live: one bucket
        mem, read, step = (statistics.median(x) for x in zip(*runs[name]))
        out[name] = {"step_ms": round(step * 1e3, 2), "tok_s": round(1 / step, 1),
                     "bytes_per_token_mb": round(nbytes / 1e6, 1),
                     "memcpy_gb_s": round(mem, 2), "read_gb_s": round(read, 2),
                     "bound_ms": round(nbytes / (mem * 1e9) * 1e3, 2),
                     "fraction_of_bound": round(statistics.median(
                         nbytes / (m * 1e9) / t for m, _, t in runs[name]), 2),
                     "fraction_of_read_bound": round(statistics.median(
                         nbytes / (r * 1e9) / t for _, r, t in runs[name]), 2)}
    every = [m for name in arms for m, _, _ in runs[name]]
    out["memcpy_gb_s_range"] = [round(min(every), 2), round(max(every), 2)]
    out["config"] = {"preset": "small (dim 512, 8 layers, vocab 512)", "batch": 1,
                     "threads": torch.get_num_threads(), "rounds": rounds,
                     "bandwidth": "memcpy: read+write bytes of a 256 MB tensor copy per second; "
                                  "read: bytes of a sum over 256 MB per second; best of 5 each, "
                                  "measured right before each decode run",
                     "bound": "bytes read per token / bandwidth",
                     "fraction": "median over rounds of bound / step, each round's own bandwidth"}
    out["target_met"] = out["fp32"]["fraction_of_bound"] >= 0.75
    return out


def llm_memory_gb() -> dict:
    "Weight memory of the released LLMs per variant, from their parameter counts (no weights)."
    from sphinx_tools.checkpoint import build_meta
    from sphinx_tools.dist import init_model_parallel
    from sphinx_tools.model import ColumnParallelLinear, RowParallelLinear, SphinxConfig

    init_model_parallel()
    out = {}
    for preset, label in (("sphinx", "LLaMA-2 13B (SPHINX)"), ("sphinx-tiny", "TinyLlama 1.1B "
                          "(SPHINX-Tiny)"), ("sphinx-moe", "Mixtral 8x7B 46.7B (SPHINX-MoE)")):
        model = build_meta(SphinxConfig.from_name(preset))
        llm = [(n, p) for n, p in model.named_parameters() if not n.startswith(
            ("qformer.", "clip.", "openclip_convnext_xxl.", "dinov2_vitg14.", "qformer_proj.",
             "visual_proj.", "start_img", "end_img"))]
        linear = sum(m.weight.numel() for m in model.modules()
                     if isinstance(m, (ColumnParallelLinear, RowParallelLinear)))
        rows = sum(m.weight.shape[0] for m in model.modules()
                   if isinstance(m, (ColumnParallelLinear, RowParallelLinear)))
        total = sum(p.numel() for _, p in llm)
        out[label] = {"llm_params_b": round(total / 1e9, 2),
                      "fp32_gb": round(4 * total / 1e9, 1), "bf16_gb": round(2 * total / 1e9, 1),
                      "int8_gb": round((linear + 2 * rows + 2 * (total - linear)) / 1e9, 1),
                      "int8_share_of_params": round(linear / total, 3)}
    return out


def bench_int8(tmp: Path) -> dict:
    "int8 weight-only against fp32 and bf16: LLM weight bytes and batch-1 decode tok/s."
    from sphinx_tools import SphinxModel
    from sphinx_tools.quantize import weight_bytes

    ckpt = small_checkpoint(tmp / "small")
    out = {}
    for name, kw in (("fp32", {}), ("bf16", {"dtype": torch.bfloat16}),
                     ("int8", {"quantize": "int8"}), ("bf16_int8", {"dtype": torch.bfloat16,
                                                                    "quantize": "int8"})):
        model = SphinxModel.from_pretrained(ckpt, device=DEVICE, **kw)
        out[name] = {"llm_weight_mb": round(weight_bytes(model.transformer) / 1e6, 1),
                     "decode_tok_s_batch1": round(1 / decode_step_s(model), 1)}
    out["released_llm_memory"] = llm_memory_gb()
    return out


SECTIONS = {"threads": bench_threads, "shared_prefix": bench_shared_prefix,
            "continuous": bench_continuous, "bandwidth": bench_bandwidth, "int8": bench_int8}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/speed.json")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections: {', '.join(SECTIONS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: run on the GPU, results under the file's 'gpu' key")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    names = args.only.split(",")
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device is visible")
        if "threads" in names:
            ap.error("the threads section measures the CPU's thread pool: leave it out of --only")
    torch.set_num_threads(args.threads)
    path = Path(args.out)
    result = json.loads(path.read_text()) if path.is_file() else {}
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch": torch.__version__, "python": platform.python_version()}
    section = result
    if DEVICE.type == "cuda":
        section = result.setdefault("gpu", {})
        machine["gpu"] = torch.cuda.get_device_name()
        machine["cuda"] = torch.version.cuda
    section["machine"] = machine
    tmp = Path(tempfile.mkdtemp(prefix="bench_speed_"))
    for name in names:
        t0 = time.perf_counter()
        fn = SECTIONS[name]
        section[name] = fn(tmp) if "tmp" in fn.__code__.co_varnames else fn()
        section[name]["bench_s"] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(section[name], indent=1), flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
