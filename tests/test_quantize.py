"int8 weight-only quantization of the LLM's linear layers (torchao) on the tiny golden model."

import pytest
import torch

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def int8_model(golden_dir):
    from sphinx_tools import SphinxModel

    return SphinxModel.from_pretrained(golden_dir, quantize="int8")


def test_int8_weights_are_a_quarter_of_fp32(golden_model, int8_model):
    from sphinx_tools.model import ColumnParallelLinear, RowParallelLinear
    from sphinx_tools.quantize import weight_bytes

    linears = [m for m in int8_model.transformer.modules()
               if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    assert linears and all(type(m.weight.data).__name__ != "Tensor" for m in linears)
    fp32_linear = sum(m.weight.numel() * 4 for m in linears)
    saved = weight_bytes(golden_model.transformer) - weight_bytes(int8_model.transformer)
    assert 0.7 * fp32_linear < saved < 0.76 * fp32_linear  # int8 data plus one scale a row
    # the encoders are untouched
    assert int8_model.transformer.visual_proj[0].weight.dtype == torch.float32


def test_int8_logits_stay_close_and_greedy_agrees(golden_model, int8_model, golden_io):
    ids = torch.as_tensor(golden_io["prompt_token_ids"]).reshape(1, -1)
    image = golden_model._image_tensor(golden_io["image"])[None]
    ref, q = golden_model.logits(ids, image)[0], int8_model.logits(ids, image)[0]
    drift = (q - ref).abs().max().item()
    assert 0 < drift < 0.05 * ref.abs().max().item()
    assert (q.argmax(-1) == ref.argmax(-1)).float().mean() == 1.0
    kw = dict(max_gen_len=8, stop=())
    a = golden_model.generate([golden_io["prompt"]], [golden_io["image"]], **kw)[0]
    b = int8_model.generate([golden_io["prompt"]], [golden_io["image"]], **kw)[0]
    assert a.token_ids == b.token_ids


def test_unknown_quantization_is_refused_before_loading(golden_dir):
    from sphinx_tools import SphinxModel

    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        SphinxModel.from_pretrained(golden_dir / "missing", quantize="int4")


@pytest.mark.gpu
def test_int8_on_cuda(golden_dir, golden_io):
    from sphinx_tools import SphinxModel

    ref = SphinxModel.from_pretrained(golden_dir, device="cuda", dtype=torch.bfloat16)
    q = SphinxModel.from_pretrained(golden_dir, device="cuda", dtype=torch.bfloat16,
                                    quantize="int8")
    ids = torch.as_tensor(golden_io["prompt_token_ids"]).reshape(1, -1)
    image = ref._image_tensor(golden_io["image"])[None]
    a, b = ref.logits(ids, image)[0], q.logits(ids, image)[0]
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    g = q.generate([golden_io["prompt"]], [golden_io["image"]], max_gen_len=8, stop=())[0]
    assert len(g.token_ids) == 8
