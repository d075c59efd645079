"The dense encoder warm-up (sphinx_tools.train.warmup): its targets, COCO reading and training."

import json

import numpy as np
import pytest
import torch

from sphinx_tools import SphinxModel
from sphinx_tools.errors import SphinxToolsError
from sphinx_tools.train import TrainConfig, check_encoder_warmup, init_model, train

from .conftest import coco_file, write_config


def test_dense_targets_follow_the_views(tmp_path):
    from sphinx_tools.train.warmup import DenseTargets

    images = [{"id": 1, "file_name": "a.png", "width": 448, "height": 448},
              {"id": 2, "file_name": "b.png", "width": 200, "height": 100}]
    coco = coco_file(tmp_path, images, [(1, 7, [0, 0, 224, 224]), (2, 9, [0, 0, 200, 100])])
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

    from sphinx_tools.train.warmup import DenseTargets

    images = [{"id": 1, "file_name": "a.png", "width": 448, "height": 448}]
    coco = coco_file(tmp_path, images, [(1, 7, [0, 0, 224, 224]), (1, 9, [112, 112, 80, 80])])
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
    from sphinx_tools.train.warmup import DenseTargets

    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in (1, 2, 3)]
    coco = coco_file(tmp_path, images, [(1, 7, [0, 0, 9, 9]), (2, 9, [0, 0, 9, 9]), (2, 7, [20, 20, 9, 9])])
    assert [im["id"] for im in DenseTargets(coco, tmp_path, 448, 5, 4, 4).images] == [1, 2, 3]
    d = DenseTargets(coco, tmp_path, 448, 5, 4, 4, categories=["other"])
    assert [im["id"] for im in d.images] == [2]
    assert d.coverage(0)[1].sum() > 0  # its boxes of other categories are still targets
    with pytest.raises(SphinxToolsError, match=r"categories \['dog'\] are not in .*it has \['other', 'thing'\]"):
        DenseTargets(coco, tmp_path, 448, 5, 4, 4, categories=["dog", "thing"])


def test_coco_readers_name_the_bad_file_and_entry(tmp_path):
    from sphinx_tools.train import TokenPlaces
    from sphinx_tools.train.warmup import DenseTargets, read_coco

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


def test_encoder_warmup_trains_the_encoders_on_boxes(synth_data):
    from sphinx_tools.train.warmup import warmup_encoders

    cfg = TrainConfig.load(write_config(synth_data, "warm0"))
    model, _ = init_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = check_encoder_warmup({"coco": "data/coco.json", "images": "data/images", "steps": 40,
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
    from sphinx_tools.train.warmup import warmup_encoders

    spec = check_encoder_warmup({"coco": "data/coco.json", "images": "data/images", "steps": 3, "batch_size": 3},
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


def test_dense_attribute_targets_give_each_patch_its_object_s_colour(tmp_path):
    import json as _json

    from PIL import Image

    from sphinx_tools.train.warmup import DenseTargets, dense_loss

    images = [{"id": 1, "file_name": "a.png", "width": 448, "height": 448}]
    coco = coco_file(tmp_path, images, [(1, 7, [0, 0, 224, 224]), (1, 9, [224, 224, 224, 224]),
                                        (1, 7, [224, 0, 224, 224])])
    data = _json.loads(coco.read_text())
    data["annotations"][0]["color"] = "red"
    data["annotations"][1]["color"] = "blue"  # the third has none: background in the colour term
    coco.write_text(_json.dumps(data))
    d = DenseTargets(coco, tmp_path, 448, n_views=1, grid=2, sub=2, attributes=["color"])
    assert d.attributes == {"color": {"blue": 3, "red": 4}} and d.groups == [3, 3]
    assert d.width == 4 + 3 + 3
    Image.new("RGB", (448, 448)).save(tmp_path / "a.png")
    _, t = d.example(0)
    plain = DenseTargets(coco, tmp_path, 448, n_views=1, grid=2, sub=2).example(0)[1]
    torch.testing.assert_close(t[..., :7], plain)  # coverage and categories as before
    colour = t[0, :, 7:]  # patches row-major: background, blue, red
    torch.testing.assert_close(colour, torch.tensor([[0, 0, 1.0], [1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]]))
    # each class term is its own cross entropy: with uniform guesses the colour term adds log(3)
    pred = torch.zeros(1, 4, 10)
    torch.testing.assert_close(dense_loss(pred, t, 4, d.groups) - dense_loss(pred[..., :7], t[..., :7], 4),
                               torch.log(torch.tensor(3.0)))
    with pytest.raises(SphinxToolsError, match="no annotation of .* has `shade`"):
        DenseTargets(coco, tmp_path, 448, 1, 2, 2, attributes=["shade"])
    with pytest.raises(SphinxToolsError, match="encoder_warmup.attributes must be a list"):
        check_encoder_warmup({"coco": "c.json", "attributes": "color"}, tmp_path)


def test_dense_read_objects_pool_each_box_over_the_patches_it_covers(tmp_path):
    from PIL import Image

    from sphinx_tools.train.warmup import DenseTargets

    images = [{"id": 1, "file_name": "a.png", "width": 448, "height": 448},
              {"id": 2, "file_name": "b.png", "width": 448, "height": 448}]
    coco = coco_file(tmp_path, images, [(1, 7, [0, 0, 224, 112]), (1, 7, [112, 336, 224, 56]),
                                        (1, 9, [0, 0, 9, 9]), (2, 9, [0, 0, 9, 9])])
    data = json.loads(coco.read_text())
    data["annotations"][0]["text"] = "STOP"
    data["annotations"][1]["text"] = "cat"
    coco.write_text(json.dumps(data))
    d = DenseTargets(coco, tmp_path, 448, n_views=1, grid=4, sub=2, read="text")
    assert d.values == ["STOP", "cat"]
    for name in ("a.png", "b.png"):
        Image.new("RGB", (448, 448)).save(tmp_path / name)
    image, targets, (weights, values) = d[0]
    torch.testing.assert_close(targets, d.example(0)[1])  # the dense targets as without `read`
    assert values.tolist() == [0, 1] and weights.shape == (2, 16)
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    want = torch.zeros(2, 4, 4)
    want[0, 0, :2] = 0.5  # STOP: the first row's two left patches, half of it in each
    want[1, 3, 1:3] = 0.5  # cat: patches (3, 1) and (3, 2), half of its width in each
    torch.testing.assert_close(weights.view(2, 4, 4), want)
    w, v = d.objects(1)  # an image without the key: no object
    assert w.shape == (0, 16) and v.shape == (0,)
    assert len(DenseTargets(coco, tmp_path, 448, 1, 4, 2)[0]) == 2  # no `read`: (image, targets)
    with pytest.raises(SphinxToolsError, match="no annotation of .* has `word`"):
        DenseTargets(coco, tmp_path, 448, 1, 4, 2, read="word")
    with pytest.raises(SphinxToolsError, match="encoder_warmup.read must be an annotation key"):
        check_encoder_warmup({"coco": "c.json", "read": ["text"]}, tmp_path)


def test_read_loss_is_the_cross_entropy_of_the_pooled_tokens():
    from sphinx_tools.train.warmup import read_loss

    torch.manual_seed(0)
    tokens = torch.randn(2, 4, 8)
    head = torch.nn.Linear(8, 3)
    objects = [(torch.tensor([[0.5, 0.5, 0, 0]]), torch.tensor([2])),
               (torch.tensor([[0, 0, 0.25, 0.75], [1.0, 0, 0, 0]]), torch.tensor([0, 1]))]
    pooled = torch.stack([(tokens[0, 0] + tokens[0, 1]) / 2, 0.25 * tokens[1, 2] + 0.75 * tokens[1, 3],
                          tokens[1, 0]])
    want = torch.nn.functional.cross_entropy(head(pooled), torch.tensor([2, 0, 1]))
    torch.testing.assert_close(read_loss(tokens, objects, head), want)
    empty = [(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))] * 2
    assert read_loss(tokens, empty, head).item() == 0


def test_encoder_warmup_with_read_learns_the_words(synth_data):
    from sphinx_tools.train.warmup import DenseTargets, warmup_encoders

    cfg = TrainConfig.load(write_config(synth_data, "warm_read"))
    spec = {"coco": "data/coco.json", "images": "data/images", "steps": 30, "batch_size": 2,
            "lr": 3e-3, "warmup": 2, "categories": ["word"]}
    torch.set_num_threads(2)
    runs = []
    for read in (None, "text"):
        model, _ = init_model(cfg)
        runs.append(warmup_encoders(model, check_encoder_warmup({**spec, "read": read}, synth_data),
                                    "cpu", progress=False))
    plain, read = runs
    data = DenseTargets(synth_data / "data/coco.json", synth_data / "data/images", model.cfg.image_size,
                        model.cfg.n_views, model.cfg.vision.grid, 4, ["word"], read="text")
    assert len(data) >= 1 and len(data.values) >= 2
    # the same batches: the first step's loss adds the read term (about log(values) at the start)
    assert read[0] - plain[0] > 0.5 * np.log(len(data.values))
    assert sum(read[-5:]) < 0.6 * sum(read[:5])  # the sum of both terms is learned
    model, _ = init_model(cfg)  # read_weight scales the read term: the same first batch, half of it
    half = warmup_encoders(model, check_encoder_warmup({**spec, "steps": 1, "read": "text", "read_weight": 0.5},
                                                       synth_data), "cpu", progress=False)
    assert half[0] - plain[0] == pytest.approx(0.5 * (read[0] - plain[0]), rel=1e-4)
    model, _ = init_model(cfg)  # reading by DINOv2 alone: the same tokens and terms, its own gradient
    routed = warmup_encoders(model, check_encoder_warmup({**spec, "read": "text", "read_branch": "dinov2"},
                                                         synth_data), "cpu", progress=False)
    assert routed[0] == pytest.approx(read[0], rel=1e-5)
    assert sum(routed[-5:]) < 0.6 * sum(routed[:5])
    for bad in (0, -1.0, True, "0.5"):
        with pytest.raises(SphinxToolsError, match="encoder_warmup.read_weight must be a positive number"):
            check_encoder_warmup({"coco": "c.json", "read": "text", "read_weight": bad}, synth_data)


def test_routed_tokens_split_the_gradient_between_the_read_encoder_and_the_rest(synth_data):
    from sphinx_tools.train.warmup import patch_tokens, routed_tokens

    model, _ = init_model(TrainConfig.load(write_config(synth_data, "warm_routed")))
    torch.manual_seed(0)
    images = torch.rand(2, 3, model.cfg.image_size, model.cfg.image_size)
    dense, reading = routed_tokens(model, images, "dinov2")
    whole = patch_tokens(model, images)
    torch.testing.assert_close(dense, whole)  # the same tokens the language model reads
    torch.testing.assert_close(reading, whole)
    with torch.no_grad():
        dino = model.encode_views(model.views(images))["dinov2"].shape[-1]
    others = model.visual_proj[0].in_features - dino  # CLIP's and ConvNeXt's columns, then DINOv2's

    def grads(tokens):
        model.zero_grad(set_to_none=True)
        (tokens * torch.randn_like(tokens)).sum().backward(retain_graph=True)
        return {n: p.grad for n, p in model.named_parameters()}

    g = grads(reading)
    assert g["dinov2_vitg14.patch_embed.proj.weight"].abs().sum() > 0
    assert g["clip.visual.conv1.weight"] is None and g["openclip_convnext_xxl.stem.0.weight"] is None
    assert g["visual_proj.0.weight"][:, :others].abs().sum() == 0  # only DINOv2's columns
    assert g["visual_proj.0.weight"][:, others:].abs().sum() > 0
    assert g["visual_proj.0.bias"] is None and g["visual_proj.1.weight"] is None
    g = grads(dense)
    assert g["dinov2_vitg14.patch_embed.proj.weight"] is None
    assert g["clip.visual.conv1.weight"].abs().sum() > 0
    assert g["openclip_convnext_xxl.stem.0.weight"].abs().sum() > 0
    assert g["visual_proj.0.weight"][:, others:].abs().sum() == 0
    assert g["visual_proj.1.weight"].abs().sum() > 0
    with pytest.raises(SphinxToolsError, match="read_branch 'vit' is not an encoder"):
        routed_tokens(model, images, "vit")
    for bad, match in (({"read": "text", "read_branch": "vit"}, "read_branch must be one of clip, convnext, dinov2"),
                       ({"read_branch": "dinov2"}, "read_branch needs encoder_warmup.read")):
        with pytest.raises(SphinxToolsError, match=match):
            check_encoder_warmup({"coco": "c.json", **bad}, synth_data)
