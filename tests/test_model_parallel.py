"Model parallel on gloo with real separate processes: any checkpoint MP size into MP=2 (and 4)."

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sphinx_tools import make_tiny_checkpoint

WORKER = Path(__file__).parent / "mp_worker.py"


def run_mp(world: int, ckpt: Path, out: Path, golden_io: Path) -> list[dict]:
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(ckpt), str(out),
                          str(golden_io)], env={**os.environ, "OMP_NUM_THREADS": "1"})
        for r in range(world)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for r in results:
        assert "crash" not in r, r["crash"]
    return results


@pytest.mark.parametrize("layout, world", [("", 2), ("mp2", 2), ("mp2", 4)])
def test_golden_under_model_parallel(golden_dir, golden_io, layout, world, tmp_path):
    results = run_mp(world, golden_dir / layout, tmp_path, golden_dir / "golden_io.pt")
    want = golden_io["generated_token_ids"].tolist()
    for r in results:
        assert "error" not in r, r["error"]
        assert r["logits_diff"] <= 1e-4
        assert r["text_only_diff"] <= 1e-4
        assert r["greedy"] == want
        assert r["local_wq"] == [64 // world, 64]  # only this rank's slice is materialized
        # each rank encodes its share of the image's 5 views (3 + 2 of 2 ranks; 2 + 2 + 1 + 0 of
        # 4, padded to 2 each) in each image encoding: logits, greedy, sampled
        per = -(-5 // world)
        assert r["encoded_views"] == [per] * 3, r["encoded_views"]
    # seeded sampling: identical on every model-parallel rank
    assert all(r["sampled"] == results[0]["sampled"] for r in results)


def test_heads_not_divisible_by_mp_size(golden_dir, tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "odd", dim=48, n_heads=3)
    results = run_mp(2, ckpt, tmp_path, golden_dir / "golden_io.pt")
    for r in results:
        assert "n_heads 3" in r["error"] and "model-parallel size 2" in r["error"]


def test_one_rank_skips_the_collectives_with_the_same_numbers(golden_model, golden_io):
    # at one rank fairscale's copy/reduce/gather are identities: the layers call F.linear and
    # F.embedding directly (no fairscale autograd node in the graph) and compute the same bits
    import torch

    from sphinx_tools.model import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear

    tr = golden_model.transformer
    tr.clear_caches()  # full-sequence forwards (a decoding cache another test left attends itself)
    layers = [m for m in tr.modules()
              if isinstance(m, (ColumnParallelLinear, RowParallelLinear, ParallelEmbedding))]
    assert layers and not any(m.split for m in layers)
    ids = golden_io["generated_token_ids"][None, :8]
    positions = torch.arange(8)[None]

    def forward():  # the embeddings require grad, so the graph holds every layer after them
        with torch.enable_grad():
            return tr(tr.tok_embeddings(ids).detach().requires_grad_(), positions)

    y = forward()
    seen, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
    names = {type(n).__name__ for n in seen}
    assert names and not any("ModelParallel" in n for n in names), names
    for m in layers:
        m.split = True  # the collectives' path (what 2+ ranks take)
    try:
        assert torch.equal(forward(), y.detach())
    finally:
        for m in layers:
            m.split = False
