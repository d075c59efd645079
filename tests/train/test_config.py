"The training config (sphinx_tools.train.config): every key checked, with errors naming the bad value."

import pytest

from sphinx_tools.errors import SphinxToolsError
from sphinx_tools.train import TrainConfig, check_encoder_warmup, check_token_position, train

from .conftest import write_config


def test_bad_config(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("init: {}\ndata: []\nout: x\nbogus: 1\n")
    with pytest.raises(Exception, match="bogus"):
        TrainConfig.load(p)


def test_encoder_warmup_config_errors(tmp_path):
    with pytest.raises(SphinxToolsError, match="needs `coco`"):
        check_encoder_warmup({"steps": 3}, tmp_path)
    with pytest.raises(SphinxToolsError, match=r"unknown encoder_warmup keys \['stpes'\]"):
        check_encoder_warmup({"coco": "c.json", "stpes": 3}, tmp_path)
    with pytest.raises(SphinxToolsError, match="encoder_warmup.steps must be a positive integer, got 0"):
        check_encoder_warmup({"coco": "c.json", "steps": 0}, tmp_path)
    with pytest.raises(SphinxToolsError, match="categories must be a non-empty list of names, got 'circle'"):
        check_encoder_warmup({"coco": "c.json", "categories": "circle"}, tmp_path)
    with pytest.raises(SphinxToolsError, match="position must be true or false, got 'yes'"):
        check_encoder_warmup({"coco": "c.json", "position": "yes"}, tmp_path)
    spec = check_encoder_warmup({"coco": "d/c.json"}, tmp_path)
    assert spec["position"] is False and spec["images"] == str((tmp_path / "d").resolve()) and spec["steps"] == 600


def test_token_position_config_errors(synth_data, tmp_path):
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
    with pytest.raises(SphinxToolsError, match="cannot read COCO boxes from .*missing.json"):
        train(TrainConfig.load(write_config(synth_data, "warm_missing", encoder_warmup=warm)), progress=False)
    cfg = TrainConfig.load(write_config(synth_data, "data_missing", data=[{"path": "none.json"}],
                                        encoder_warmup=warm))
    with pytest.raises(SphinxToolsError, match="none.json"):  # the data too
        train(cfg, progress=False)


def test_every_key_is_checked_when_the_config_is_made(tmp_path):
    base = dict(init={"preset": "tiny"}, data=[], out=str(tmp_path / "run"))
    for key, value, message in [
        ("train", ["llm", "heads"], r"unknown trainable parts \['heads'\]"),
        ("dtype", "fp16", "dtype must be one of fp32, bf16, got 'fp16'"),
        ("coordinate_weight", 0, "coordinate_weight must be positive, got 0"),
        ("coordinate_weight", True, "coordinate_weight must be positive, got True"),
        ("encoder_warmup", {"steps": 3}, "encoder_warmup needs `coco`"),
        ("token_position", {"coco": "c.json", "layer": -1},
         "token_position.layer must be an int >= 0, got -1"),
    ]:
        with pytest.raises(SphinxToolsError, match=message):
            TrainConfig(**base, **{key: value})  # built in Python: checked as when loaded
    cfg = TrainConfig(**base, token_position={"coco": "d/c.json"}, encoder_warmup={"coco": "d/c.json"})
    assert cfg.token_position["layer"] == 1  # defaults filled
    assert cfg.encoder_warmup["steps"] == 600


def test_a_loaded_config_resolves_its_paths_against_the_yaml_folder(synth_data):
    path = write_config(synth_data, "paths", coordinate_weight=2.0,
                        encoder_warmup={"coco": "data/coco.json"},
                        token_position={"coco": "data/coco.json"})
    cfg = TrainConfig.load(path)
    data = str((synth_data / "data").resolve())
    assert cfg.out == str((synth_data / "paths").resolve()) and cfg.data[0]["root"] == data
    assert cfg.encoder_warmup["images"] == data and cfg.token_position["images"] == data
    assert cfg.init["tokenizer"] == str((synth_data / "tok.model").resolve())
    with pytest.raises(SphinxToolsError, match="coordinate_weight must be positive, got -1"):
        TrainConfig.load(write_config(synth_data, "negative", coordinate_weight=-1))


def test_object_pointer_config_errors(synth_data, tmp_path):
    base = dict(init={"preset": "tiny"}, data=[], out=str(tmp_path / "run"))
    tp = {"coco": "d/c.json"}
    for spec, message in [
        ([1], "object_pointer must be a mapping"),
        ({"layers": 1}, r"unknown object_pointer keys \['layers'\]"),
        ({"layer": -1}, "object_pointer.layer must be an int >= 0, got -1"),
        ({"width": 0}, "object_pointer.width must be an int >= 1, got 0"),
        ({"weight": -2}, "object_pointer.weight must be positive, got -2"),
    ]:
        with pytest.raises(SphinxToolsError, match=message):
            TrainConfig(**base, token_position=tp, object_pointer=spec)
    with pytest.raises(SphinxToolsError, match="object_pointer needs token_position"):
        TrainConfig(**base, object_pointer={})
    assert TrainConfig(**base, token_position=tp, object_pointer={"layer": 0}).object_pointer == {
        "layer": 0, "weight": 1.0, "width": 32}
    # the layer, and a tokenizer without coordinate pieces, fail before the encoder warm-up
    warm = {"coco": "missing.json", "steps": 1}
    tpd = {"coco": "data/coco.json"}
    cfg = TrainConfig.load(write_config(synth_data, "op_deep", token_position=tpd, encoder_warmup=warm,
                                        object_pointer={"layer": 5}))
    with pytest.raises(SphinxToolsError, match="object_pointer.layer 5 is past the model's 2 layers"):
        train(cfg, progress=False)
    cfg = TrainConfig.load(write_config(synth_data, "op_tok", token_position=tpd, encoder_warmup=warm,
                                        object_pointer={"layer": 1}))
    with pytest.raises(SphinxToolsError, match="object_pointer and object_attention read the answers' boxes from coordinate pieces"):
        train(cfg, progress=False)


def test_object_attention_config_errors(synth_data, tmp_path):
    base = dict(init={"preset": "tiny"}, data=[], out=str(tmp_path / "run"))
    tp = {"coco": "d/c.json"}
    for spec, message in [
        ([1], "object_attention must be a mapping"),
        ({"heads": 1}, r"unknown object_attention keys \['heads'\]"),
        ({"layer": -1}, "object_attention.layer must be an int >= 0, got -1"),
        ({"question_layer": 1.5}, "object_attention.question_layer must be an int >= 0, got 1.5"),
        ({"head": True}, "object_attention.head must be an int >= 0, got True"),
        ({"weight": 0}, "object_attention.weight must be positive, got 0"),
        ({"boxes": "all"}, r"object_attention.boxes must be one of \['first', 'every', 'named'\], "
                           "got 'all'"),
    ]:
        with pytest.raises(SphinxToolsError, match=message):
            TrainConfig(**base, token_position=tp, object_attention=spec)
    with pytest.raises(SphinxToolsError, match="object_attention needs token_position"):
        TrainConfig(**base, object_attention={})
    with pytest.raises(SphinxToolsError, match="object_attention trains one head .* needs model_parallel 1, got 2"):
        TrainConfig(**base, token_position=tp, object_attention={}, model_parallel=2)
    assert TrainConfig(**base, token_position=tp, object_attention={"question_layer": 1}).object_attention == {
        "layer": 3, "question_layer": 1, "head": 0, "weight": 1.0, "boxes": "first"}
    # the layers and the head must exist: checked before the encoder warm-up
    warm = {"coco": "missing.json", "steps": 1}
    tpd = {"coco": "data/coco.json"}
    for spec, message in [({"layer": 1, "question_layer": 2}, "object_attention.question_layer 2 is past the model's 2 layers"),
                          ({"layer": 1, "head": 99}, "object_attention.head 99 is past the model's 4 heads")]:
        cfg = TrainConfig.load(write_config(synth_data, "oa_bad", token_position=tpd, encoder_warmup=warm,
                                            object_attention=spec))
        with pytest.raises(SphinxToolsError, match=message):
            train(cfg, progress=False)
