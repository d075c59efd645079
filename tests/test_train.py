"Finetuning: conversation tokenization, loss masking, checkpoints in the released format, resume."

import json
from pathlib import Path

import pytest
import torch
import yaml

from sphinx_tools import SphinxModel, build_prompt
from sphinx_tools.errors import SphinxToolsError
from sphinx_tools.synth import write_dataset
from sphinx_tools.tiny import train_tokenizer
from sphinx_tools.tokenizer import Tokenizer
from sphinx_tools.train import (
    IGNORE,
    ConversationData,
    TokenPlaces,
    TrainConfig,
    batches,
    collate,
    conversation_text,
    coordinate_weights,
    init_model,
    loss_fn,
    packed_mask,
    packed_positions,
    patch_token_index,
    tokenize_conversation,
    tokenize_independent,
    train,
    train_device,
    train_local,
)


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_dataset(root / "data", 8, seed=3, progress=False, turns=2)
    convs = json.loads((root / "data" / "conversations.json").read_text())
    corpus = [conversation_text(c["conversations"])[0] for c in convs]
    train_tokenizer(root / "tok.model", 512, corpus=corpus)
    return root


def write_config(root: Path, out: str, **kw) -> Path:
    cfg = dict(init={"preset": "tiny", "tokenizer": "tok.model", "seed": 0},
               data=[{"path": "data/conversations.json", "root": "data"}], out=out,
               train=["llm", "proj", "tokens", "encoders"], steps=4, batch_size=2, lr=3e-3,
               warmup=1, save_every=2, log_every=1, seed=0)
    cfg.update(kw)
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_training_text_is_the_inference_template():
    conv = [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "<image>\nQ2"}, {"from": "gpt", "value": "A2"}]
    text, spans = conversation_text(conv)
    assert text.startswith(build_prompt([["Q1", "A1"], ["Q2", None]]))
    assert [text[a:b] for a, b in spans] == [" A1\n###", " A2\n###"]
    with pytest.raises(ValueError, match="alternate"):
        conversation_text([conv[1], conv[0]])


def test_labels_cover_answers_and_prompt_tokens_match_inference(synth_data):
    tok = Tokenizer(synth_data / "tok.model")
    convs = json.loads((synth_data / "data" / "conversations.json").read_text())
    for c in convs:
        ids, labels = tokenize_conversation(tok, c["conversations"])
        assert len(ids) == len(labels) and ids[0] == tok.bos_id
        first_q = c["conversations"][0]["value"]
        prompt_ids = tok.encode(build_prompt([[first_q, None]]))
        assert ids[: len(prompt_ids)] == prompt_ids  # the model sees exactly the inference prompt
        assert all(label == IGNORE for label in labels[: len(prompt_ids)])
        answered = tok.decode([t for t in labels if t != IGNORE])
        for turn in c["conversations"][1::2]:
            assert turn["value"].strip() in answered
        assert answered.count("###") == len(c["conversations"]) // 2


def test_dataset_ratios(synth_data):
    tok = Tokenizer(synth_data / "tok.model")
    path = str(synth_data / "data" / "conversations.json")
    n = len(json.loads(Path(path).read_text()))
    data = ConversationData([{"path": path, "ratio": 1.0}, {"path": path, "ratio": 0.5}], tok, 448, 512, 0)
    order = data.epoch(0)
    assert sum(d == 0 for d, _ in order) == n and sum(d == 1 for d, _ in order) == round(n / 2)
    assert order == data.epoch(0) and order != data.epoch(1)


def test_train_saves_loadable_checkpoint_and_resumes_identically(synth_data):
    straight = train(TrainConfig.load(write_config(synth_data, "straight")), progress=False)
    cfg = TrainConfig.load(write_config(synth_data, "resumed"))
    cfg.steps = 2
    train(cfg, progress=False)
    state = torch.load(Path(cfg.out) / "last" / "train_state.pt", weights_only=True)
    assert state["step"] == 2
    resumed = train(TrainConfig.load(write_config(synth_data, "resumed")), progress=False)
    a = SphinxModel.from_pretrained(straight).state_dict()
    b = SphinxModel.from_pretrained(resumed).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    log = [json.loads(x) for x in (Path(cfg.out).parent / "resumed_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def test_loader_workers_give_the_same_batches_across_epochs(synth_data):
    tok = Tokenizer(synth_data / "tok.model")
    path = str(synth_data / "data" / "conversations.json")
    data = ConversationData([{"path": path, "root": str(synth_data / "data")}], tok, 448, 512, 0)
    n = len(data.epoch(0))
    order = [(e, k, d, i) for e in range(3) for k, (d, i) in enumerate(data.epoch(e))]
    runs = {}
    for workers in (0, 2):
        feed = batches(data, 3, 0, n - 4, workers)  # four examples before epoch 1
        runs[workers] = [next(feed) for _ in range(6)]
    for (a, pa), (b, pb) in zip(runs[0], runs[2]):
        assert pa == pb
        for x, y in zip(a, b):
            assert (x is None and y is None) or torch.equal(x, y)
    seen = order[n - 4: n + 14]  # crosses into epoch 1 (and epoch 2 when it is short)
    assert [p for _, p in runs[0]] == [(e, k + 1) for e, k, _, _ in seen[2::3]]
    ids = [row for t, _ in runs[0] for row in t[0]]
    expect = [collate([data.example(d, i)])[0][0] for _, _, d, i in seen]
    assert all(torch.equal(a[: len(b)], b) and not a[len(b):].any() for a, b in zip(ids, expect))


def test_resuming_with_loader_workers_matches_a_straight_run(synth_data):
    straight = train(TrainConfig.load(write_config(synth_data, "straight0")), progress=False)
    cfg = TrainConfig.load(write_config(synth_data, "workers", loader_workers=2))
    cfg.steps = 2
    train(cfg, progress=False)
    resumed = train(TrainConfig.load(write_config(synth_data, "workers", loader_workers=2)), progress=False)
    a = SphinxModel.from_pretrained(straight).state_dict()
    b = SphinxModel.from_pretrained(resumed).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_training_lowers_the_loss_on_its_data(synth_data):
    out = train(TrainConfig.load(write_config(synth_data, "fit", steps=25, lr=3e-3, warmup=2,
                                              save_every=100)), progress=False)
    log = [json.loads(x) for x in (out.parent.parent / "fit_log.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in log[:3]) / 3
    last = sum(r["loss"] for r in log[-3:]) / 3
    assert last < 0.7 * first


def test_only_chosen_parts_change(synth_data):
    out = train(TrainConfig.load(write_config(synth_data, "proj", train=["proj"], steps=2)), progress=False)
    before = SphinxModel.from_config("tiny", device="cpu", seed=0)
    after = SphinxModel.from_pretrained(out)
    for k, v in after.state_dict().items():
        same = torch.equal(v, before.state_dict()[k])
        assert same != k.startswith(("qformer_proj.", "visual_proj.")), k


def test_independent_turns_pack_one_turn_prompts(synth_data):
    "Each packed turn gets the logits it would get alone; the shared prefix is stored once."
    cfg = TrainConfig.load(write_config(synth_data, "packed"))
    model, tok = init_model(cfg)
    model.eval()
    convs = [c["conversations"] for c in json.loads((synth_data / "data" / "conversations.json").read_text())]
    conv = next(c for c in convs if len(c) >= 4)
    ids, labels, segments = tokenize_independent(tok, conv)
    n_prefix = segments.count(0)
    assert ids[0] == tok.bos_id and n_prefix >= len(tok.encode(build_prompt([["", None]]).split("###")[0]))
    assert sorted(set(segments)) == list(range(len(conv) // 2 + 1))
    assert sum(t != IGNORE for t in labels) == sum(
        sum(t != IGNORE for t in tokenize_conversation(tok, conv[k:k + 2])[1]) for k in range(0, len(conv), 2))
    other = tokenize_independent(tok, convs[0])
    batch = [{"ids": ids, "labels": labels, "segments": segments, "image": torch.rand(3, 448, 448)},
             {"ids": other[0], "labels": other[1], "segments": other[2], "image": torch.rand(3, 448, 448)}]
    b_ids, _, images, b_seg, places = collate(batch)
    assert places is None
    assert b_seg is not None and (b_seg[1, len(other[0]):] == -1).all()  # padding
    with torch.no_grad():
        img = model.encode_image(images)
        h = model.embed(b_ids, img)
        n_image = h.shape[1] - b_ids.shape[1]
        packed = model(h, packed_positions(b_seg, n_image), mask=packed_mask(b_seg, n_image),
                       keep_last=b_ids.shape[1])
        for k in range(1, len(conv) // 2 + 1):
            alone, _ = tokenize_conversation(tok, conv[2 * k - 2: 2 * k])
            assert alone[:n_prefix] == ids[:n_prefix]
            assert alone[n_prefix:] == [t for t, s in zip(ids, segments) if s == k]
            t = torch.tensor([alone])
            hh = model.embed(t, img[:1])
            single = model(hh, torch.arange(hh.shape[1])[None], keep_last=len(alone))
            rows = (b_seg[0] == k).nonzero().flatten()
            torch.testing.assert_close(packed[0, rows], single[0, n_prefix:], atol=1e-4, rtol=1e-4)
    short, _, short_seg = tokenize_independent(tok, conv, max_len=len(ids) - 1)
    assert max(short_seg) < max(segments) and len(short) <= len(ids) - 1  # whole turns dropped


def test_training_on_independent_turns(synth_data):
    data = [{"path": "data/conversations.json", "root": "data", "independent_turns": True}]
    out = train(TrainConfig.load(write_config(synth_data, "indep", data=data, steps=12, warmup=2,
                                              save_every=100)), progress=False)
    log = [json.loads(x) for x in (out.parent.parent / "indep_log.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in log)  # no NaN from the block mask or padding
    assert sum(r["loss"] for r in log[-3:]) < sum(r["loss"] for r in log[:3])


def test_coordinate_weight_scales_the_coordinate_tokens(synth_data, tmp_path):
    tok = Tokenizer(train_tokenizer(tmp_path / "coord.model", 512, corpus=[
        conversation_text(c["conversations"])[0]
        for c in json.loads((synth_data / "data" / "conversations.json").read_text())],
        coordinate_tokens=True))
    assert coordinate_weights(tok, 1.0) is None
    with pytest.raises(SphinxToolsError, match="coordinate_weight must be positive, got 0"):
        coordinate_weights(tok, 0)
    w = coordinate_weights(tok, 4.0)
    coord = [tok.sp.piece_to_id(f"0.{i:02d}") for i in range(100)] + [tok.sp.piece_to_id("1.00")]
    assert w.shape == (tok.n_words,) and bool((w[coord] == 4).all()) and w.sum() == tok.n_words + 3 * 101

    cfg = TrainConfig.load(write_config(synth_data, "cw"))
    model, _ = init_model(cfg)  # the same vocabulary size: the weights index its logits
    assert model.cfg.vocab_size == tok.n_words
    other = max(set(range(3, tok.n_words)) - set(coord))
    ids = torch.tensor([[1, other, coord[41], other, coord[3]]])
    labels = ids.clone()
    labels[0, :2] = IGNORE
    with torch.no_grad():
        plain = loss_fn(model, ids, labels, None)
        weighted = loss_fn(model, ids, labels, None, token_weight=w)
        ce = torch.nn.functional.cross_entropy(
            model(model.embed(ids, None), torch.arange(5)[None])[0, 1:4], ids[0, 2:], reduction="none")
    torch.testing.assert_close(plain, ce.mean())
    torch.testing.assert_close(weighted, (4 * ce[0] + ce[1] + 4 * ce[2]) / 9)


def test_bad_config(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("init: {}\ndata: []\nout: x\nbogus: 1\n")
    with pytest.raises(Exception, match="bogus"):
        TrainConfig.load(p)


def test_data_parallel_matches_gradient_accumulation(synth_data):
    # 2 ranks of batch 1 average their gradients: the same gradient as 1 process accumulating 2
    # micro-batches of 1 over the same examples (rank r takes every 2nd example from r). Adam's
    # state after one step holds that gradient (its weight update is ~lr * sign, too coarse to
    # compare), so the test compares the saved optimizer moments. Text only: the Q-Former's
    # dropout draws differ between ranks and a single process.
    convs = json.loads((synth_data / "data" / "conversations.json").read_text())
    (synth_data / "text.json").write_text(json.dumps([{"conversations": c["conversations"]} for c in convs]))
    data = [{"path": "text.json"}]
    cfg = TrainConfig.load(write_config(synth_data, "dp", data=data, steps=1, batch_size=1))
    cfg.num_threads = 1
    dp = train_local(cfg, procs=2, progress=False)
    acc = train(TrainConfig.load(write_config(synth_data, "accum", data=data, steps=1, batch_size=1,
                                              grad_accum=2)), progress=False)
    solo = train(TrainConfig.load(write_config(synth_data, "solo", data=data, steps=1, batch_size=1)),
                 progress=False)
    a, b, c = (torch.load(ck / "train_state.pt", weights_only=True)["optimizer"]["state"]
               for ck in (dp, acc, solo))
    assert a.keys() == b.keys() and len(a) > 20  # the unused encoders have no state in either
    for i in a:
        torch.testing.assert_close(a[i]["exp_avg"], b[i]["exp_avg"], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"], rtol=1e-4, atol=1e-12)
    # one rank's gradient alone is not that (the ranks saw different examples)
    assert c.keys() == a.keys()
    assert not all(torch.allclose(c[i]["exp_avg"], a[i]["exp_avg"], rtol=1e-2) for i in a)
    torch.testing.assert_close(SphinxModel.from_pretrained(dp).state_dict()["output.weight"],
                               SphinxModel.from_pretrained(acc).state_dict()["output.weight"],
                               rtol=0, atol=2 * 3e-3)  # one Adam step of lr 3e-3 apart at most
    log = [json.loads(x) for x in (synth_data / "dp_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["dp"]) for r in log] == [(1, 2)]


def test_train_local_rejects_bad_procs(synth_data):
    with pytest.raises(SphinxToolsError, match="procs must be >= 1, got 0"):
        train_local(TrainConfig.load(write_config(synth_data, "bad")), procs=0)


def test_cli_trains_with_local_processes(synth_data):
    from click.testing import CliRunner

    from sphinx_tools.cli import main

    cfg = write_config(synth_data, "cli", steps=3, batch_size=1, save_every=100)
    res = CliRunner().invoke(main, ["train", str(cfg), "--steps", "2", "--procs", "2", "--threads", "1",
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert f"checkpoint: {synth_data / 'cli' / 'last'}" in res.output
    log = [json.loads(x) for x in (synth_data / "cli_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["dp"]) for r in log] == [(1, 2), (2, 2)]
    assert SphinxModel.from_pretrained(synth_data / "cli" / "last").transformer.cfg.dim > 0


def test_training_device(monkeypatch, synth_data):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_device("auto") == train_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "xla", "cuda:x", ""):
        with pytest.raises(SphinxToolsError, match=f"unknown training device {bad!r}"):
            train_device(bad)
    with pytest.raises(SphinxToolsError, match="'cuda' asked for, but CUDA is not available"):
        train_device("cuda")
    with pytest.raises(SphinxToolsError, match="unknown training device 'gpu'"):  # before any work
        train_local(TrainConfig.load(write_config(synth_data, "devbad", device="gpu")), procs=2)

    # with GPUs: auto and cuda are this process's LOCAL_RANK one (as torchrun sets it)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert train_device("auto") == train_device("cuda") == torch.device("cuda", 1)
    assert train_device("cuda:0") == torch.device("cuda", 0)
    assert train_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(SphinxToolsError, match=r"cuda:2 \(LOCAL_RANK 2\) does not exist: 2 GPU"):
        train_device("auto")
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = TrainConfig.load(write_config(synth_data, "devs"))
    with pytest.raises(SphinxToolsError, match="3 processes but 2 GPU"):
        train_local(cfg, procs=3)
    cfg.device = "cuda:1"
    with pytest.raises(SphinxToolsError, match="'cuda:1' names one GPU; 2 processes"):
        train_local(cfg, procs=2)


def _coco_file(tmp_path, images, boxes):
    cats = [{"id": 7, "name": "thing"}, {"id": 9, "name": "other"}]
    anns = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b} for k, (i, c, b) in enumerate(boxes)]
    p = tmp_path / "coco.json"
    p.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return p


def test_dense_targets_follow_the_views(tmp_path):
    from sphinx_tools.warmup import DenseTargets

    images = [{"id": 1, "file_name": "a.png", "width": 448, "height": 448},
              {"id": 2, "file_name": "b.png", "width": 200, "height": 100}]
    coco = _coco_file(tmp_path, images, [(1, 7, [0, 0, 224, 224]), (2, 9, [0, 0, 200, 100])])
    d = DenseTargets(coco, tmp_path, 448, n_views=5, grid=4, sub=4)
    assert d.width == 16 + 1 + 2  # sub-cells, background, categories
    from PIL import Image

    Image.new("RGB", (448, 448)).save(tmp_path / "a.png")
    image, t = d.example(0)
    assert image.shape == (3, 448, 448) and t.shape == (5, 16, 19)
    fg = t[..., :16].mean(-1).view(5, 4, 4)  # per patch: the covered share of its cells
    want = torch.zeros(4, 4)
    want[:2, :2] = 1  # the global view: the top-left quarter
    torch.testing.assert_close(fg[0], want)
    torch.testing.assert_close(fg[1], torch.ones(4, 4))  # the top-left quadrant is all box
    assert fg[2:].abs().sum() == 0
    # what each patch shows: background or category 7 (the first category), as shares of its area
    torch.testing.assert_close(t[0, :, 17].view(4, 4), want)
    torch.testing.assert_close(t[0, :, 16].view(4, 4), 1 - want)
    torch.testing.assert_close(t[..., 16:].sum(-1), torch.ones(5, 16))
    assert t[..., 18].abs().sum() == 0
    # a wide image is padded top and bottom: its full-image box covers the middle rows
    cov = d.coverage(1)
    rows = cov[0].mean(1)
    assert rows[: d.res // 4].sum() == 0 and rows[d.res // 4: 3 * d.res // 4].min() == 1
    assert cov[2].sum() == cov[0].sum() and cov[1].sum() == 0  # category 9 is channel 1


def test_dense_position_targets_give_each_patch_its_object_box_in_view_fractions(tmp_path):
    from PIL import Image

    from sphinx_tools.warmup import DenseTargets

    images = [{"id": 1, "file_name": "a.png", "width": 448, "height": 448}]
    coco = _coco_file(tmp_path, images, [(1, 7, [0, 0, 224, 224]), (1, 9, [112, 112, 80, 80])])
    d = DenseTargets(coco, tmp_path, 448, n_views=5, grid=4, sub=4, position=True)
    assert d.regressed == 16 + 4 and d.width == 16 + 4 + 1 + 2
    Image.new("RGB", (448, 448)).save(tmp_path / "a.png")
    _, t = d.example(0)
    plain = DenseTargets(coco, tmp_path, 448, n_views=5, grid=4, sub=4).example(0)[1]
    torch.testing.assert_close(torch.cat([t[..., :16], t[..., 20:]], -1), plain)  # the rest as before
    box = t[..., 16:20]
    # global view: the big box (0, 0, .5, .5) under the top-left patches, the small one, listed
    # later, under the patch whose centre it holds; elsewhere each patch's own cell
    g = box[0].view(4, 4, 4)
    torch.testing.assert_close(g[0, 0], torch.tensor([0, 0, 0.5, 0.5]))
    e = 192 / 448  # the small box's right and bottom edge
    torch.testing.assert_close(g[1, 1], torch.tensor([0.25, 0.25, e, e]))
    torch.testing.assert_close(g[3, 2], torch.tensor([0.5, 0.75, 0.75, 1.0]))
    # the top-left quadrant view: the big box is the whole view, the small one from (.5, .5)
    q = box[1].view(4, 4, 4)
    torch.testing.assert_close(q[0, 3], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(q[2, 2], torch.tensor([0.5, 0.5, 2 * e, 2 * e]))
    torch.testing.assert_close(q[3, 3], torch.tensor([0.0, 0.0, 1.0, 1.0]))  # centre past its edge
    torch.testing.assert_close(box[4].view(4, 4, 4)[0, 0], torch.tensor([0, 0, 0.25, 0.25]))


def test_dense_targets_keep_the_images_of_chosen_categories(tmp_path):
    from sphinx_tools.warmup import DenseTargets

    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in (1, 2, 3)]
    coco = _coco_file(tmp_path, images, [(1, 7, [0, 0, 9, 9]), (2, 9, [0, 0, 9, 9]), (2, 7, [20, 20, 9, 9])])
    assert [im["id"] for im in DenseTargets(coco, tmp_path, 448, 5, 4, 4).images] == [1, 2, 3]
    d = DenseTargets(coco, tmp_path, 448, 5, 4, 4, categories=["other"])
    assert [im["id"] for im in d.images] == [2]
    assert d.coverage(0)[1].sum() > 0  # its boxes of other categories are still targets
    with pytest.raises(SphinxToolsError, match=r"categories \['dog'\] are not in .*it has \['other', 'thing'\]"):
        DenseTargets(coco, tmp_path, 448, 5, 4, 4, categories=["dog", "thing"])


def test_coco_readers_name_the_bad_file_and_entry(tmp_path):
    from sphinx_tools.train import TokenPlaces
    from sphinx_tools.warmup import DenseTargets, read_coco

    with pytest.raises(SphinxToolsError, match="cannot read COCO boxes from .*none.json"):
        read_coco(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    with pytest.raises(SphinxToolsError, match=r"bad.json: KeyError\('annotations'\)"):
        TokenPlaces(bad, tmp_path, 448, 5, 4)
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [], "categories": []}))
    with pytest.raises(SphinxToolsError, match="image .*'a.png'.* needs id, file_name, width, height"):
        DenseTargets(bad, tmp_path, 448, 5, 4, 4)
    bad.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"name": "x"}]}))
    assert read_coco(bad).categories is None  # categories only read when asked
    with pytest.raises(SphinxToolsError, match="category {'name': 'x'} needs id"):
        read_coco(bad, categories=True)


def test_encoder_warmup_config_errors(tmp_path):
    from sphinx_tools.warmup import check_config

    with pytest.raises(SphinxToolsError, match="needs `coco`"):
        check_config({"steps": 3}, tmp_path)
    with pytest.raises(SphinxToolsError, match=r"unknown encoder_warmup keys \['stpes'\]"):
        check_config({"coco": "c.json", "stpes": 3}, tmp_path)
    with pytest.raises(SphinxToolsError, match="encoder_warmup.steps must be a positive integer, got 0"):
        check_config({"coco": "c.json", "steps": 0}, tmp_path)
    with pytest.raises(SphinxToolsError, match="categories must be a non-empty list of names, got 'circle'"):
        check_config({"coco": "c.json", "categories": "circle"}, tmp_path)
    with pytest.raises(SphinxToolsError, match="position must be true or false, got 'yes'"):
        check_config({"coco": "c.json", "position": "yes"}, tmp_path)
    spec = check_config({"coco": "d/c.json"}, tmp_path)
    assert spec["position"] is False and spec["images"] == str((tmp_path / "d").resolve()) and spec["steps"] == 600


def test_encoder_warmup_trains_the_encoders_on_boxes(synth_data):
    from sphinx_tools.warmup import check_config, warmup_encoders

    cfg = TrainConfig.load(write_config(synth_data, "warm0"))
    model, _ = init_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = check_config({"coco": "data/coco.json", "images": "data/images", "steps": 40,
                         "batch_size": 2, "lr": 3e-3, "warmup": 2}, synth_data)
    torch.set_num_threads(2)
    losses = warmup_encoders(model, spec, "cpu", progress=False)
    assert len(losses) == 40 and sum(losses[-5:]) < 0.5 * sum(losses[:5])
    after = model.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        if k.startswith(("layers.", "tok_embeddings.", "output.", "qformer", "start_img", "end_img")):
            assert not changed, k
    assert not torch.equal(before["visual_proj.0.weight"], after["visual_proj.0.weight"])
    assert not torch.equal(before["clip.visual.conv1.weight"], after["clip.visual.conv1.weight"])
    assert all(p.grad is None for p in model.parameters())


def test_encoder_warmup_reads_the_same_batches_with_loader_workers(synth_data):
    from sphinx_tools.warmup import check_config, warmup_encoders

    spec = check_config({"coco": "data/coco.json", "images": "data/images", "steps": 3, "batch_size": 3},
                        synth_data)
    states = []
    for workers in (0, 2):
        model, _ = init_model(TrainConfig.load(write_config(synth_data, "warm_workers")))
        losses = warmup_encoders(model, spec, "cpu", progress=False, workers=workers)
        states.append((losses, model.state_dict()))
    assert states[0][0] == states[1][0]
    for k, v in states[0][1].items():
        torch.testing.assert_close(v, states[1][1][k], msg=k)


def test_training_with_encoder_warmup_runs_it_once(synth_data):
    warm = {"coco": "data/coco.json", "images": "data/images", "steps": 3, "batch_size": 1}
    cfg = TrainConfig.load(write_config(synth_data, "warm", steps=2, train=["llm", "proj", "tokens"],
                                        encoder_warmup=warm))
    first = train(cfg, progress=False)
    cfg = TrainConfig.load(write_config(synth_data, "warm", steps=4, train=["llm", "proj", "tokens"],
                                        encoder_warmup=warm))
    train(cfg, progress=False)  # resumes at step 2: the encoders are warm already
    log = [json.loads(x) for x in (synth_data / "warm_log.jsonl").read_text().splitlines()]
    assert [r.get("warmup_step") for r in log] == [3, None, None, None, None]
    assert [r["step"] for r in log[1:]] == [1, 2, 3, 4]
    assert SphinxModel.from_pretrained(first).transformer.cfg.dim > 0


def test_token_places_give_every_view_s_patches_their_object_s_box_in_the_whole_image(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 448, "height": 224}]  # padded: 112 px above
    coco = _coco_file(tmp_path, images, [(1, 7, [0, 0, 224, 224]), (1, 9, [224, 112, 80, 40])])
    places = TokenPlaces(coco, tmp_path, 448, n_views=5, grid=4)
    t = places.targets(tmp_path / "a.png").view(5, 4, 4, 4)  # view, row, column, box
    big = torch.tensor([0, 0.25, 0.5, 0.75])  # the padded square's fractions
    small = torch.tensor([0.5, 0.5, 304 / 448, 264 / 448])
    torch.testing.assert_close(t[0, 1, 0], big)  # global view
    torch.testing.assert_close(t[0, 2, 1], big)
    assert t[0, 0, 0].isnan().all()  # centre (.125, .125): in the padding
    # the quadrants' patches name the same boxes in the same (whole-image) fractions, not their view's
    torch.testing.assert_close(t[1, 3, 3], big)  # top-left quadrant, centre (.4375, .4375)
    torch.testing.assert_close(t[4, 0, 0], small)  # bottom-right quadrant, centre (.5625, .5625)
    torch.testing.assert_close(t[3, 0, 3], big)  # bottom-left quadrant, centre (.4375, .5625)
    assert t[4, 3, 3].isnan().all()
    assert places.targets(tmp_path / "other.png").isnan().all()  # an image the json does not have


def test_patch_token_index_points_at_each_view_s_patch_tokens():
    from sphinx_tools.warmup import patch_tokens

    model = SphinxModel.from_config("tiny", device="cpu").transformer
    images = torch.rand(2, 3, 448, 448)
    with torch.no_grad():
        seq = model.embed(torch.zeros(2, 3, dtype=torch.long), model.encode_image(images))
        want = patch_tokens(model, images)  # (B, views, patches, dim)
    index = patch_token_index(model.cfg)
    assert index.shape == (model.cfg.n_views * model.cfg.vision.grid ** 2,)
    torch.testing.assert_close(seq[:, index], want.flatten(1, 2))


def test_token_position_loss_trains_the_first_layers_only(synth_data):
    model, tok = init_model(TrainConfig.load(write_config(synth_data, "tp_grad")))
    model.eval()  # no dropout: the two forwards below must agree
    g = model.cfg.vision.grid
    data = ConversationData([{"path": str(synth_data / "data" / "conversations.json"),
                              "root": str(synth_data / "data")}], tok, 448, 512, 0,
                            TokenPlaces(synth_data / "data" / "coco.json", synth_data / "data" / "images",
                                        448, 5, g))
    ids, labels, images, segments, places = collate([data.example(0, i) for i in range(2)])
    assert places.shape == (2, 5 * g * g, 4) and (~places[..., 0].isnan()).any()
    head = torch.nn.Linear(model.cfg.dim, 4)
    total, language, aux = loss_fn(model, ids, labels, images, segments, position=(head, 0, places, 3.0))
    torch.testing.assert_close(language, loss_fn(model, ids, labels, images, segments))
    assert set(aux) == {"position"}
    aux = aux["position"]
    torch.testing.assert_close(total, language + 3 * aux)
    aux.backward()
    assert model.layers[0].attention.wq.weight.grad.abs().sum() > 0 and head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.layers[1].parameters())  # above the read-out layer


def test_training_with_token_position_resumes_identically(synth_data):
    tp = {"coco": "data/coco.json", "images": "data/images", "layer": 0, "weight": 5.0}
    straight = train(TrainConfig.load(write_config(synth_data, "tp_straight", token_position=tp)),
                     progress=False)
    cfg = TrainConfig.load(write_config(synth_data, "tp_resumed", token_position=tp))
    cfg.steps = 2
    train(cfg, progress=False)
    resumed = train(TrainConfig.load(write_config(synth_data, "tp_resumed", token_position=tp)), progress=False)
    a = SphinxModel.from_pretrained(straight).state_dict()
    b = SphinxModel.from_pretrained(resumed).state_dict()
    assert a.keys() == SphinxModel.from_config("tiny", device="cpu").state_dict().keys()
    for k in a:  # the head is not part of the checkpoint, and its state resumes with the rest
        torch.testing.assert_close(a[k], b[k], msg=k)
    log = [json.loads(x) for x in (Path(cfg.out).parent / "tp_resumed_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["position_loss"] > 0 for r in log)


def test_token_position_config_errors(synth_data, tmp_path):
    from sphinx_tools.train import check_token_position

    with pytest.raises(SphinxToolsError, match="token_position needs coco"):
        check_token_position({"layer": 1}, tmp_path)
    with pytest.raises(SphinxToolsError, match="layer must be an int >= 0, got -1"):
        check_token_position({"coco": "c.json", "layer": -1}, tmp_path)
    with pytest.raises(SphinxToolsError, match="weight must be positive, got 0"):
        check_token_position({"coco": "c.json", "weight": 0}, tmp_path)
    spec = check_token_position({"coco": "d/c.json"}, tmp_path)
    assert spec == {"coco": str((tmp_path / "d/c.json").resolve()), "images": str((tmp_path / "d").resolve()),
                    "layer": 1, "weight": 10.0}
    # the layer is checked before the encoder warm-up (whose missing COCO file would fail first otherwise)
    warm = {"coco": "missing.json", "steps": 1}
    cfg = TrainConfig.load(write_config(synth_data, "tp_deep", token_position={"coco": "data/coco.json", "layer": 9},
                                        encoder_warmup=warm))
    with pytest.raises(SphinxToolsError, match="token_position.layer 9 is past the model's 2 layers"):
        train(cfg, progress=False)
    cfg = TrainConfig.load(write_config(synth_data, "ba_deep", box_attention={"layer": 2}, encoder_warmup=warm))
    with pytest.raises(SphinxToolsError, match="box_attention.layer 2 is past the model's 2 layers"):
        train(cfg, progress=False)
    with pytest.raises(SphinxToolsError, match="cannot read COCO boxes from .*missing.json"):
        train(TrainConfig.load(write_config(synth_data, "warm_missing", encoder_warmup=warm)), progress=False)
    cfg = TrainConfig.load(write_config(synth_data, "data_missing", data=[{"path": "none.json"}],
                                        encoder_warmup=warm))
    with pytest.raises(SphinxToolsError, match="none.json"):  # the data too
        train(cfg, progress=False)


@pytest.fixture(scope="module")
def coord_tok(synth_data):
    path = synth_data / "coord_tok.model"
    if not path.is_file():
        train_tokenizer(path, 512, corpus=[
            conversation_text(c["conversations"])[0]
            for c in json.loads((synth_data / "data" / "conversations.json").read_text())], coordinate_tokens=True)
    return Tokenizer(path)


def test_box_pieces_find_the_box_each_answer_starts_with(coord_tok):
    from sphinx_tools.train import BoxPieces

    conv = [{"from": "human", "value": "Where is the red circle?"}, {"from": "gpt", "value": "[0.10,0.20,0.50,0.60]"},
            {"from": "human", "value": "Detect circles."}, {"from": "gpt", "value": "<p>circles</p> [0.05,0.10,0.30,0.40;0.60,0.60,0.90,0.80]"},
            {"from": "human", "value": "Pose?"}, {"from": "gpt", "value": "[0.10,0.20,0.30,0.40,0.50]"},  # not a box
            {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "two"}]
    ids, labels, segments = tokenize_independent(coord_tok, conv)
    found = BoxPieces(coord_tok).first_boxes(torch.tensor([ids]), torch.tensor([labels]), torch.tensor([segments]))
    assert [(b, segments[j]) for b, j, _ in found] == [(0, 1), (0, 2)]
    torch.testing.assert_close(torch.tensor([box for _, _, box in found]),
                               torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.05, 0.1, 0.3, 0.4]]))
    assert all(coord_tok.sp.id_to_piece(ids[j]).endswith("[") for _, j, _ in found)
    with pytest.raises(SphinxToolsError, match="needs a tokenizer with coordinate tokens"):
        BoxPieces(Tokenizer(coord_tok.path.with_name("tok.model")))


def test_box_attention_loss_is_the_attention_head_0_pays_to_the_box(coord_tok, monkeypatch):
    import sphinx_tools.model as model_module
    from sphinx_tools.train import BoxPieces, box_attention_loss
    from sphinx_tools.warmup import patch_owners

    cfg = TrainConfig(init={"preset": "tiny", "tokenizer": str(coord_tok.path), "seed": 0}, data=[], out="x")
    model, tok = init_model(cfg)
    model.eval()
    conv = [{"from": "human", "value": "Where is the red circle?"}, {"from": "gpt", "value": "[0.10,0.20,0.50,0.60]"},
            {"from": "human", "value": "Where is the blue square?"}, {"from": "gpt", "value": "[0.55,0.50,0.95,0.90]"}]
    ids, labels, segments = (torch.tensor([x]) for x in tokenize_independent(tok, conv))
    images = torch.rand(1, 3, 448, 448)
    pieces = BoxPieces(tok)
    recorded = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, *args, **kw):  # the model's own attention, written out
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # the LLM's packed mask only
            s = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~attn_mask, float("-inf"))
            recorded.append(s.softmax(-1))
        return sdpa(q, k, v, attn_mask, *args, **kw)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", recording)
    layer = 1
    total, language, aux = loss_fn(model, ids, labels, images, segments, box_attention=(pieces, layer, 2.0))
    monkeypatch.undo()
    probs = recorded[layer][0, 0]  # layer 1 of the LLM (the encoders' attention has no bool mask), head 0
    n_image = model.cfg.image_tokens
    index = patch_token_index(model.cfg)
    want = []
    for _, j, box in pieces.first_boxes(ids, labels, segments):
        on = index[torch.from_numpy(patch_owners([box], 5, model.cfg.vision.grid).reshape(-1) >= 0)]
        want.append(-torch.log(probs[j + n_image, on].sum() + 1e-6))
    assert len(want) == 2
    torch.testing.assert_close(aux["box_attention"], torch.stack(want).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(total, language + 2 * aux["box_attention"])
    aux["box_attention"].backward()
    assert model.layers[layer].attention.wq.weight.grad.abs().sum() > 0
    assert model.layers[layer].attention.wv.weight.grad is None  # the scores only
    assert all(p.grad is None for p in model.layers[layer + 1:].parameters())


def test_training_with_box_attention_logs_it(synth_data, coord_tok):
    init = {"preset": "tiny", "tokenizer": "coord_tok.model", "seed": 0}
    data = [{"path": "data/conversations.json", "root": "data", "independent_turns": True}]
    out = train(TrainConfig.load(write_config(synth_data, "box_att", init=init, data=data, steps=3,
                                              box_attention={"layer": 1, "weight": 2.0})), progress=False)
    log = [json.loads(x) for x in (out.parent.parent / "box_att_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(r["box_attention_loss"] > 0 for r in log if "box_attention_loss" in r)
    assert any("box_attention_loss" in r for r in log)
    from sphinx_tools.train import check_box_attention

    with pytest.raises(SphinxToolsError, match="box_attention takes layer and weight"):
        check_box_attention({"head": 1})
    with pytest.raises(SphinxToolsError, match="box_attention.weight must be positive, got -1"):
        check_box_attention({"weight": -1})
    assert check_box_attention({}) == {"layer": 2, "weight": 1.0}
