"""Finetuning the other released variants: a tiny SPHINX-Tiny and a tiny SPHINX-MoE train a few
steps and save in the released format, which loads back."""

import json

import pytest
import torch

from sphinx_tools import SphinxModel, make_tiny_checkpoint
from sphinx_tools.train import TrainConfig, train

from .conftest import write_config

# the keys the reference's ModelArgs take for each family (it rejects any other key)
LLAMA_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
              "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_batch_size", "max_seq_len"}
MOE_KEYS = {"dim", "hidden_dim", "head_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
            "norm_eps", "rope_theta", "max_batch_size", "max_seq_len", "moe"}


@pytest.mark.parametrize("variant, keys", [("sphinx-tiny", LLAMA_KEYS), ("sphinx-moe", MOE_KEYS)])
def test_finetune_saves_the_released_format(variant, keys, synth_data, tmp_path):
    start = make_tiny_checkpoint(tmp_path / "start", variant=variant, seed=2)
    before = SphinxModel.from_pretrained(start)
    config = write_config(synth_data, f"ft-{variant}", init={"checkpoint": str(start)},
                          train=["llm", "proj"], steps=3, save_every=3)
    out = train(TrainConfig.load(config), progress=False)
    assert sorted(p.name for p in out.glob("consolidated.*")) == ["consolidated.00-of-01.model.pth"]
    assert (out / "meta.json").read_text() == (start / "meta.json").read_text()
    saved = json.loads((out / "config.json").read_text())
    assert set(saved) - {"vision"} <= keys  # tiny encoder widths are ours (released: omitted)
    after = SphinxModel.from_pretrained(out)
    assert after.cfg == before.cfg
    a, b = before.state_dict(), after.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert "layers.0.attention.wq.weight" in changed and "visual_proj.0.weight" in changed
    assert not any(k.startswith(("openclip_convnext_xxl.", "dinov2_vitg14.")) for k in changed)
    if before.cfg.n_experts:  # the experts and the router train too
        assert {"layers.0.feed_forward.w1", "layers.0.feed_forward.w2",
                "layers.0.feed_forward.gate.weight"} <= changed
    image = torch.zeros(3, 512, 512)
    gen = after.generate(["What is in the image?"], [image], max_gen_len=3, stop=())
    assert len(gen[0].token_ids) == 3
