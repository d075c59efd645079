"""CUDA and real-weight checks: the same code paths as the CPU tests, on a device.

Run on a GPU machine: ``pytest tests/gpu -m gpu``. Real-checkpoint tests also need
``SPHINX_CHECKPOINT=/path/to/SPHINX-v2-1k`` (released folder).
"""

import os
from pathlib import Path

import pytest
import torch

from sphinx_tools import SphinxModel, build_prompt

pytestmark = pytest.mark.gpu
REAL = os.environ.get("SPHINX_CHECKPOINT")


def test_golden_on_cuda_fp32(golden_dir, golden_io):
    m = SphinxModel.from_pretrained(golden_dir, device="cuda")
    logits = m.logits(golden_io["prompt_token_ids"][None], golden_io["image"][None])
    assert (logits.cpu() - golden_io["logits"]).abs().max() <= 1e-3
    gen = m.generate([golden_io["prompt"]], [golden_io["image"]], max_gen_len=16, stop=())[0]
    assert gen.token_ids == golden_io["generated_token_ids"].tolist()


def test_golden_on_cuda_bf16_runs(golden_dir, golden_io):
    m = SphinxModel.from_pretrained(golden_dir, device="cuda", dtype=torch.bfloat16)
    gen = m.generate([golden_io["prompt"]] * 4, [golden_io["image"], None, golden_io["image"], None],
                     max_gen_len=8)
    assert all(len(g.token_ids) == 8 for g in gen)


@pytest.mark.skipif(not REAL, reason="set SPHINX_CHECKPOINT to a released SPHINX folder")
def test_real_checkpoint_answers_grounded_question():
    from PIL import Image

    m = SphinxModel.from_pretrained(Path(REAL), device="cuda", dtype=torch.bfloat16)
    img = Image.open(Path(__file__).parents[1] / "data" / "golden" / "sphinx-1k-tiny" / "image.png")
    q = "Please provide the bounding box coordinate of the region this sentence describes: the image."
    out = m.generate([build_prompt([[q, None]])], [img], max_gen_len=32)[0]
    assert out.finish_reason in ("stop", "eos") and "[" in out.text


def _finetune_config(root: Path, out: str, **kw):
    import json

    from sphinx_tools.demo.synth import write_dataset
    from sphinx_tools.tiny import train_tokenizer
    from sphinx_tools.train import TrainConfig, conversation_text

    if not (root / "data").is_dir():
        write_dataset(root / "data", 8, seed=3, progress=False, turns=2)
        convs = json.loads((root / "data" / "conversations.json").read_text())
        train_tokenizer(root / "tok.model", 512, corpus=[conversation_text(c["conversations"])[0] for c in convs])
    cfg = dict(init={"preset": "tiny", "tokenizer": str(root / "tok.model"), "seed": 0},
               data=[{"path": str(root / "data/conversations.json"), "root": str(root / "data"),
                      "independent_turns": True}],
               out=str(root / out), train=["llm", "proj", "tokens", "encoders"], steps=4, batch_size=2,
               lr=3e-3, warmup=1, save_every=2, log_every=1, seed=0, device="cuda")
    cfg.update(kw)
    return TrainConfig(**cfg)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_finetuning_on_cuda_saves_loadable_checkpoints_and_resumes(tmp_path, dtype):
    from sphinx_tools.train import train

    straight = train(_finetune_config(tmp_path, "straight", dtype=dtype), progress=False)
    state = torch.load(straight / "train_state.pt", weights_only=True)
    assert state["step"] == 4 and state["cuda_rng"] is not None
    assert all(s["exp_avg"].is_cuda for s in state["optimizer"]["state"].values())
    train(_finetune_config(tmp_path, "resumed", dtype=dtype, steps=2), progress=False)
    resumed = train(_finetune_config(tmp_path, "resumed", dtype=dtype), progress=False)
    a = SphinxModel.from_pretrained(straight).state_dict()
    b = SphinxModel.from_pretrained(resumed).state_dict()
    for k in a:  # same data order and RNG streams; GPU kernels may differ in the last bits
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
    m = SphinxModel.from_pretrained(straight, device="cuda")
    assert m.generate([build_prompt([["What is in the image?", None]])], [None], max_gen_len=4)[0].token_ids


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_data_parallel_finetuning_on_two_gpus(tmp_path):
    import json

    from sphinx_tools.train import train_local

    out = train_local(_finetune_config(tmp_path, "dp", steps=2), procs=2, progress=False)
    log = [json.loads(x) for x in (tmp_path / "dp_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["dp"]) for r in log] == [(1, 2), (2, 2)]
    assert SphinxModel.from_pretrained(out).transformer.cfg.dim > 0


def test_speed_benchmark_runs_on_cuda(tmp_path):
    # the GPU section of benchmarks/results/speed.json comes from this script on a GPU
    import json
    import subprocess
    import sys

    root = Path(__file__).parents[2]
    out = tmp_path / "speed.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "bench_speed.py"), "--device", "cuda",
                    "--only", "bandwidth,int8,shared_prefix", "--out", str(out)], check=True,
                   cwd=root, timeout=900)
    gpu = json.loads(out.read_text())["gpu"]
    assert gpu["machine"]["gpu"]
    assert gpu["shared_prefix"]["identical_greedy_tokens"]
    assert gpu["bandwidth"]["fp32"]["step_ms"] > 0 and gpu["int8"]["int8"]["decode_tok_s_batch1"] > 0
