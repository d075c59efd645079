"Random initialization of tiny models trained from scratch (sphinx_tools.tiny.init_random_)."

import math

import torch

from sphinx_tools import dist
from sphinx_tools.model import SphinxConfig, Transformer
from sphinx_tools.tiny import POSITION_TABLES, init_random_


def test_fan_in_scaling_and_position_tables():
    dist.init_model_parallel()
    cfg = SphinxConfig.from_name("tiny", dim=64, n_layers=1, n_heads=4, vocab_size=256,
                                 vision={"patch_size": 28, "qf_queries": 4})
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    init_random_(model, seed=0)
    params = dict(model.named_parameters())
    conv = params["clip.visual.conv1.weight"]  # (w, 3, 28, 28): fan-in 2352, not the kernel width
    assert abs(conv.std().item() * math.sqrt(3 * 28 * 28) - 1) < 0.05
    lin = params["layers.0.attention.wq.weight"]
    assert abs(lin.std().item() * math.sqrt(lin.shape[1]) - 1) < 0.05
    tables = [n for n in params if n.endswith(POSITION_TABLES)]
    assert len(tables) == 4
    for n in tables:
        assert abs(params[n].std().item() - 1) < 0.15, n
    # a patch token's position code is as large as its content, so location survives ln_pre
    x = torch.rand(1, 3, 224, 224) * 2 - 1
    content = model.clip.visual.conv1(x).flatten(2).transpose(1, 2)
    pos = model.clip.visual.positional_embedding[1:]
    assert 0.3 < pos.norm(dim=-1).mean() / content.norm(dim=-1).mean() < 3
    again = Transformer(cfg)
    init_random_(again, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
