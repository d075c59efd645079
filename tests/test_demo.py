"The name ``demo`` (sphinx_tools.demo.resolve): the embedded model unless a real checkpoint folder is called that."

from pathlib import Path

import pytest

from sphinx_tools import demo
from sphinx_tools.errors import CheckpointError


def test_demo_name_is_not_shadowed_by_a_folder_without_shards(tmp_path, monkeypatch):
    installed = tmp_path / "installed"
    installed.mkdir()
    (installed / "tokenizer.model").write_bytes(b"x")
    monkeypatch.setattr(demo, "DEMO_DIR", installed)
    monkeypatch.chdir(tmp_path)
    assert demo.resolve("demo") == installed  # no ./demo at all
    (tmp_path / "demo" / "run").mkdir(parents=True)  # e.g. `demo build --work demo`
    assert demo.resolve("demo") == installed
    (tmp_path / "demo" / "consolidated.00-of-01.model.pth").write_bytes(b"")
    assert demo.resolve("demo") == Path("demo")  # a checkpoint folder named demo is the user's
    assert demo.resolve(str(tmp_path / "demo")) == tmp_path / "demo"  # other paths pass through
    monkeypatch.setattr(demo, "DEMO_DIR", tmp_path / "not-installed")
    (tmp_path / "demo" / "consolidated.00-of-01.model.pth").unlink()
    with pytest.raises(CheckpointError, match="demo build"):
        demo.resolve("demo")


def test_the_shipped_model_was_trained_by_the_recipe_in_the_repo():
    import yaml

    shipped = yaml.safe_load((demo.DEMO_DIR / "train.yaml").read_text())
    assert {k: shipped[k] for k in demo.RECIPE["train"]} == demo.RECIPE["train"]
    assert shipped["init"] == {**demo.RECIPE["model"], "tokenizer": "tokenizer.model"}
    assert shipped["data"][0]["independent_turns"] == demo.RECIPE["independent_turns"]
