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
    img = Image.open(Path(__file__).parents[1] / "data" / "golden" / "image.png")
    q = "Please provide the bounding box coordinate of the region this sentence describes: the image."
    out = m.generate([build_prompt([[q, None]])], [img], max_gen_len=32)[0]
    assert out.finish_reason in ("stop", "eos") and "[" in out.text
