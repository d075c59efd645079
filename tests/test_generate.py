"Batched generation, stop strings, sampling, streaming and chat on a tiny checkpoint."

import math

import pytest
import torch
from PIL import Image

from sphinx_tools import build_prompt
from sphinx_tools.conversation import cut_at_separator
from sphinx_tools.sphinx_model import _hold_back

QUESTIONS = ["What is in the image?", "Describe the picture in detail please.", "Where is the dog?"]


def images():
    a = Image.new("RGB", (320, 200), (200, 30, 30))
    b = Image.new("RGB", (120, 260), (20, 180, 60))
    return [a, None, b]


def test_batched_equals_row_by_row(golden_model):
    prompts = [build_prompt([[q, None]]) for q in QUESTIONS]
    ims = images()
    batch = golden_model.generate(prompts, ims, max_gen_len=12, stop=())
    for p, im, b in zip(prompts, ims, batch):
        single = golden_model.generate([p], [im], max_gen_len=12, stop=())[0]
        assert b.token_ids == single.token_ids
        assert b.text == single.text
        assert all(math.isclose(x, y, abs_tol=1e-4) for x, y in zip(b.logprobs, single.logprobs))


def test_generation_fields_are_consistent(golden_model, golden_io):
    g = golden_model.generate([golden_io["prompt"]], [golden_io["image"]], max_gen_len=10, stop=())[0]
    assert len(g.token_ids) == len(g.logprobs) == len(g.offsets) == 10
    assert all(lp <= 0 and math.isfinite(lp) for lp in g.logprobs)
    assert g.offsets == sorted(g.offsets) and g.offsets[0] == 0
    assert g.text == golden_model.tokenizer.decode(g.token_ids)
    assert g.finish_reason == "length"
    # greedy logprob of the first token is the max of the full forward's last row
    lp0 = torch.log_softmax(golden_io["logits"][0, -1], -1).max().item()
    assert math.isclose(g.logprobs[0], lp0, abs_tol=1e-4)


def test_stop_string_cuts_cleanly(golden_model, golden_io):
    free = golden_model.generate([golden_io["prompt"]], [golden_io["image"]], max_gen_len=16, stop=())[0]
    stop = free.text[5:9]  # a string the model is known to produce
    assert stop and stop in free.text
    g = golden_model.generate([golden_io["prompt"]], [golden_io["image"]], max_gen_len=16, stop=(stop,))[0]
    assert g.finish_reason == "stop"
    assert stop not in g.text
    assert g.text == free.text[: free.text.find(stop)]
    assert len(g.token_ids) < 16
    assert golden_model.tokenizer.decode(g.token_ids).startswith(g.text[:3])


def test_stream_matches_generate_and_never_leaks_stop(golden_model, golden_io):
    free = golden_model.generate([golden_io["prompt"]], [golden_io["image"]], max_gen_len=16, stop=())[0]
    stop = free.text[6:10]
    chunks = list(golden_model.stream(golden_io["prompt"], golden_io["image"], max_gen_len=16, stop=(stop,)))
    final = golden_model.generate([golden_io["prompt"]], [golden_io["image"]], max_gen_len=16, stop=(stop,))[0]
    assert chunks[-1] == final.text
    assert all(stop not in c for c in chunks)
    assert all(b.startswith(a) for a, b in zip(chunks, chunks[1:])) or len(chunks) == 1


def test_hold_back_prefix_of_stop():
    assert _hold_back("hello\n##", ("\n###",)) == "hello"
    assert _hold_back("hello\n###x", ("\n###",)) == "hello"
    assert _hold_back("hello", ("\n###",)) == "hello"


def test_seeded_sampling_is_reproducible(golden_model, golden_io):
    kw = dict(max_gen_len=12, temperature=1.0, top_p=0.9, stop=())
    a = golden_model.generate([golden_io["prompt"]] * 2, [golden_io["image"], None], seed=1, **kw)
    b = golden_model.generate([golden_io["prompt"]] * 2, [golden_io["image"], None], seed=1, **kw)
    c = golden_model.generate([golden_io["prompt"]] * 2, [golden_io["image"], None], seed=2, **kw)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_top_p_near_zero_is_greedy(golden_model, golden_io):
    greedy = golden_model.generate([golden_io["prompt"]], [golden_io["image"]], max_gen_len=8, stop=())[0]
    nucleus = golden_model.generate([golden_io["prompt"]], [golden_io["image"]], max_gen_len=8,
                                    temperature=0.7, top_p=1e-6, stop=())[0]
    assert greedy.token_ids == nucleus.token_ids


def test_chat_uses_the_conversation_template(golden_model, golden_io):
    q = "What is in the image?"
    assert build_prompt([[q, None]]) == golden_io["prompt"]
    answer = golden_model.chat([[q, None]], golden_io["image"], max_gen_len=16)
    want = golden_model.generate([golden_io["prompt"]], [golden_io["image"]], max_gen_len=16)[0]
    assert answer == want.text.strip()


def test_multi_turn_prompt():
    p = build_prompt([["Hi", "Hello there."], ["And now?", None]])
    assert p.endswith("### Human: Hi\n### Assistant: Hello there.\n### Human: And now?\n### Assistant:")
    assert cut_at_separator(" a box [0.1,0.2,0.3,0.4]\n### Human: x") == "a box [0.1,0.2,0.3,0.4]"
    with pytest.raises(ValueError, match="only the last turn"):
        build_prompt([["a", None], ["b", None]])


def test_bad_arguments(golden_model):
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        golden_model.generate(["a", "b"], [None])
    with pytest.raises(ValueError, match="list of strings"):
        golden_model.generate("a")
    with pytest.raises(ValueError, match=r"shape \(3, 448, 448\)"):
        golden_model.generate(["a"], [torch.zeros(3, 224, 224)])
    with pytest.raises(ValueError, match="max_gen_len"):
        golden_model.generate(["a"], max_gen_len=0)


def test_cache_is_static_across_steps(golden_model, golden_io):
    golden_model.generate([golden_io["prompt"]], [golden_io["image"]], max_gen_len=4, stop=())
    k = golden_model.transformer.layers[0].attention.kv_cache.k
    ptr = k.data_ptr()
    golden_model.generate([golden_io["prompt"]], [golden_io["image"]], max_gen_len=4, stop=())
    assert golden_model.transformer.layers[0].attention.kv_cache.k.data_ptr() == ptr


def test_generate_multi_equals_independent_calls(golden_model):
    ims = images()
    qs = [
        [build_prompt([[q, None]]) for q in QUESTIONS],
        [build_prompt([["Where is the dog?", None]])],
        [build_prompt([[q, None]]) for q in QUESTIONS[::-1]] + [build_prompt([["Hi", "Hello."], ["Why?", None]])],
    ]
    multi = golden_model.generate_multi(ims, qs, max_gen_len=10, stop=())
    assert [len(m) for m in multi] == [3, 1, 4]
    for im, prompts, gens in zip(ims, qs, multi):
        for p, g in zip(prompts, gens):
            single = golden_model.generate([p], [im], max_gen_len=10, stop=())[0]
            assert g.token_ids == single.token_ids
            assert all(math.isclose(x, y, abs_tol=1e-4) for x, y in zip(g.logprobs, single.logprobs))


def test_per_prompt_budgets(golden_model):
    # each row stops at its own budget, as an independent call with that budget would
    ims = images()
    qs = [[build_prompt([[q, None]]) for q in QUESTIONS], [build_prompt([["Where is the dog?", None]])]]
    budgets = [[3, 9, 1], [6]]
    multi = golden_model.generate_multi(ims[:2], qs, max_gen_len=budgets, stop=())
    for im, prompts, bs, gens in zip(ims, qs, budgets, multi):
        for p, b, g in zip(prompts, bs, gens):
            assert len(g.token_ids) == b and g.finish_reason == "length"
            assert g.token_ids == golden_model.generate([p], [im], max_gen_len=b, stop=())[0].token_ids
    rows = golden_model.generate(qs[0], [ims[0]] * 3, max_gen_len=[2, 5, 4], stop=())
    assert [len(g.token_ids) for g in rows] == [2, 5, 4]
    with pytest.raises(ValueError, match="shape of `questions`"):
        golden_model.generate_multi(ims[:2], qs, max_gen_len=[[3, 9], [6]])
    with pytest.raises(ValueError, match="2 `max_gen_len` budgets for 3 prompts"):
        golden_model.generate(qs[0], [ims[0]] * 3, max_gen_len=[2, 5])
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        golden_model.generate(qs[0], [ims[0]] * 3, max_gen_len=[2, 0, 1])


def test_generate_multi_with_identical_prompts_and_stop(golden_model, golden_io):
    p = golden_io["prompt"]
    free = golden_model.generate([p], [golden_io["image"]], max_gen_len=16, stop=())[0]
    stop = free.text[5:9]
    gens = golden_model.generate_multi([golden_io["image"]], [[p, p]], max_gen_len=16, stop=(stop,))[0]
    want = golden_model.generate([p], [golden_io["image"]], max_gen_len=16, stop=(stop,))[0]
    assert [g.text for g in gens] == [want.text, want.text]
    assert golden_model.generate_multi([None], [[]]) == [[]]


def test_stream_leaves_the_final_generation(golden_model, golden_io):
    chunks = list(golden_model.stream(golden_io["prompt"], golden_io["image"], max_gen_len=6))
    final = golden_model.last_generations[0]
    assert final.text == chunks[-1] and len(final.logprobs) == len(final.token_ids) == 6
    assert final.finish_reason == "length"
