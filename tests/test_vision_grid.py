"A configurable visual token grid (patch size, Q-Former queries): fewer image tokens, same code path."

import json

import pytest
import torch

from sphinx_tools import SphinxModel, make_tiny_checkpoint
from sphinx_tools.errors import CheckpointError
from sphinx_tools.checkpoint import infer_vision, load_shard
from sphinx_tools.model import SphinxConfig, Transformer, VisionConfig, convnext_to_grid

torch.set_num_threads(1)

GRIDS = [  # (patch_size, qf_queries, tokens per view)
    (28, 8, 1 + 8 + 65 + 1),
    (56, 4, 1 + 4 + 17 + 1),
]


def test_released_defaults_unchanged():
    assert VisionConfig().patch_size == 14 and VisionConfig().qf_queries == 32
    assert SphinxConfig.from_name("sphinx").image_tokens == 291
    assert SphinxConfig.from_name("sphinx-1k").image_tokens == 5 * 291
    assert SphinxConfig.from_name("tiny").image_tokens == 5 * 291


@pytest.mark.parametrize("patch, queries, per_view", GRIDS)
def test_encode_image_shape(patch, queries, per_view):
    cfg = SphinxConfig.from_name("tiny", vision={"patch_size": patch, "qf_queries": queries})
    assert cfg.vision.convnext_dims == (8, 16, 24, 48)  # merged onto the tiny preset's encoders
    assert cfg.image_tokens == 5 * per_view
    m = SphinxModel.from_config(cfg, device="cpu")
    assert tuple(m.transformer.qformer.query_tokens.shape) == (1, queries, cfg.vision.qf_width)
    with torch.inference_mode():
        out = m.encode_images(torch.randn(2, 3, 448, 448))
    assert out.shape == (2, cfg.image_tokens, cfg.dim)


@pytest.mark.parametrize("patch, queries, per_view", GRIDS)
def test_checkpoint_round_trip(tmp_path, patch, queries, per_view):
    vision = {"patch_size": patch, "qf_queries": queries}
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=3, vision=vision)
    saved = json.loads((ckpt / "config.json").read_text())["vision"]
    assert (saved["patch_size"], saved["qf_queries"]) == (patch, queries)
    want = SphinxConfig.from_name("tiny", vision=vision)
    m = SphinxModel.from_pretrained(ckpt)
    assert m.cfg == want
    # a config.json without "vision" (as released ones): the grid is read from the tensors
    assert infer_vision(load_shard(ckpt / "consolidated.00-of-01.model.pth"), ckpt) == want.vision

    # same logits as the model built in memory with the same weights
    ref = Transformer(want)
    ref.load_state_dict(m.transformer.state_dict())
    ref.eval()
    tokens = torch.tensor([m.tokenizer.encode("What is in the image?", bos=True)])
    image = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    logits = m.logits(tokens, image)
    with torch.inference_mode():
        h = ref.embed(tokens, ref.encode_image(image))
        expect = ref(h, torch.arange(h.shape[1])[None], keep_last=tokens.shape[1])
    assert logits.shape == (1, tokens.shape[1], want.vocab_size)
    assert torch.equal(logits, expect)

    # and again after dropping "vision" from config.json (inferred from the tensors)
    args = json.loads((ckpt / "config.json").read_text())
    del args["vision"]
    (ckpt / "config.json").write_text(json.dumps(args))
    m2 = SphinxModel.from_pretrained(ckpt)
    assert m2.cfg == want
    assert torch.equal(m2.logits(tokens, image), logits)


@pytest.mark.parametrize("bad", [30, 16, 0])
def test_bad_patch_size(bad):
    with pytest.raises(ValueError, match=f"patch_size {bad}"):
        SphinxConfig.from_name("tiny", vision={"patch_size": bad})
    with pytest.raises(ValueError, match=f"patch_size {bad}"):
        VisionConfig(patch_size=bad)


def test_bad_queries_and_unknown_field():
    with pytest.raises(ValueError, match="qf_queries 0"):
        SphinxConfig.from_name("tiny", vision={"qf_queries": 0})
    with pytest.raises(ValueError, match="patch"):
        SphinxConfig.from_name("tiny", vision={"patch": 28})


def test_bad_vision_in_config_json(tmp_path, golden_dir):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(golden_dir, ckpt, ignore=shutil.ignore_patterns("mp2"))
    args = json.loads((ckpt / "config.json").read_text())
    args["vision"] = SphinxConfig.from_name("tiny").to_json()["vision"] | {"patch_size": 30}
    (ckpt / "config.json").write_text(json.dumps(args))
    with pytest.raises(CheckpointError, match="patch_size 30"):
        SphinxModel.from_pretrained(ckpt)


def test_convnext_to_grid():
    t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(convnext_to_grid(t, 16), t.repeat_interleave(2, -1).repeat_interleave(2, -2))
    assert torch.equal(convnext_to_grid(t, 8), t)
    assert convnext_to_grid(t, 32).shape == (2, 3, 32, 32)
    # pooling sums in another order than mean(): equal up to float rounding, which a relative
    # tolerance alone does not allow for values near zero
    assert torch.allclose(convnext_to_grid(t, 4), t.reshape(2, 3, 4, 2, 4, 2).mean((3, 5)), atol=1e-6)
    assert torch.allclose(convnext_to_grid(t, 1)[..., 0, 0], t.mean((-1, -2)), atol=1e-6)
