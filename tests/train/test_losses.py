"The finetuning loss: token weights and the token_position auxiliary loss (TokenPlaces)."

import json

import pytest
import torch

from sphinx_tools import SphinxModel
from sphinx_tools.errors import SphinxToolsError
from sphinx_tools.tiny import train_tokenizer
from sphinx_tools.tokenizer import Tokenizer
from sphinx_tools.train import (
    IGNORE,
    ConversationData,
    TokenPlaces,
    TrainConfig,
    collate,
    conversation_text,
    coordinate_weights,
    init_model,
    loss_fn,
    patch_token_index,
)

from .conftest import coco_file, write_config


def test_coordinate_weight_scales_the_coordinate_tokens(synth_data, tmp_path):
    tok = Tokenizer(train_tokenizer(tmp_path / "coord.model", 512, corpus=[
        conversation_text(c["conversations"])[0]
        for c in json.loads((synth_data / "data" / "conversations.json").read_text())],
        coordinate_tokens=True))
    assert coordinate_weights(tok, 1.0) is None
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


def test_token_places_give_every_view_s_patches_their_object_s_box_in_the_whole_image(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 448, "height": 224}]  # padded: 112 px above
    coco = coco_file(tmp_path, images, [(1, 7, [0, 0, 224, 224]), (1, 9, [224, 112, 80, 40])])
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
    from sphinx_tools.train.warmup import patch_tokens

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


def _coordinate_tokenizer(synth_data, tmp_path):
    return Tokenizer(train_tokenizer(tmp_path / "coord.model", 512, corpus=[
        conversation_text(c["conversations"])[0]
        for c in json.loads((synth_data / "data" / "conversations.json").read_text())],
        coordinate_tokens=True))


def test_pointer_targets_find_the_object_whose_box_the_answer_writes(synth_data, tmp_path):
    from sphinx_tools.train.losses import coordinate_values, pointer_targets

    tok = _coordinate_tokenizer(synth_data, tmp_path)
    values = coordinate_values(tok)
    assert values[tok.sp.piece_to_id("0.41")] == 0.41 and values[tok.sp.piece_to_id("1.00")] == 1.0
    assert int((~values.isnan()).sum()) == 101
    c = lambda x: tok.sp.piece_to_id(f"{x:.2f}")  # noqa: E731
    word = tok.sp.piece_to_id("\u2581the")
    # row 0: turn 1 writes box A, turn 2 box B; turn 3 a box no patch has; row 1 unpacked
    A, B = (0.10, 0.20, 0.30, 0.40), (0.50, 0.50, 0.90, 0.80)
    labels = torch.full((2, 24), IGNORE)
    segments = torch.full((2, 24), -1)
    segments[0, :3], segments[0, 3:9], segments[0, 9:15], segments[0, 15:21] = 0, 1, 2, 3
    labels[0, 4:9] = torch.tensor([word] + [c(x) for x in A])
    labels[0, 10:15] = torch.tensor([word] + [c(x) for x in B])
    labels[0, 16:21] = torch.tensor([word, c(0.7), c(0.7), c(0.71), c(0.72)])
    segments[1] = 0
    labels[1, 5:14] = torch.tensor([c(x) for x in B] + [word] + [c(x) for x in A])
    places = torch.full((2, 6, 4), float("nan"))
    places[:, 1] = places[:, 4] = torch.tensor(A) + 0.004  # the exact box, before rounding
    places[:, 2] = torch.tensor(B)
    rows, query, hit = pointer_targets(labels, segments, places, values, n_image=10)
    assert rows.tolist() == [0, 0, 1]
    assert query.tolist() == [4 + 10, 10 + 10, 4 + 10]  # the position before each first coordinate
    assert hit.tolist() == [[False, True, False, False, True, False],
                            [False, False, True, False, False, False],
                            [False, False, True, False, False, False]]  # unpacked: the first box only
    # every box, from the positions before its first and its third coordinate
    rows, query, hit = pointer_targets(labels, segments, places, values, n_image=10, boxes="every")
    assert rows.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert query.tolist() == [14, 16, 20, 22, 14, 16, 19, 21]
    a, b = [False, True, False, False, True, False], [False, False, True, False, False, False]
    assert hit.tolist() == [a, a, b, b, b, b, a, a]
    # and from the text that names each box: the answer since the previous box (or its start)
    rows, query, hit = pointer_targets(labels, segments, places, values, n_image=10, boxes="named")
    assert rows.tolist() == [0] * 6 + [1] * 5
    assert query.tolist() == [13, 14, 16, 19, 20, 22, 14, 16, 18, 19, 21]
    assert hit.tolist() == [a, a, a, b, b, b, b, b, a, a, a]
    with pytest.raises(SphinxToolsError, match="boxes must be one of .*, got 'all'"):
        pointer_targets(labels, segments, places, values, n_image=10, boxes="all")


def test_pointer_loss_trains_up_to_its_layer_and_falls_when_the_head_points_right(synth_data, tmp_path):
    from sphinx_tools.train.losses import (PointerHead, coordinate_values, pointer_loss,
                                           pointer_targets)

    tok = _coordinate_tokenizer(synth_data, tmp_path)
    cfg = TrainConfig.load(write_config(synth_data, "ptr_grad"))
    model, _ = init_model(cfg)
    model.eval()
    g = model.cfg.vision.grid
    data = ConversationData([{"path": str(synth_data / "data" / "conversations.json"),
                              "root": str(synth_data / "data"), "independent_turns": True}], tok, 448,
                            512, 0, TokenPlaces(synth_data / "data" / "coco.json",
                                                synth_data / "data" / "images", 448, 5, g))
    ids, labels, images, segments, places = collate([data.example(0, i) for i in range(8)])
    values = coordinate_values(tok)
    n_image = model.cfg.image_tokens
    targets = pointer_targets(labels, segments, places, values, n_image)
    assert len(targets[0]) > 0  # some answers write the box of an object under a patch
    head = PointerHead(model.cfg.dim, 16)
    total, language, aux = loss_fn(model, ids, labels, images, segments,
                                   pointer=(head, 0, places, values, 2.0))
    assert set(aux) == {"pointer"}
    torch.testing.assert_close(total, language + 2 * aux["pointer"])
    aux["pointer"].backward()
    assert model.layers[0].attention.wq.weight.grad.abs().sum() > 0 and head.q.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.layers[1].parameters())

    # a head that points at the object's patches beats one that cannot tell the patches apart:
    # stand-in hidden states where feature 0 marks the query and feature 1 the object's patches
    one = tuple(t[:1] for t in targets)
    hidden = torch.zeros(len(places), n_image + ids.shape[1], 4)
    hidden[one[0], one[1], 0] = 1.0
    hidden[one[0][0], patch_token_index(model.cfg)[one[2][0]], 1] = 1.0
    pointing, blind = PointerHead(4, 1), PointerHead(4, 1)
    with torch.no_grad():
        pointing.q.weight.copy_(torch.tensor([[10.0, 0, 0, 0]]))
        pointing.k.weight.copy_(torch.tensor([[0, 10.0, 0, 0]]))
        blind.q.weight.zero_()
    low, chance = pointer_loss(model.cfg, pointing, hidden, one), pointer_loss(model.cfg, blind, hidden, one)
    torch.testing.assert_close(chance, torch.log(torch.tensor(one[2].shape[1] / one[2].sum().item())))
    assert low < 0.01


def test_attention_pointer_loss_is_the_log_attention_a_head_gives_the_answer_s_object(synth_data, tmp_path,
                                                                                      monkeypatch):
    from types import SimpleNamespace

    import sphinx_tools.model as sphinx_model
    from sphinx_tools.train.losses import attention_pointer_loss, coordinate_values, pointer_targets

    tok = _coordinate_tokenizer(synth_data, tmp_path)
    model, _ = init_model(TrainConfig.load(write_config(synth_data, "attn_ptr")))
    model.eval()
    g, layer, head = model.cfg.vision.grid, 1, 2
    data = ConversationData([{"path": str(synth_data / "data" / "conversations.json"),
                              "root": str(synth_data / "data"), "independent_turns": True}], tok, 448,
                            512, 0, TokenPlaces(synth_data / "data" / "coco.json",
                                                synth_data / "data" / "images", 448, 5, g))
    ids, labels, images, segments, places = collate([data.example(0, i) for i in range(8)])
    targets = pointer_targets(labels, segments, places, coordinate_values(tok), model.cfg.image_tokens)
    assert len(targets[0]) > 0
    seen, weights = {}, []
    functional = torch.nn.functional

    def recording(q, k, v, attn_mask=None, is_causal=False):  # the softmax each LLM layer's heads take
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        weights.append(scores.masked_fill(~attn_mask, float("-inf")).softmax(-1))
        return functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    monkeypatch.setattr(sphinx_model, "F", SimpleNamespace(**{**vars(functional),
                                                               "scaled_dot_product_attention": recording}))
    attention = model.layers[layer].attention
    attention.register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args))
    patches = patch_token_index(model.cfg)
    loss_fn(model, ids, labels, images, segments)
    loss = attention_pointer_loss(attention, seen["in"], head, targets, patches)
    rows, query, hit = targets
    given = weights[layer][rows, head, query][:, patches]  # (N, P): what the head gives each patch
    want = -(given * hit).sum(-1).log().mean()
    torch.testing.assert_close(loss, want)

    # it trains the head's own query and key maps: a few steps on the same inputs move its
    # attention onto the objects
    inputs = tuple(t.detach() if torch.is_tensor(t) else t for t in seen["in"])
    opt = torch.optim.Adam([attention.wq.weight, attention.wk.weight], lr=1e-2)
    for _ in range(20):
        step = attention_pointer_loss(attention, inputs, head, targets, patches)
        opt.zero_grad()
        step.backward()
        opt.step()
    with torch.no_grad():
        after = attention_pointer_loss(attention, inputs, head, targets, patches)
    assert after < loss - 1.0, (float(loss), float(after))
    assert attention_pointer_loss(attention, inputs, head, tuple(t[:0] for t in targets), patches) == 0


def test_object_attention_on_every_box_trains_the_hop_from_both_corners(synth_data, tmp_path):
    from sphinx_tools.train.losses import (ObjectAttention, attention_pointer_loss,
                                           coordinate_values, pointer_targets)

    tok = _coordinate_tokenizer(synth_data, tmp_path)
    model, _ = init_model(TrainConfig.load(write_config(synth_data, "attn_every")))
    model.eval()
    root = synth_data / "data"
    data = ConversationData([{"path": str(root / "conversations.json"), "root": str(root),
                              "independent_turns": True}], tok, 448, 512, 0,
                            TokenPlaces(root / "coco.json", root / "images", 448, 5,
                                        model.cfg.vision.grid))
    ids, labels, images, segments, places = collate([data.example(0, i) for i in range(8)])
    values, n_image = coordinate_values(tok), model.cfg.image_tokens
    first = pointer_targets(labels, segments, places, values, n_image)
    every = pointer_targets(labels, segments, places, values, n_image, boxes="every")
    assert len(every[0]) > 2 * len(first[0])  # the detection lists' later boxes count too
    seen = {}
    hook = model.layers[1].attention.register_forward_pre_hook
    hook(lambda m, args: seen.__setitem__("in", args))
    aux = {}
    for flag in (False, True):
        spec = ObjectAttention(1, 0, 0, places, values, tok, 1.0, boxes="every" if flag else "first")
        aux[flag] = loss_fn(model, ids, labels, images, segments, attention=spec)[2]
    torch.testing.assert_close(aux[True]["question"], aux[False]["question"])  # once per answer
    want = attention_pointer_loss(model.layers[1].attention, seen["in"], 0, every,
                                  patch_token_index(model.cfg))
    torch.testing.assert_close(aux[True]["attention"], want)
    assert not torch.isclose(aux[True]["attention"], aux[False]["attention"])
    # named: the words before each box too
    named = pointer_targets(labels, segments, places, values, n_image, boxes="named")
    assert len(named[0]) > len(every[0])
    spec = ObjectAttention(1, 0, 0, places, values, tok, 1.0, boxes="named")
    aux["named"] = loss_fn(model, ids, labels, images, segments, attention=spec)[2]
    want = attention_pointer_loss(model.layers[1].attention, seen["in"], 0, named,
                                  patch_token_index(model.cfg))
    torch.testing.assert_close(aux["named"]["attention"], want)
    torch.testing.assert_close(aux["named"]["question"], aux[False]["question"])


def test_expression_targets_mark_the_words_of_the_referring_expression(synth_data, tmp_path):
    from sphinx_tools.train.data import tokenize_independent
    from sphinx_tools.train.losses import expression_targets

    tok = _coordinate_tokenizer(synth_data, tmp_path)
    turns = [{"from": "human", "value": "Please provide the bounding box coordinate of the region this "
                                        "sentence describes: the red star at the top."},
             {"from": "gpt", "value": "[0.10,0.20,0.30,0.40]"},
             {"from": "human", "value": "Detect all objects shown in the image."},
             {"from": "gpt", "value": "<p>star</p> [0.10,0.20,0.30,0.40]"}]
    ids, labels, segments = tokenize_independent(tok, turns)
    ids = torch.tensor([ids])
    pieces = [tok.sp.id_to_piece(int(i)) for i in ids[0]]
    brackets = [k for k, p in enumerate(pieces) if p == "\u2581["]  # each answer's first box follows
    n_image = 7
    targets = (torch.tensor([0, 0]), torch.tensor(brackets) + n_image, torch.zeros(2, 3, dtype=torch.bool))
    rows, query, hit = expression_targets(tok, ids, torch.tensor([segments]), targets, n_image)
    assert rows.tolist() == [0] and query.tolist() == [brackets[0] + n_image]  # no colon: no expression
    assert hit.shape == (1, n_image + ids.shape[1]) and not hit[0, :n_image].any()
    marked = tok.sp.decode([int(ids[0, k - n_image]) for k in hit[0].nonzero().flatten()])
    assert marked == "the red star at the top"
