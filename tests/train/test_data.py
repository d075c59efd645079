"Conversation data: the training text, tokens and loss labels, packed turns, datasets and batches."

import json
from pathlib import Path

import pytest
import torch

from sphinx_tools import build_prompt
from sphinx_tools.tokenizer import Tokenizer
from sphinx_tools.train import (
    IGNORE,
    ConversationData,
    TrainConfig,
    batches,
    collate,
    conversation_text,
    init_model,
    packed_mask,
    packed_positions,
    tokenize_conversation,
    tokenize_independent,
)

from .conftest import write_config


def test_training_text_is_the_inference_template():
    conv = [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "<image>\nQ2"}, {"from": "gpt", "value": "A2"}]
    text, spans = conversation_text(conv)
    assert text.startswith(build_prompt([["Q1", "A1"], ["Q2", None]]))
    assert [text[a:b] for a, b in spans] == [" A1\n###", " A2\n###"]
    with pytest.raises(ValueError, match="alternate"):
        conversation_text([conv[1], conv[0]])


def test_training_text_is_build_prompt_with_every_answer_then_the_end_signal():
    conv = [{"from": "human", "value": " <image>Q1 "}, {"from": "gpt", "value": " A1\n"},
            {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2 [0.10,0.20]"},
            {"from": "human", "value": "Q3"}, {"from": "gpt", "value": "ü"}]
    text, spans = conversation_text(conv)
    assert text == build_prompt([["Q1", "A1"], ["Q2", "A2 [0.10,0.20]"], ["Q3", "ü"]]) + "###"
    for k, (start, _) in enumerate(spans):  # each span starts where the k-th prompt ends
        qas = [["Q1", "A1"], ["Q2", "A2 [0.10,0.20]"], ["Q3", None]][: k + 1]
        qas[-1] = [qas[-1][0], None]
        assert start == len(build_prompt(qas))
    assert [text[a:b] for a, b in spans] == [" A1\n###", " A2 [0.10,0.20]\n###", " ü\n###"]


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
