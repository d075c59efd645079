"""The other released variants on a CUDA device: the reference's tiny goldens of SPHINX (224),
SPHINX-Tiny(-1k) and SPHINX-MoE(-1k) (the MoE layer in plain torch, no megablocks), fp32 and bf16.

Run on a GPU machine: ``pytest tests/gpu -m gpu``."""

import pytest
import torch

from golden_data import GOLDEN_ROOT, GOLDENS, golden_image, load_io
from sphinx_tools import SphinxModel

pytestmark = pytest.mark.gpu
NEW = [g for g in GOLDENS if g != "sphinx-1k-tiny"]  # that one is in test_cuda.py


@pytest.mark.parametrize("name", NEW)
def test_golden_on_cuda_fp32(name):
    folder = GOLDEN_ROOT / name
    io = load_io(folder)
    image = golden_image(folder, io)
    m = SphinxModel.from_pretrained(folder, device="cuda")
    logits = m.logits(io["prompt_token_ids"][None], image[None])
    assert (logits.cpu() - io["logits"]).abs().max() <= 1e-3
    gen = m.generate([io["prompt"]], [image], max_gen_len=16, stop=())[0]
    assert gen.token_ids == io["generated_token_ids"].tolist()


@pytest.mark.parametrize("name", ["sphinx-tiny-1k-tiny", "sphinx-moe-1k-tiny"])
def test_golden_on_cuda_bf16_batches(name):
    folder = GOLDEN_ROOT / name
    io = load_io(folder)
    image = golden_image(folder, io)
    m = SphinxModel.from_pretrained(folder, device="cuda", dtype=torch.bfloat16)
    gen = m.generate([io["prompt"]] * 4, [image, None, image, None], max_gen_len=8, stop=())
    assert [len(g.token_ids) for g in gen] == [8] * 4
    assert gen[0].token_ids == gen[2].token_ids and gen[1].token_ids == gen[3].token_ids
