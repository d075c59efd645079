"""The demo model's build recipe (sphinx_tools.demo.recipe). What the name ``demo`` means is
tested with the checkpoint code (tests/test_checkpoint.py)."""

import pytest
import torch

from sphinx_tools import demo
from sphinx_tools.demo import recipe
from sphinx_tools.errors import SphinxToolsError


def test_the_shipped_model_was_trained_by_the_recipe_in_the_repo():
    import yaml

    configs = recipe.training_configs(recipe.base_recipe(recipe.SHIPPED_SHAPE, False))
    assert {name for name, _ in configs} == {p.name for p in demo.DEMO_DIR.glob("train*.yaml")}
    for name, config in configs:  # every stage's config, as the build wrote it beside the weights
        assert yaml.safe_load((demo.DEMO_DIR / name).read_text()) == config, name


TINY_RECIPE = {
    "scenes": 4, "data_seed": 0, "turns": 32, "independent_turns": True, "vocab_size": 512,
    "coordinate_tokens": True, "model": {"preset": "tiny", "seed": 0},
    "train": {"encoder_warmup": {"coco": "data/coco.json", "images": "data/images", "steps": 1, "batch_size": 1},
              "train": ["llm", "proj", "tokens"], "steps": 2, "batch_size": 1, "lr": 1e-3, "warmup": 1,
              "save_every": 2, "log_every": 1, "seed": 0, "max_minutes": 30},
    "procs": 1,
}


def test_scaled_recipe_multiplies_scenes_and_images_per_step():
    r = recipe.scaled_recipe(4, 1, recipe.RECIPE)
    base = recipe.RECIPE
    assert r["scenes"] == 4 * base["scenes"] and r["train"]["steps"] == base["train"]["steps"]
    assert r["train"]["batch_size"] == 4 * base["train"]["batch_size"] * base["procs"]  # one process: the global batch
    assert r["train"]["encoder_warmup"]["batch_size"] == 4 * base["train"]["encoder_warmup"]["batch_size"] * base["procs"]
    assert r["train"]["lr"] == base["train"]["lr"] and r["train"]["max_minutes"] is None
    assert recipe.scaled_recipe(1, base["procs"], base) == base
    with pytest.raises(SphinxToolsError, match="3 processes cannot share a global batch of 4"):
        recipe.scaled_recipe(1, 3, base)
    staged = recipe.scaled_recipe(4, 1, recipe.SINGLE_VIEW_STAGED)  # every stage takes the batch
    for name, config in recipe.training_configs(staged):
        assert config["batch_size"] == 4 * base["train"]["batch_size"] * base["procs"], name
        assert config["max_minutes"] is None, name
    assert recipe.RECIPE == base  # the recipe itself is untouched


def test_a_scaled_build_trains_on_more_scenes_and_keeps_its_own_dest(tmp_path, monkeypatch):
    import json

    import yaml
    from click.testing import CliRunner

    from sphinx_tools import SphinxModel

    monkeypatch.setattr(recipe, "RECIPE", TINY_RECIPE)
    monkeypatch.chdir(tmp_path)
    run = CliRunner().invoke(recipe.cli, ["build", "--shape", "sphinx-1k", "--work", "w", "--dest", "m",
                                          "--scale", "2", "--threads", "1"])
    assert run.exit_code == 0, run.output
    assert len(json.loads((tmp_path / "w" / "data" / "coco.json").read_text())["images"]) == 8
    cfg = yaml.safe_load((tmp_path / "m" / "train.yaml").read_text())
    assert cfg["batch_size"] == 2 and cfg["encoder_warmup"]["batch_size"] == 2 and cfg["max_minutes"] is None
    log = [json.loads(line) for line in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2  # the training log travels with the weights
    built = SphinxModel.from_pretrained(tmp_path / "m")
    assert built.transformer.cfg.dim > 0
    # the prompt wording of the training scenes travels with the weights
    from sphinx_tools.demo.synth import TRAINED_TASK_OPTIONS
    assert built.task_options == TRAINED_TASK_OPTIONS and "layout" in built.task_options
    again = CliRunner().invoke(recipe.cli, ["build", "--shape", "sphinx-1k", "--work", "w", "--dest", "m",
                                            "--scale", "3"])
    assert again.exit_code != 0 and "holds 8 scenes, this build wants 12" in str(again.exception)
    shipped = CliRunner().invoke(recipe.cli, ["build", "--work", "w2", "--scale", "2"])
    assert shipped.exit_code != 0 and "give it its own --dest" in shipped.output
    assert not (tmp_path / "w2").exists()  # refused before any work
    if not torch.cuda.is_available():
        no_gpu = CliRunner().invoke(recipe.cli, ["build", "--work", "w3", "--dest", "m3", "--device", "cuda"])
        assert no_gpu.exit_code == 2 and "CUDA is not available" in no_gpu.output


def test_importing_the_demo_package_loads_no_torch_and_no_recipe():
    import subprocess
    import sys

    code = ("import sys, sphinx_tools.demo as d; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('sphinx_tools.train', "
            "'sphinx_tools.demo.')))); d.resolve('demo'); "
            "print(sorted(m for m in sys.modules if m.startswith(('sphinx_tools.train', 'sphinx_tools.demo.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "[]"]  # nor does resolving the name "demo" load the recipe


def test_shipped_measurements_live_with_the_weights():
    import json

    quality = json.loads((demo.DEMO_DIR / "quality.json").read_text())
    probe = json.loads((demo.DEMO_DIR / "token_probe.json").read_text())
    assert quality["checkpoint"] == "demo" and "rec_acc50" in quality
    assert probe["checkpoint"] == "demo" and "own_box" in probe


def test_python_m_demo_offers_build_quality_probe_and_oracle():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "sphinx_tools.demo", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert all(f"  {name} " in out for name in ("build", "quality", "probe", "oracle"))


TINY_PILOT = {
    **TINY_RECIPE, "scenes": 6, "kinds": ["shapes"], "tasks": ["rec", "detection"],
    "model": {"preset": "tiny-224", "seed": 0, "overrides": {"vision": {"patch_size": 28, "qf_queries": 2}}},
}


def test_the_single_view_pilot_trains_one_224_view_on_rec_and_detection(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from sphinx_tools import SphinxModel

    assert recipe.PILOT["model"]["preset"] == "tiny-224" and "token_position" not in recipe.PILOT["train"]
    monkeypatch.setattr(recipe, "PILOT", TINY_PILOT)
    monkeypatch.chdir(tmp_path)
    run = CliRunner().invoke(recipe.cli, ["build", "--shape", "single-view", "--pilot", "--work", "w",
                                          "--dest", "m", "--threads", "1"])
    assert run.exit_code == 0, run.output
    convs = json.loads((tmp_path / "w" / "data" / "conversations.json").read_text())
    assert {t for c in convs for t in c["tasks"]} == {"rec", "detection"}
    kinds = {i["kind"] for i in json.loads((tmp_path / "w" / "data" / "coco.json").read_text())["images"]}
    assert kinds == {"shapes"}
    cfg = SphinxModel.from_pretrained(tmp_path / "m").transformer.cfg
    assert (cfg.llama_type, cfg.n_views, cfg.image_size, cfg.vision.grid) == ("llama_ens", 1, 224, 8)
    assert "quality --pilot" in run.output  # the build says how to measure it
    from sphinx_tools.demo.quality import quality_command

    measured = CliRunner().invoke(quality_command, ["--pilot", "--checkpoint", str(tmp_path / "m"),
                                                    "--n", "3"])
    assert measured.exit_code == 0, measured.output
    res = json.loads((tmp_path / "m" / "pilot.json").read_text())
    rec = res["teacher_forced"]["rec"]
    assert set(res["teacher_forced"]) == {"rec", "detection"} and rec["first_corners"] > 0
    assert 0 <= res["rec_acc50_3plus"] <= 1 and res["rec_questions_3plus"] > 0
    misses = res["rec_misses_3plus"]
    assert misses["misses"] == round((1 - res["rec_acc50_3plus"]) * res["rec_questions_3plus"])
    assert misses["misses"] == sum(v for k, v in misses.items() if k != "misses")


TINY_SINGLE_VIEW = {
    **TINY_RECIPE, "scenes": 8,
    "model": {"preset": "tiny-224", "seed": 0, "overrides": {"n_layers": 2, "vision": {"patch_size": 28}}},
    "train": {**TINY_RECIPE["train"], "steps": 3, "save_every": 3,
              "token_position": {"coco": "data/coco.json", "images": "data/images", "layer": 1},
              "object_attention": {"layer": 1, "question_layer": 0}},
}


def test_the_full_single_view_recipe_trains_every_kind_with_both_hops(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from sphinx_tools import SphinxModel
    from sphinx_tools.demo.synth import KINDS
    from sphinx_tools.train import TrainConfig

    full = recipe.base_recipe("single-view", False)
    assert full is recipe.SINGLE_VIEW and "kinds" not in full and "tasks" not in full
    hops = full["train"]["object_attention"]
    assert hops["question_layer"] < hops["layer"] < full["model"]["overrides"]["n_layers"]
    cfg = TrainConfig(init={"preset": "tiny"}, data=[], out=str(tmp_path / "cfg"), **full["train"])
    assert cfg.object_attention["layer"] == hops["layer"] and cfg.token_position

    monkeypatch.setattr(recipe, "SINGLE_VIEW", TINY_SINGLE_VIEW)
    monkeypatch.chdir(tmp_path)
    run = CliRunner().invoke(recipe.cli, ["build", "--shape", "single-view", "--work", "w",
                                          "--dest", "m", "--threads", "1"])
    assert run.exit_code == 0, run.output
    kinds = {i["kind"] for i in json.loads((tmp_path / "w" / "data" / "coco.json").read_text())["images"]}
    assert kinds == set(KINDS)
    log = [json.loads(line) for line in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    assert any("attention_loss" in r and "question_loss" in r for r in log)
    model_cfg = SphinxModel.from_pretrained(tmp_path / "m").transformer.cfg
    assert (model_cfg.llama_type, model_cfg.n_views, model_cfg.image_size) == ("llama_ens", 1, 224)


def build_staged(tiny: dict, tmp_path, monkeypatch):
    "Build ``tiny`` as the single-view-staged recipe into w/ (installed in m/); returns w/data."
    from click.testing import CliRunner

    monkeypatch.setattr(recipe, "SINGLE_VIEW_STAGED", tiny)
    monkeypatch.chdir(tmp_path)
    run = CliRunner().invoke(recipe.cli, ["build", "--shape", "single-view-staged", "--work", "w",
                                          "--dest", "m", "--threads", "1"])
    assert run.exit_code == 0, run.output
    return tmp_path / "w" / "data"


def test_the_staged_recipe_trains_shapes_rec_and_detection_then_every_task(tmp_path, monkeypatch):
    import json

    import yaml
    from click.testing import CliRunner

    from sphinx_tools import SphinxModel
    from sphinx_tools.train import TrainConfig

    staged = recipe.base_recipe("single-view-staged", False)
    assert staged is recipe.SINGLE_VIEW_STAGED
    assert {k: v for k, v in staged.items() if k not in ("stages", "replay", "train", "class_lists")} == {
        k: v for k, v in recipe.SINGLE_VIEW.items() if k != "train"}
    assert staged["class_lists"] is True and "class_lists" not in recipe.SINGLE_VIEW
    minutes = [s["train"]["max_minutes"] for s in [*staged["stages"], staged]]
    assert sum(minutes) <= 60  # the full recipe's budget on 2 cores, all stages together
    for name, config in recipe.training_configs(staged):
        TrainConfig(**{**config, "out": str(tmp_path / name)})  # every stage's keys are valid

    tiny = {**TINY_SINGLE_VIEW, "scenes": 8, "replay": 0.5, "class_lists": True,
            "train": recipe._changed(TINY_SINGLE_VIEW["train"], {
                "object_attention": {"boxes": "named"},
                "encoder_warmup": {"steps": 2, "batch_size": 4, "read": "text", "read_weight": 0.3}}),
            "stages": [{"kinds": ["shapes"], "tasks": ["rec", "detection"], "train": {"steps": 2}}]}
    data = build_staged(tiny, tmp_path, monkeypatch)
    images = json.loads((data / "coco.json").read_text())["images"]
    kind = {i["file_name"]: i["kind"] for i in images}
    first = json.loads((data / "stage1.json").read_text())
    every = json.loads((data / "conversations.json").read_text())
    assert {kind[r["image"].split("/")[-1]] for r in first} == {"shapes"}
    assert {t for r in first for t in r["tasks"]} == {"rec", "detection"}
    assert {t for r in every for t in r["tasks"]} > {"rec", "detection"}
    for r in first:  # each kept question with its own answer
        whole = next(e for e in every if e["image"] == r["image"])
        pairs = [tuple(whole["conversations"][2 * i:2 * i + 2]) for i in range(len(whole["tasks"]))]
        kept = [tuple(r["conversations"][2 * i:2 * i + 2]) for i in range(len(r["tasks"]))]
        assert kept == [p for p, t in zip(pairs, whole["tasks"]) if t in ("rec", "detection")]
    # the shapes scenes also ask detection of several named classes (the label --categories wording)
    assert any(len(o.get("classes") or []) > 1 for r in first for o in r["options"])
    # stage 1 warms the encoders up and trains on its records; the last stage starts from its
    # checkpoint, on every record and half of stage 1's again
    one = yaml.safe_load((tmp_path / "m" / "train_stage1.yaml").read_text())
    last = yaml.safe_load((tmp_path / "m" / "train.yaml").read_text())
    assert one["data"][0]["path"] == "data/stage1.json" and one["encoder_warmup"]["read"] == "text"
    assert last["init"] == {"checkpoint": "run_stage1/last"} and "encoder_warmup" not in last
    assert last["object_attention"]["boxes"] == "named"
    assert [(d["path"], d["ratio"]) for d in last["data"]] == [("data/conversations.json", 1.0),
                                                              ("data/stage1.json", 0.5)]
    for log in ("train_stage1_log.jsonl", "train_log.jsonl"):
        steps = [json.loads(x) for x in (tmp_path / "m" / log).read_text().splitlines()]
        assert max(r.get("step", 0) for r in steps) == (2 if "stage1" in log else 3)
    assert SphinxModel.from_pretrained(tmp_path / "m").transformer.cfg.n_views == 1
    # a rerun finds both stages done: nothing is trained again
    logs = [tmp_path / "w" / name for name in ("run_stage1_log.jsonl", "run_log.jsonl")]
    before = [log.read_text() for log in logs]
    again = CliRunner().invoke(recipe.cli, ["build", "--shape", "single-view-staged", "--work", "w",
                                            "--dest", "m", "--threads", "1"])
    assert again.exit_code == 0, again.output
    assert [log.read_text() for log in logs] == before


def test_the_reading_recipe_is_the_staged_one_with_wider_encoders_that_read(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from sphinx_tools.model import SphinxConfig
    from sphinx_tools.train import TrainConfig

    read, staged = recipe.base_recipe("single-view-read", False), recipe.SINGLE_VIEW_STAGED
    assert read is recipe.SINGLE_VIEW_READ
    same = ("scenes", "kinds", "data_seed", "turns", "class_lists", "replay", "vocab_size", "procs")
    assert {k: read.get(k) for k in same} == {k: staged.get(k) for k in same}  # the same scenes
    assert [s["kinds"] for s in read["stages"]] == [s["kinds"] for s in staged["stages"]]
    warm = read["train"]["encoder_warmup"]
    assert (warm["read"], warm["read_weight"], warm["steps"]) == ("text", 0.1, 7200)
    assert warm["categories"] == staged["train"]["encoder_warmup"]["categories"] + ["word"]
    vision = read["model"]["overrides"]["vision"]
    cfg = SphinxConfig.from_name(read["model"]["preset"], **read["model"]["overrides"]).vision
    narrow = SphinxConfig.from_name(staged["model"]["preset"], **staged["model"]["overrides"]).vision
    assert (cfg.clip_width, cfg.dino_width, cfg.convnext_dims[-1]) == (
        2 * narrow.clip_width, 2 * narrow.dino_width, 2 * narrow.convnext_dims[-1])
    assert vision["patch_size"] == 28 and cfg.fused_width == 2 * narrow.fused_width
    configs = recipe.training_configs(read)
    for name, config in configs:
        TrainConfig(**{**config, "out": str(tmp_path / name)})  # every stage's keys are valid
    assert configs[0][1]["encoder_warmup"]["read"] == "text" and "encoder_warmup" not in configs[1][1]
    assert recipe.SHIPPED_SHAPE == "single-view-read"  # the build's default: the shipped model
    monkeypatch.chdir(tmp_path)
    for other in (["--shape", "single-view-staged"], ["--shape", "sphinx-1k"], ["--scale", "2"]):
        run = CliRunner().invoke(recipe.cli, ["build", *other, "--work", "w"])
        assert run.exit_code == 2 and "give it its own --dest" in run.output, other
    assert not (tmp_path / "w").exists()


def test_a_single_view_build_needs_its_own_dest(tmp_path, monkeypatch):
    from click.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    for pilot in ([], ["--pilot"]):
        run = CliRunner().invoke(recipe.cli, ["build", "--shape", "single-view", *pilot, "--work", "w"])
        assert run.exit_code == 2 and "give it its own --dest" in run.output
    alone = CliRunner().invoke(recipe.cli, ["build", "--hypothesis", "deeper-llm", "--work", "w", "--dest", "m"])
    assert alone.exit_code == 2 and "add --pilot" in alone.output
    assert not (tmp_path / "w").exists()


def test_a_pilot_hypothesis_changes_only_the_model_overrides_it_names():
    base, deeper = recipe.PILOT, recipe.pilot_recipe("deeper-llm")
    assert recipe.pilot_recipe("base") == base
    assert {k: v for k, v in deeper.items() if k not in ("model", "train")} == {
        k: v for k, v in base.items() if k not in ("model", "train")}
    changed = recipe.HYPOTHESES["deeper-llm"]
    assert deeper["model"]["overrides"]["n_layers"] == changed["model"]["n_layers"]
    assert deeper["model"]["overrides"]["vision"] == {**base["model"]["overrides"]["vision"],
                                                      **changed["model"]["vision"]}
    assert deeper["train"] == {**base["train"], **changed["train"]}
    assert base["model"]["overrides"]["n_layers"] == recipe.RECIPE["model"]["overrides"]["n_layers"]


def test_every_pilot_hypothesis_is_a_valid_training_config(tmp_path):
    from sphinx_tools.train import TrainConfig

    for name in recipe.HYPOTHESES:
        train = recipe.pilot_recipe(name)["train"]
        cfg = TrainConfig(init={"preset": "tiny"}, data=[], out=str(tmp_path / name), **train)
        assert cfg.steps == train["steps"]
    pointer = recipe.pilot_recipe("object-pointer")["train"]
    assert pointer["object_pointer"]["layer"] < recipe.pilot_recipe("object-pointer")["model"]["overrides"]["n_layers"]
    assert pointer["token_position"] == recipe.RECIPE["train"]["token_position"]
    two_hop = recipe.pilot_recipe("two-hop")
    hops = two_hop["train"]["object_attention"]
    assert hops["question_layer"] < hops["layer"] < two_hop["model"]["overrides"]["n_layers"]


def test_the_polish_run_trains_last_on_every_record_with_its_kinds_twice(tmp_path, monkeypatch):
    import json

    import yaml
    from click.testing import CliRunner

    from sphinx_tools.train import TrainConfig

    read = recipe.SINGLE_VIEW_READ
    assert read["polish"]["kinds"] == ["pose", "words"] and read["polish"]["ratio"] == 1.0
    name, polish = recipe.training_configs(read)[-1]
    TrainConfig(**{**polish, "out": str(tmp_path / "p")})
    assert name == "train_polish.yaml" and polish["init"] == {"checkpoint": "run/last"}
    assert polish["lr"] == read["polish"]["train"]["lr"] < read["train"]["lr"]
    assert recipe.scaled_recipe(2, 2, read)["polish"]["train"]["max_minutes"] is None

    tiny = {**TINY_SINGLE_VIEW, "scenes": 8, "polish": {"kinds": ["pose", "words"], "ratio": 1.0,
                                                       "train": {"steps": 1, "lr": 5e-4}}}
    data = build_staged(tiny, tmp_path, monkeypatch)
    kind = {i["file_name"]: i["kind"] for i in json.loads((data / "coco.json").read_text())["images"]}
    every = json.loads((data / "conversations.json").read_text())
    again = json.loads((data / "polish.json").read_text())
    assert again == [r for r in every if kind[r["image"].split("/")[-1]] in ("pose", "words")] != []
    cfg = yaml.safe_load((tmp_path / "m" / "train_polish.yaml").read_text())
    assert cfg["init"] == {"checkpoint": "run/last"} and "encoder_warmup" not in cfg
    assert [d["path"] for d in cfg["data"]] == ["data/conversations.json", "data/polish.json"]
    assert (tmp_path / "m" / "train_polish_log.jsonl").is_file()
    installed = (tmp_path / "m" / "consolidated.00-of-01.model.pth").read_bytes()
    assert installed == (tmp_path / "w" / "run_polish" / "last" / "consolidated.00-of-01.model.pth").read_bytes()
