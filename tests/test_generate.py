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


def test_generate_multi_reports_each_image_when_its_answers_end(golden_model, monkeypatch):
    # on_image(j) comes once per image, right after the step that ends its last answer (an image
    # without prompts at once), while the other images go on decoding
    import sphinx_tools.generate as gen

    steps = []
    real = gen.sample
    monkeypatch.setattr(gen, "sample", lambda *a, **k: steps.append(1) or real(*a, **k))
    ims = images() + [images()[0]]
    qs = [[build_prompt([[q, None]]) for q in QUESTIONS], [build_prompt([["Where is it?", None]])],
          [build_prompt([["Why?", None]])], []]
    reports = []
    multi = golden_model.generate_multi(ims, qs, max_gen_len=[[3, 9, 1], [6], [2], []], stop=(),
                                        on_image=lambda j: reports.append((j, len(steps))))
    assert reports == [(3, 0), (2, 2), (1, 6), (0, 9)]
    assert multi == golden_model.generate_multi(ims, qs, max_gen_len=[[3, 9, 1], [6], [2], []],
                                                stop=())
    reports.clear()
    golden_model.generate_multi(ims[:2], [[], []], on_image=lambda j: reports.append((j, 0)))
    assert reports == [(0, 0), (1, 0)]


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


def test_greedy_decoding_equals_the_full_forward(golden_model, golden_io):
    # every generated token is the argmax of a cache-free forward over prompt + tokens so far
    g = golden_model.generate([golden_io["prompt"]], [golden_io["image"]], max_gen_len=12, stop=())[0]
    tok = golden_model.tokenizer
    ids = torch.tensor([tok.encode(golden_io["prompt"], bos=True) + g.token_ids])
    image = golden_model._image_tensor(golden_io["image"])[None]
    logits = golden_model.logits(ids, image)[0, -len(g.token_ids) - 1:-1]
    assert logits.argmax(-1).tolist() == g.token_ids
    lp = torch.log_softmax(logits, -1).max(-1).values
    assert torch.allclose(lp, torch.tensor(g.logprobs), atol=1e-4)


def test_decoding_attends_only_the_live_cache(golden_model, golden_io, monkeypatch):
    # after a call that left a large cache, a short call attends only the slots it wrote
    # (rounded up to LIVE_BUCKET), with the same answer as on a fresh cache
    from sphinx_tools import generate as gen

    golden_model.generate([golden_io["prompt"]], [golden_io["image"]], max_gen_len=300, stop=())
    size = golden_model.transformer.layers[0].attention.kv_cache.k.shape[2]
    widths = []
    real = gen._attend
    monkeypatch.setattr(gen, "_attend", lambda q, k, v, b: widths.append(k.shape[2]) or real(q, k, v, b))
    short = golden_model.generate([golden_io["prompt"]], [golden_io["image"]], max_gen_len=5, stop=())[0]
    n_prompt = len(golden_model.tokenizer.encode(golden_io["prompt"], bos=True)) - 1 + \
        golden_model.cfg.image_tokens + 1
    assert max(widths) == gen.live_len(n_prompt + 4, size) < size
    assert all(w % gen.LIVE_BUCKET == 0 or w == size for w in widths)
    gen._CACHES.pop(golden_model.transformer)
    assert golden_model.generate([golden_io["prompt"]], [golden_io["image"]], max_gen_len=5,
                                 stop=())[0].token_ids == short.token_ids


def test_generate_multi_keeps_one_prefix_per_image(golden_model):
    # the rows of an image read its prefix from one cache: no row holds a copy of it
    from sphinx_tools.generate import CascadeCache

    ims = images()
    qs = [[build_prompt([[q, None]]) for q in QUESTIONS] for _ in ims]
    golden_model.generate_multi(ims, qs, max_gen_len=3, stop=())
    c = golden_model.transformer.layers[0].attention.kv_cache
    assert isinstance(c, CascadeCache)
    prefix_len = c.pk.shape[2]
    assert c.pk.shape[0] == len(ims) and prefix_len > golden_model.cfg.image_tokens
    assert c.suffix.k.shape[0] == 9 and c.suffix.k.shape[2] < prefix_len / 10


def test_generate_multi_with_grouped_query_attention(golden_dir):
    # rows of a prefix read its K/V heads as they are (two query heads per K/V head here)
    from sphinx_tools import SphinxConfig, SphinxModel

    cfg = SphinxConfig.from_name("tiny", n_kv_heads=2)
    m = SphinxModel.from_config(cfg, tokenizer_path=golden_dir / "tokenizer.model", device="cpu",
                                seed=3)
    ims = images()[:2]
    qs = [[build_prompt([[q, None]]) for q in QUESTIONS], [build_prompt([["Hi", None]])]]
    multi = m.generate_multi(ims, qs, max_gen_len=8, stop=())
    for im, prompts, gens in zip(ims, qs, multi):
        for p, g in zip(prompts, gens):
            single = m.generate([p], [im], max_gen_len=8, stop=())[0]
            assert g.token_ids == single.token_ids
            assert all(math.isclose(x, y, abs_tol=1e-4) for x, y in zip(g.logprobs, single.logprobs))


@pytest.mark.parametrize("max_rows", [1, 2, None])
def test_continuous_batching_equals_independent_calls(golden_model, max_rows, monkeypatch):
    # a finished row's slot goes to the next prompt (or leaves the batch): answers do not change
    from sphinx_tools import generate as gen

    widths = []
    real = gen.SharedRows.step
    monkeypatch.setattr(gen.SharedRows, "step",
                        lambda self, tok, slots=None: widths.append(len(tok)) or real(self, tok, slots))
    ims = images()
    qs = [[build_prompt([[q, None]]) for q in QUESTIONS], [build_prompt([["Where is the dog?", None]])],
          [build_prompt([[q, None]]) for q in QUESTIONS[:2]]]
    budgets = [[2, 9, 4], [6], [1, 7]]
    multi = golden_model.generate_multi(ims, qs, max_gen_len=budgets, stop=(), max_rows=max_rows)
    for im, prompts, bs, gens in zip(ims, qs, budgets, multi):
        for p, b, g in zip(prompts, bs, gens):
            single = golden_model.generate([p], [im], max_gen_len=b, stop=())[0]
            assert g.token_ids == single.token_ids and len(g.token_ids) == b
            assert all(math.isclose(x, y, abs_tol=1e-4) for x, y in zip(g.logprobs, single.logprobs))
    assert max(widths) == min(max_rows or 6, 5)  # one prompt is done after its first token
    assert widths[-1] == 1  # the longest answer ends alone: finished rows left the batch
    # every token of every prompt was computed once: no step for a finished row
    assert sum(widths) == sum(sum(b) for b in budgets) - sum(len(b) for b in budgets)


@pytest.mark.gpu
def test_cascade_attention_on_cuda(golden_dir):
    # the log-sum-exp merge off CPU (float32 scores) gives the answers of independent calls
    from sphinx_tools import SphinxModel

    m = SphinxModel.from_pretrained(golden_dir, device="cuda")
    ims = images()
    qs = [[build_prompt([[q, None]]) for q in QUESTIONS] for _ in ims]
    multi = m.generate_multi(ims, qs, max_gen_len=8, stop=(), max_rows=4)
    for im, prompts, gens in zip(ims, qs, multi):
        for p, g in zip(prompts, gens):
            assert g.token_ids == m.generate([p], [im], max_gen_len=8, stop=())[0].token_ids
