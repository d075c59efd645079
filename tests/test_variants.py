"""Every released variant against the reference: the tiny goldens of SPHINX (224), SPHINX-Tiny(-1k)
and SPHINX-MoE(-1k) at MP=1 and MP=2 from both shard layouts, the full-size manifests, and the
errors for checkpoints that do not fit. (The SPHINX-1k golden is tested in test_model_parity.py.)"""

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from golden_data import GOLDEN_ROOT, GOLDENS, golden_image, load_io
from sphinx_tools import CheckpointError, SphinxModel
from sphinx_tools.checkpoint import shard_state_dict
from sphinx_tools.model import MoE, mp_split_dim, mp_split_rule
from test_model_parallel import run_mp

NEW = [g for g in GOLDENS if g != "sphinx-1k-tiny"]
MOE = ["sphinx-moe-tiny", "sphinx-moe-1k-tiny"]
DATA = Path(__file__).parent / "data"
_loaded = {}


def golden(name: str, layout: str = ""):
    "(model, golden_io, image) of a golden folder, loaded once per test session."
    key = (name, layout)
    if key not in _loaded:
        folder = GOLDEN_ROOT / name
        io = load_io(folder)
        _loaded[key] = SphinxModel.from_pretrained(folder / layout), io, golden_image(folder, io)
    return _loaded[key]


def reference_shard(folder: Path, rank: int) -> dict:
    "Rank ``rank``'s shard of the golden's mp2/ layout, as the reference saved it."
    f = folder / "mp2" / f"consolidated.0{rank}-of-02.model.pth"
    return torch.load(f, weights_only=True)["model"]


def read_manifest(lines) -> dict:
    "name -> (shape, mp_split_dim, split_rule or None) of a manifest's tab-separated lines."
    rows, header = {}, lines[0].split("\t")
    for line in lines[1:]:
        cols = dict(zip(header, line.split("\t")))
        shape = () if cols["shape"] == "scalar" else tuple(int(x) for x in cols["shape"].split("x"))
        rule = cols.get("split_rule")
        rows[cols["name"].removeprefix("llma.")] = (shape, int(cols["mp_split_dim"]),
                                                    rule.split("(")[0] if rule else None)
    return rows


# -- full-size manifests -----------------------------------------------------------------------
@pytest.mark.parametrize("preset, manifest, count", [
    ("sphinx-v2-1k", "sphinx-full.tsv", 2349),
    ("sphinx-tiny", "sphinx-tiny-full.tsv.gz", 1152),
    ("sphinx-tiny-1k", "sphinx-tiny-full.tsv.gz", 1152),
    ("sphinx-moe", "sphinx-moe-full.tsv.gz", 2309),
    ("sphinx-moe-1k", "sphinx-moe-full.tsv.gz", 2309),
])
def test_full_model_matches_released_manifest(preset, manifest, count):
    f = DATA / manifest
    text = gzip.decompress(f.read_bytes()).decode() if f.suffix == ".gz" else f.read_text()
    rows = read_manifest(text.splitlines())
    assert len(rows) == count
    sd = SphinxModel.from_config(preset, device="meta").state_dict()
    assert all(v.is_meta for v in sd.values())
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: s for k, (s, _, _) in rows.items()}
    assert {k: mp_split_dim(k) for k in sd} == {k: d for k, (_, d, _) in rows.items()}
    rules = {k: r for k, (_, _, r) in rows.items() if r is not None}
    if rules:  # the MoE manifests name the split rule: per_expert for w1 / w2 / w3
        assert {k: mp_split_rule(k) for k in rules} == rules
        assert sum(r == "per_expert" for r in rules.values()) == 3 * 32


@pytest.mark.parametrize("name", NEW)
def test_tiny_model_matches_golden_manifest(name):
    m, _, _ = golden(name)
    rows = read_manifest((GOLDEN_ROOT / name / "tiny_manifest.tsv").read_text().splitlines())
    sd = m.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: s for k, (s, _, _) in rows.items()}
    assert {k: mp_split_dim(k) for k in sd} == {k: d for k, (_, d, _) in rows.items()}


# -- MP=1 parity -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
def test_preprocess_matches_reference(name):
    m, io, image = golden(name)
    assert torch.equal(m.preprocess(Image.open(GOLDEN_ROOT / name / "image.png")), image)


@pytest.mark.parametrize("layout", ["", "mp2"])
@pytest.mark.parametrize("name", NEW)
def test_golden_logits_and_greedy(name, layout):
    m, io, image = golden(name, layout)
    tokens = io["prompt_token_ids"][None]
    assert (m.logits(tokens, image[None]) - io["logits"]).abs().max() <= 1e-4
    assert (m.logits(tokens, None) - io["logits_text_only"]).abs().max() <= 1e-4
    gen = m.generate([io["prompt"]], [image], max_gen_len=16, stop=())[0]
    assert gen.token_ids == io["generated_token_ids"].tolist()
    assert gen.text == io["generated_text"]
    # the KV cache holds only the K/V heads
    assert m.transformer.layers[0].attention.kv_cache.k.shape[1] == m.cfg.n_kv_heads


FEATURES = [("qformer", "qformer_feats"), ("clip", "clip_feats"),
            ("convnext_trunk", "convnext_trunk_out")]


@pytest.mark.parametrize("name", NEW)
def test_encoder_features(name):
    m, io, image = golden(name)
    ref, tr = io["features"], m.transformer
    with torch.inference_mode():
        f = tr.encode_views(tr.views(image[None]))
        fused = tr.fused_tokens(f)
        q = None if m.cfg.variant.light else tr.qformer_proj(f["qformer"])
    checked = 0
    for ours, theirs in FEATURES:
        if theirs in ref:
            torch.testing.assert_close(f[ours], ref[theirs], atol=1e-4, rtol=0)
            checked += 1
    assert checked == (1 if m.cfg.variant.light else 3)
    assert set(f) == ({"convnext_trunk", "convnext", "dinov2"} | (
        set() if m.cfg.variant.light else {"qformer", "clip"}))
    torch.testing.assert_close(f["dinov2"][:, 0], ref["dinov2_x_norm_clstoken"], atol=1e-4, rtol=0)
    patches = ref["dinov2_x_norm_patchtokens"]
    torch.testing.assert_close(f["dinov2"][:, 1:], patches, atol=1e-4, rtol=0)
    torch.testing.assert_close(fused, ref["visual_proj_out"], atol=1e-4, rtol=0)
    if q is not None:
        torch.testing.assert_close(q, ref["qformer_proj_out"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", MOE)
def test_moe_routing_matches_reference(name, monkeypatch):
    m, io, image = golden(name)
    seen = []
    route = MoE.route
    monkeypatch.setattr(MoE, "route", lambda self, x: seen.append(route(self, x)) or seen[-1])
    m.logits(io["prompt_token_ids"][None], image[None])
    ref = io["moe_routing"]
    assert len(seen) == m.cfg.n_layers
    for i, (experts, weights) in enumerate(seen):
        assert torch.equal(experts, ref[f"layer{i}_experts"])  # every position, in order
        torch.testing.assert_close(weights, ref[f"layer{i}_weights"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", MOE + ["sphinx-tiny-tiny"])
def test_mp2_shards_merge_bit_for_bit(name):
    one, _, _ = golden(name)
    two, _, _ = golden(name, "mp2")
    a, b = one.state_dict(), two.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", MOE + ["sphinx-tiny-tiny"])
def test_writing_shards_splits_as_the_reference(name):
    folder = GOLDEN_ROOT / name
    full = torch.load(folder / "consolidated.00-of-01.model.pth", weights_only=True)["model"]
    experts = golden(name)[0].cfg.n_experts
    ours = shard_state_dict({k.removeprefix("llma."): v for k, v in full.items()}, 2, experts)
    for r in range(2):
        ref = reference_shard(folder, r)
        assert ours[r].keys() == ref.keys()
        assert all(torch.equal(ours[r][k], ref[k]) for k in ref)


# -- MP=2 parity (separate processes on gloo) ----------------------------------------------------
@pytest.mark.parametrize("layout", ["", "mp2"])
@pytest.mark.parametrize("name", NEW)
def test_golden_under_model_parallel(name, layout, tmp_path):
    folder = GOLDEN_ROOT / name
    io = load_io(folder)
    results = run_mp(2, folder / layout, tmp_path, folder / "golden_io.pt")
    for r in results:
        assert "error" not in r, r["error"]
        assert r["logits_diff"] <= 1e-4 and r["text_only_diff"] <= 1e-4
        assert r["greedy"] == io["generated_token_ids"].tolist()
    assert all(r["sampled"] == results[0]["sampled"] for r in results)
    # each rank holds exactly its slice, as the reference's own rank saved it
    for rank in range(2):
        mine = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        ref = {k.removeprefix("llma."): v for k, v in reference_shard(folder, rank).items()}
        assert all(torch.equal(mine[k], ref[k]) for k in ref), rank


def test_mp_size_must_divide_kv_heads_and_expert_width(tmp_path):
    # the MoE golden has 2 K/V heads: MP=4 does not divide them
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    results = run_mp(4, GOLDEN_ROOT / "sphinx-moe-tiny", tmp_path / "a",
                     GOLDEN_ROOT / "sphinx-moe-tiny" / "golden_io.pt")
    for r in results:
        assert "n_kv_heads 2" in r["error"] and "model-parallel size 4" in r["error"]
    # an expert width of 97 rows cannot be split over 2 ranks
    d = tmp_path / "odd"
    shutil.copytree(GOLDEN_ROOT / "sphinx-moe-tiny", d)
    f = d / "consolidated.00-of-01.model.pth"
    sd = torch.load(f, weights_only=True)["model"]
    for k in [k for k in sd if k.endswith(("w1", "w2", "w3"))]:
        sd[k] = torch.cat([sd[k].view(4, 96, 64), torch.zeros(4, 1, 64)], dim=1).flatten(0, 1)
    torch.save({"model": sd}, f)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_dim": 97}))
    assert SphinxModel.from_pretrained(d).cfg.ffn_hidden == 97  # fine at MP=1
    results = run_mp(2, d, tmp_path / "b", d / "golden_io.pt")
    for r in results:
        assert "expert hidden_dim 97" in r["error"] and "model-parallel size 2" in r["error"]


# -- checkpoints that do not fit --------------------------------------------------------------
def moe_copy(tmp_path, edit_sd=None, **config):
    d = tmp_path / "c"
    shutil.copytree(GOLDEN_ROOT / "sphinx-moe-tiny", d, ignore=shutil.ignore_patterns("mp2"))
    if edit_sd:
        f = d / "consolidated.00-of-01.model.pth"
        sd = torch.load(f, weights_only=True)["model"]
        edit_sd(sd)
        torch.save({"model": sd}, f)
    if config:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **config}))
    return d


def test_moe_checkpoint_missing_an_expert(tmp_path):
    def drop_last_expert(sd):
        k = "llma.layers.1.feed_forward.w3"
        sd[k] = sd[k][:3 * 96]

    with pytest.raises(CheckpointError, match=r"layers\.1\.feed_forward\.w3 holds 3 experts of 96"
                                              r".*experts are missing"):
        SphinxModel.from_pretrained(moe_copy(tmp_path, drop_last_expert))


def test_moe_config_with_more_experts_than_the_gate(tmp_path):
    with pytest.raises(CheckpointError, match=r"moe.num_experts=8 but .*gate.weight routes to 4"):
        SphinxModel.from_pretrained(moe_copy(tmp_path, moe={"num_experts": 8,
                                                            "num_experts_per_tok": 2}))


def test_moe_tensors_in_a_dense_checkpoint_are_named(tmp_path):
    d = moe_copy(tmp_path)
    (d / "meta.json").write_text(json.dumps({"llama_type": "llama_ens_light"}))
    with pytest.raises(CheckpointError, match="hidden_dim is for the mixtral_sparse_ens"):
        SphinxModel.from_pretrained(d)


def test_unknown_llama_type_lists_all_six(tmp_path):
    d = moe_copy(tmp_path)
    (d / "meta.json").write_text(json.dumps({"llama_type": "mixtral_dense"}))
    with pytest.raises(CheckpointError, match="unknown llama_type 'mixtral_dense'") as e:
        SphinxModel.from_pretrained(d)
    for t in ("llama_ens_light", "llama_ens5_light", "mixtral_sparse_ens", "mixtral_sparse_ens5"):
        assert t in str(e.value)


# -- tiny checkpoints of every variant ---------------------------------------------------------
@pytest.mark.parametrize("variant, llama_type, views, per_view", [
    ("sphinx-tiny", "llama_ens_light", 1, 259),
    ("sphinx-tiny-1k", "llama_ens5_light", 5, 259),
    ("sphinx-moe", "mixtral_sparse_ens", 1, 291),
    ("sphinx-moe-1k", "mixtral_sparse_ens5", 5, 291),
])
def test_make_tiny_checkpoint_of_each_variant(variant, llama_type, views, per_view, tmp_path):
    from click.testing import CliRunner

    from sphinx_tools.cli import main

    result = CliRunner().invoke(main, ["make-tiny", str(tmp_path / "two"), "--variant", variant,
                                       "--mp", "2", "--seed", "4"])
    assert result.exit_code == 0, result.output
    two = tmp_path / "two"
    assert json.loads((two / "meta.json").read_text()) == {"llama_type": llama_type}
    saved = json.loads((two / "config.json").read_text())
    assert ("moe" in saved) == ("moe" in variant) and saved["n_kv_heads"] == 2
    m2 = SphinxModel.from_pretrained(two)  # the 2 shards merged at MP=1 (per expert for MoE)
    from sphinx_tools import make_tiny_checkpoint

    one = make_tiny_checkpoint(tmp_path / "one", variant=variant, seed=4)
    m1 = SphinxModel.from_pretrained(one)
    a, b = m1.state_dict(), m2.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert m1.cfg.image_tokens == views * per_view and m1.cfg.n_views == views
    assert SphinxModel.from_config(variant, device="meta").cfg.llama_type == llama_type
    size = m1.cfg.image_size
    image = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    both = m1.encode_images(image)
    assert both.shape == (2, views * per_view, m1.cfg.dim)
    # each image gets its own tokens whatever the batch
    torch.testing.assert_close(both[1:], m1.encode_images(image[1:]), atol=1e-5, rtol=0)
    gens = m1.generate(["What is in the image?"] * 2, [image[0], image[1]], max_gen_len=4, stop=())
    assert [len(g.token_ids) for g in gens] == [4, 4]


# -- everything above the runtime, on the new variants ------------------------------------------
@pytest.fixture(scope="module", params=["sphinx-tiny", "sphinx-moe-1k"])
def variant_ckpt(request, tmp_path_factory):
    from sphinx_tools import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt",
                                variant=request.param, seed=1)


EXAMPLES = Path(__file__).parents[1] / "examples" / "images"


def test_label_the_example_images_end_to_end(variant_ckpt, tmp_path):
    from click.testing import CliRunner

    from sphinx_tools.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for f in sorted(EXAMPLES.glob("*.png"))[:3]:
        shutil.copy(f, images / f.name)
    out = tmp_path / "out" / "labels.json"
    result = CliRunner().invoke(main, ["label", str(images), "-c", str(variant_ckpt), "-t",
                                       "detection,pose", "-o", str(out), "--max-gen-len", "8",
                                       "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    coco = json.loads(out.read_text())
    assert len(coco["images"]) == 3 and coco["failures"] == []
    assert coco["info"]["tasks"] == ["detection", "pose"]


def test_shared_prefix_batches_and_run_task_match_single_questions(variant_ckpt):
    from sphinx_tools import build_prompt, run_task

    m = SphinxModel.from_pretrained(variant_ckpt)
    images = [Image.open(f).convert("RGB") for f in sorted(EXAMPLES.glob("*.png"))[:2]]
    questions = [[build_prompt([["Detect all person shown in the image.", None]]),
                  build_prompt([["What is in the image?", None]])],
                 [build_prompt([["Describe the image.", None]])]]
    multi = m.generate_multi(images, questions, max_gen_len=6, stop=())
    for image, qs, gens in zip(images, questions, multi):
        for q, g in zip(qs, gens):
            assert g.token_ids == m.generate([q], [image], max_gen_len=6, stop=())[0].token_ids
    dets = run_task(m, images[0], "detection", max_gen_len=6, classes=["person"])
    assert len(dets) == len(dets.xyxy)  # parsed into detections (maybe none: random weights)


def test_ask_answers_with_each_variant(variant_ckpt):
    from click.testing import CliRunner

    from sphinx_tools.cli import main

    image = sorted(EXAMPLES.glob("*.png"))[0]
    args = ["ask", "-c", str(variant_ckpt), "-i", str(image), "--max-gen-len", "5", "--device", "cpu"]
    result = CliRunner().invoke(main, args + ["What is in the image?"])
    assert result.exit_code == 0, result.output
    assert result.output.strip()


def test_moe_four_shards_into_two_ranks(tmp_path):
    "Re-sharding per expert from more shards than ranks (4 -> 2), against the model at MP=1."
    from sphinx_tools import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "mp4", variant="sphinx-moe", mp=4, seed=6, n_kv_heads=4)
    m = SphinxModel.from_pretrained(ckpt)
    folder = GOLDEN_ROOT / "sphinx-moe-tiny"
    io = load_io(folder)
    image = golden_image(folder, io)
    tokens = io["prompt_token_ids"][None]
    ours = dict(io, logits=m.logits(tokens, image[None]), logits_text_only=m.logits(tokens, None),
                generated_token_ids=torch.tensor(m.generate([io["prompt"]], [image], max_gen_len=16,
                                                            stop=())[0].token_ids))
    run = tmp_path / "run"
    run.mkdir()
    torch.save(ours, run / "golden_io.pt")
    shutil.copy(folder / "input.png", run / "input.png")
    results = run_mp(2, ckpt, run, run / "golden_io.pt")
    full = m.state_dict()
    want = shard_state_dict(full, 2, m.cfg.n_experts)
    for rank, r in enumerate(results):
        assert "error" not in r, r["error"]
        assert r["logits_diff"] <= 1e-4 and r["text_only_diff"] <= 1e-4
        assert r["greedy"] == ours["generated_token_ids"].tolist()
        assert r["local_w1"] == [4 * 96 // 2, 64]
        mine = torch.load(run / f"rank{rank}.pt", weights_only=True)
        assert all(torch.equal(mine[k], want[rank]["llma." + k]) for k in mine)
