"Checkpoint loading: re-sharding, memory, and clear errors for every broken folder."

import json
import pickle
import shutil

import pytest
import torch

from sphinx_tools import CheckpointError, SphinxModel, make_tiny_checkpoint
from sphinx_tools.checkpoint import rank_slice, shard_state_dict


@pytest.mark.parametrize("ckpt_mp", [1, 2, 4, 8])
@pytest.mark.parametrize("runtime_mp", [1, 2, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_rank_slice_reshards_any_mp_to_any_mp(ckpt_mp, runtime_mp, dim):
    full = torch.randn(16, 24) if dim == 0 else torch.randn(24, 16)
    full = full.T.contiguous().T if dim == 1 else full
    pieces = list(full.chunk(ckpt_mp, dim=dim))
    for rank in range(runtime_mp):
        shape = list(full.shape)
        shape[dim] //= runtime_mp
        out = torch.empty(shape)
        rank_slice(pieces, dim, rank, runtime_mp, out)
        assert torch.equal(out, full.chunk(runtime_mp, dim=dim)[rank])


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    for f in dst.rglob("*"):
        f.chmod(0o644)
    return dst


def test_tiny_checkpoint_round_trip_any_shard_count(tmp_path, golden_io):
    a = make_tiny_checkpoint(tmp_path / "mp1", seed=3)
    b = make_tiny_checkpoint(tmp_path / "mp4", seed=3, mp=4)
    assert len(list(b.glob("consolidated.*-of-04.model.pth"))) == 4
    ma, mb = SphinxModel.from_pretrained(a), SphinxModel.from_pretrained(b)
    for k, v in ma.state_dict().items():
        assert torch.equal(v, mb.state_dict()[k]), k
    tokens = torch.tensor([ma.tokenizer.encode("What is in the image?")])
    torch.testing.assert_close(ma.logits(tokens, golden_io["image"][None]),
                               mb.logits(tokens, golden_io["image"][None]))


def test_tiny_checkpoint_is_deterministic(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", seed=5, variant="sphinx")
    b = make_tiny_checkpoint(tmp_path / "b", seed=5, variant="sphinx")
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()
    sa = torch.load(a / "consolidated.00-of-01.model.pth", weights_only=True)["model"]
    sb = torch.load(b / "consolidated.00-of-01.model.pth", weights_only=True)["model"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((a / "meta.json").read_text()) == {"llama_type": "llama_ens"}
    assert SphinxModel.from_pretrained(a).cfg.image_size == 224


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*nope"):
        SphinxModel.from_pretrained(tmp_path / "nope")


def test_no_shards(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no consolidated"):
        SphinxModel.from_pretrained(tmp_path / "empty")


def test_no_tokenizer(golden_dir, tmp_path):
    d = copy_ckpt(golden_dir, tmp_path / "c")
    (d / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        SphinxModel.from_pretrained(d)


def test_shard_set_with_holes(golden_dir, tmp_path):
    d = copy_ckpt(golden_dir / "mp2", tmp_path / "c")
    (d / "consolidated.01-of-02.model.pth").unlink()
    with pytest.raises(CheckpointError, match="holes.*consolidated.01-of-02"):
        SphinxModel.from_pretrained(d)


def test_unknown_llama_type(golden_dir, tmp_path):
    d = copy_ckpt(golden_dir, tmp_path / "c")
    (d / "meta.json").write_text(json.dumps({"llama_type": "llama_qformerv2_peft"}))
    with pytest.raises(CheckpointError, match="unknown llama_type 'llama_qformerv2_peft'"):
        SphinxModel.from_pretrained(d)


def test_missing_and_unexpected_keys(golden_dir, tmp_path):
    d = copy_ckpt(golden_dir, tmp_path / "c")
    f = d / "consolidated.00-of-01.model.pth"
    sd = torch.load(f, weights_only=True)["model"]
    sd.pop("llma.layers.1.feed_forward.w2.weight")
    sd["llma.layers.7.attention.wq.weight"] = torch.zeros(2, 2)
    torch.save({"model": sd}, f)
    with pytest.raises(CheckpointError) as e:
        SphinxModel.from_pretrained(d)
    assert "missing keys (1): layers.1.feed_forward.w2.weight" in str(e.value)
    assert "unexpected keys (1): layers.7.attention.wq.weight" in str(e.value)


def test_unused_tensors_may_be_absent(golden_dir, golden_io, tmp_path):
    d = copy_ckpt(golden_dir, tmp_path / "c")
    f = d / "consolidated.00-of-01.model.pth"
    sd = torch.load(f, weights_only=True)["model"]
    for k in [k for k in sd if k.startswith("llma.clip.") and ".visual." not in k] + [
            "llma.dinov2_vitg14.mask_token"]:
        sd.pop(k)
    torch.save({"model": sd}, f)
    m = SphinxModel.from_pretrained(d)
    logits = m.logits(golden_io["prompt_token_ids"][None], golden_io["image"][None])
    assert (logits - golden_io["logits"]).abs().max() <= 1e-4


def test_wrong_shape(golden_dir, tmp_path):
    d = copy_ckpt(golden_dir, tmp_path / "c")
    f = d / "consolidated.00-of-01.model.pth"
    sd = torch.load(f, weights_only=True)["model"]
    sd["llma.norm.weight"] = torch.ones(65)
    torch.save({"model": sd}, f)
    with pytest.raises(CheckpointError, match=r"llma.norm.weight has shape \(65,\)"):
        SphinxModel.from_pretrained(d)


def test_corrupt_shard(golden_dir, tmp_path):
    d = copy_ckpt(golden_dir, tmp_path / "c")
    f = d / "consolidated.00-of-01.model.pth"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="consolidated.00-of-01.model.pth"):
        SphinxModel.from_pretrained(d)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(golden_dir, tmp_path):
    d = copy_ckpt(golden_dir, tmp_path / "c")
    f = d / "consolidated.00-of-01.model.pth"
    torch.save({"model": {"llma.norm.weight": torch.ones(64)}, "x": Evil()}, f)
    with pytest.raises(CheckpointError, match="other than tensors"):
        SphinxModel.from_pretrained(d)
    f.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(CheckpointError, match="consolidated.00-of-01"):
        SphinxModel.from_pretrained(d)


def test_shard_shapes_split_as_manifest(golden_dir):
    full = torch.load(golden_dir / "consolidated.00-of-01.model.pth", weights_only=True)["model"]
    ours = shard_state_dict({k.removeprefix("llma."): v for k, v in full.items()}, 2)
    for r in range(2):
        ref = torch.load(golden_dir / "mp2" / f"consolidated.0{r}-of-02.model.pth", weights_only=True)["model"]
        assert ref.keys() == ours[r].keys()
        for k in ref:
            assert torch.equal(ref[k], ours[r][k]), k


# -- config.json sizes against the tensors -------------------------------------------------------
def with_config(golden_dir, tmp_path, **fields):
    d = tmp_path / "c"
    shutil.copytree(golden_dir, d, ignore=shutil.ignore_patterns("mp2"))
    args = json.loads((d / "config.json").read_text())
    args.update(fields)
    (d / "config.json").write_text(json.dumps(args))
    return d


@pytest.fixture
def never_built(monkeypatch):
    "Fail the test if the model is built: a bad size must be refused before anything is allocated."
    import sphinx_tools.sphinx_model

    def build_meta(cfg):
        raise AssertionError(f"the model was built for {cfg}")

    monkeypatch.setattr(sphinx_tools.sphinx_model, "build_meta", build_meta)


@pytest.mark.parametrize("field, value, message", [
    ("max_seq_len", 1e7, "max_seq_len=10000000 is larger than the supported 1048576"),
    ("max_seq_len", 0, "max_seq_len must be a positive integer, got 0"),
    ("n_layers", 1e6, r"n_layers=1000000 but the checkpoint holds 2 \(layers.0-1\)"),
    ("n_layers", 3, r"n_layers=3 but the checkpoint holds 2 \(layers.0-1\)"),
    ("n_layers", 2.5, "n_layers must be a positive integer, got 2.5"),
    ("n_layers", "2", "n_layers must be a positive integer, got '2'"),
    ("n_layers", True, "n_layers must be a positive integer, got True"),
    ("n_heads", 0, "n_heads must be a positive integer, got 0"),
    ("n_heads", 3, "dim 64 must divide by n_heads 3"),
    ("n_heads", 64, r"dim / n_heads = 64 / 64 = 1 must be even"),
    ("n_kv_heads", 2, r"n_kv_heads=2 heads of 16 \(dim 64 / n_heads=4\) make 32 key features, but "
                      "the checkpoint's layers.0.attention.wk.weight has 64 rows"),
    ("dim", 1e9, "dim=1000000000 but the checkpoint's tok_embeddings.weight is 64 wide"),
    ("dim", -64, "dim must be a positive integer, got -64"),
    ("multiple_of", 100, r"multiple_of=100 and ffn_dim_multiplier=None \(the default\) make a "
                         "feed-forward width of 200, but the checkpoint's "
                         "layers.0.feed_forward.w1.weight has 192 rows"),
    ("norm_eps", -1, "norm_eps must be a positive finite number, got -1"),
    ("rope_theta", float("nan"), "rope_theta must be a positive finite number, got nan"),
])
def test_config_sizes_are_checked_before_anything_is_built(golden_dir, tmp_path, never_built,
                                                           field, value, message):
    d = with_config(golden_dir, tmp_path, **{field: value})
    with pytest.raises(CheckpointError, match=message) as e:
        SphinxModel.from_pretrained(d)
    assert str(e.value).startswith(f"{d / 'config.json'}: ")


@pytest.mark.parametrize("field, value, message", [
    ("qf_vision_layers", 10**6, r"vision.qf_vision_layers=1000000 but the checkpoint holds 1 "
                                r"\(qformer.vision_model.encoder.layers.0-0\)"),
    ("dino_layers", 40, r"vision.dino_layers=40 but the checkpoint holds 2 "
                        r"\(dinov2_vitg14.blocks.0-1\)"),
    ("convnext_depths", [1, 1, 1, 30], r"vision.convnext_depths\[3\]=30 but the checkpoint holds 1"),
    ("dino_heads", 0, "vision.dino_heads must be a positive integer, got 0"),
    ("dino_heads", 5, "vision.dino_width 24 must divide by vision.dino_heads 5"),
    ("clip_width", -32, "vision.clip_width must be a positive integer, got -32"),
])
def test_vision_sizes_are_checked_before_anything_is_built(golden_dir, tmp_path, never_built,
                                                           field, value, message):
    from sphinx_tools.model import SphinxConfig

    vision = SphinxConfig.from_name("tiny").to_json()["vision"] | {field: value}
    d = with_config(golden_dir, tmp_path, vision=vision)
    with pytest.raises(CheckpointError, match=message):
        SphinxModel.from_pretrained(d)


def test_widths_that_do_not_fit_fail_before_any_weight_is_allocated(golden_dir, tmp_path):
    # The model is built on the meta device; a width that would need 176 TB for one weight must be
    # refused by the shape check, not by the allocator.
    from sphinx_tools.model import SphinxConfig

    vision = SphinxConfig.from_name("tiny").to_json()["vision"] | {"qf_vision_mlp": 2**40}
    d = with_config(golden_dir, tmp_path, vision=vision)
    with pytest.raises(CheckpointError, match=r"tensor llma.qformer.vision_model.encoder.layers.0.mlp"
                                              r".fc1.weight has shape \(80, 40\), the model expects "
                                              r"\(1099511627776, 40\)"):
        SphinxModel.from_pretrained(d)


def test_a_large_max_seq_len_builds_no_large_rope_table(golden_dir, golden_io, tmp_path):
    d = with_config(golden_dir, tmp_path, max_seq_len=1 << 20)
    m = SphinxModel.from_pretrained(d)
    assert m.cfg.max_seq_len == 1 << 20
    gen = m.generate([golden_io["prompt"]], [golden_io["image"]], max_gen_len=16, stop=())[0]
    assert gen.token_ids == golden_io["generated_token_ids"].tolist()  # the same RoPE rows
    assert m.transformer.freqs_cis.shape[0] == 4096  # the positions used, not 2 x 1M


def test_positions_past_the_rope_range_are_named(golden_dir, golden_io, tmp_path):
    m = SphinxModel.from_pretrained(with_config(golden_dir, tmp_path, max_seq_len=64))
    with pytest.raises(ValueError, match=r"position 1\d+ is past the RoPE range of this model "
                                         r"\(2 x max_seq_len = 128 positions\)"):
        m.logits(golden_io["prompt_token_ids"][None], golden_io["image"][None])


def test_the_name_demo_is_not_shadowed_by_a_folder_without_shards(tmp_path, monkeypatch):
    "``demo`` is the embedded model unless a real checkpoint folder is called that."
    from pathlib import Path

    from sphinx_tools import checkpoint

    installed = tmp_path / "installed"
    installed.mkdir()
    (installed / "tokenizer.model").write_bytes(b"x")
    monkeypatch.setattr(checkpoint, "DEMO_DIR", installed)
    monkeypatch.chdir(tmp_path)
    assert checkpoint.resolve("demo") == installed  # no ./demo at all
    (tmp_path / "demo" / "run").mkdir(parents=True)  # e.g. `demo build --work demo`
    assert checkpoint.resolve("demo") == installed
    (tmp_path / "demo" / "consolidated.00-of-01.model.pth").write_bytes(b"")
    assert checkpoint.resolve("demo") == Path("demo")  # a checkpoint folder named demo is the user's
    assert checkpoint.resolve(str(tmp_path / "demo")) == tmp_path / "demo"  # other paths pass
    monkeypatch.setattr(checkpoint, "DEMO_DIR", tmp_path / "not-installed")
    (tmp_path / "demo" / "consolidated.00-of-01.model.pth").unlink()
    with pytest.raises(CheckpointError, match="demo build"):
        checkpoint.resolve("demo")


# -- the prompt wording a checkpoint was trained on -------------------------------------------------
def test_task_options_file_is_read_into_the_model(tmp_path):
    from sphinx_tools.checkpoint import read_task_options, write_task_options

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=0)
    assert read_task_options(ckpt) == {} and SphinxModel.from_pretrained(ckpt).task_options == {}
    write_task_options(ckpt, {"layout": {"variant": "classes"}})
    assert SphinxModel.from_pretrained(ckpt).task_options == {"layout": {"variant": "classes"}}
    write_task_options(ckpt, {})  # nothing to carry: no stale file is left
    assert not (ckpt / "task_options.json").exists()


@pytest.mark.parametrize("text", ["{not json", '["layout"]', '{"layout": "classes"}'])
def test_a_bad_task_options_file_is_named(tmp_path, text):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=0)
    (ckpt / "task_options.json").write_text(text)
    with pytest.raises(CheckpointError, match="task_options.json"):
        SphinxModel.from_pretrained(ckpt)


def test_the_demo_model_carries_the_wording_its_scenes_ask_in():
    from sphinx_tools.checkpoint import DEMO_DIR, read_task_options
    from sphinx_tools.demo.synth import TRAINED_TASK_OPTIONS

    if not (DEMO_DIR / "tokenizer.model").is_file():
        pytest.skip("the demo model is not installed")
    assert read_task_options(DEMO_DIR) == TRAINED_TASK_OPTIONS
