"Checkpoint loading: re-sharding, memory, and clear errors for every broken folder."

import json
import pickle
import shutil

import pytest
import torch

from sphinx_tools import CheckpointError, SphinxModel, make_tiny_checkpoint
from sphinx_tools.load import rank_slice
from sphinx_tools.tiny import shard_state_dict


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
