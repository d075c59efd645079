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


def test_coordinate_tokens_are_single_pieces_with_smooth_rows(tmp_path):
    from sphinx_tools.demo.synth import generate_scene, scene_qas
    from sphinx_tools.tiny import COORDINATE_PIECES, init_coordinate_rows_, train_tokenizer
    from sphinx_tools.tokenizer import Tokenizer

    corpus = [q.question + " " + q.answer for s in range(8) for q in scene_qas(generate_scene("shapes", s))]
    digits = Tokenizer(train_tokenizer(tmp_path / "digits.model", 512, corpus=corpus))
    coords = Tokenizer(train_tokenizer(tmp_path / "coords.model", 512, corpus=corpus, coordinate_tokens=True))
    box = "[0.41,0.24,0.54,0.37]"
    for tok in (digits, coords):
        assert tok.decode(tok.encode(box, bos=False)) == box  # same text either way
    assert [coords.sp.id_to_piece(i) for i in coords.encode(box, bos=False)][-8::2] == \
        ["0.41", "0.24", "0.54", "0.37"]
    assert "0.41" not in [digits.sp.id_to_piece(i) for i in digits.encode(box, bos=False)]

    dist.init_model_parallel()
    cfg = SphinxConfig.from_name("tiny", dim=64, n_layers=1, n_heads=4, vocab_size=512)
    model = Transformer(cfg)
    init_random_(model, seed=0)
    assert init_coordinate_rows_(model, digits) == 0
    before = model.output.weight.clone()
    assert init_coordinate_rows_(model, coords) == len(COORDINATE_PIECES)
    ids = [coords.sp.piece_to_id(p) for p in ("0.40", "0.41", "0.42", "0.80")]
    for w in (model.output.weight, model.tok_embeddings.weight):
        rows = w[ids]
        assert torch.allclose(rows.norm(dim=1), torch.ones(4), atol=1e-4)  # as large as random rows
        sim = rows @ rows.T
        assert sim[1, 0] > 0.5 and sim[1, 2] > 0.5 and sim[1, 3] < 0.3  # neighbours alike, far apart not
    coordinate_ids = {coords.sp.piece_to_id(p) for p in COORDINATE_PIECES}
    other = [i for i in range(512) if i not in coordinate_ids]
    assert torch.equal(model.output.weight[other], before[other])  # nothing else touched


def test_every_encoder_sees_its_image():
    "Norm layers start near weight 1 / bias 0 whatever their library calls them (Q-Former's"
    " `LayerNorm`, ConvNeXt's downsample `0`, CLIP's `ln_1`), so no encoder starts blind."
    dist.init_model_parallel()
    cfg = SphinxConfig.from_name("tiny", dim=64, n_layers=1, n_heads=4, vocab_size=256,
                                 vision={"patch_size": 56, "qf_queries": 4})
    model = Transformer(cfg)
    init_random_(model, seed=0)
    params = dict(model.named_parameters())
    for name in ("qformer.qformer.encoder.layer.0.crossattention.output.LayerNorm",
                 "openclip_convnext_xxl.stages.1.downsample.0", "clip.visual.transformer.resblocks.0.ln_1",
                 "visual_proj.1", "layers.0.attention_norm"):
        w = params[f"{name}.weight"]
        assert (w - 1).abs().max() < 0.1, name
        if f"{name}.bias" in params:
            assert params[f"{name}.bias"].abs().max() < 0.1, name
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 224, 224, generator=g) * 2 - 1
    with torch.no_grad():
        feats = model.encode_views(x)
    for k in ("qformer", "clip", "convnext", "dinov2"):
        f = feats[k].float()
        assert (f[0] - f[1]).abs().mean() > 0.1 * f[0].abs().mean(), k  # depends on the image
