"""The oracle-token diagnostic (sphinx_tools.demo.oracle): ground-truth image tokens for a
pilot's language model."""

import json

import torch

from sphinx_tools.demo import oracle, recipe
from sphinx_tools.demo.synth import COLORS, SHAPES

NC, NS = len(COLORS), len(SHAPES)


def _cell(features, grid, row, col):
    return features[row * grid + col]


def test_oracle_features_say_what_and_where_each_patch_object_is():
    grid = 8  # 28-px patches of a 224 image; centres at 14, 42, 70, ...
    objects = [("red", "square", (0, 0, 84, 84)),  # holds the centres of rows and columns 0-2
               ("blue", "star", (150, 160, 160, 168))]  # holds no centre: the patch of its centre
    f = oracle.oracle_features(objects, (224, 224), grid)
    assert f.shape == (grid * grid, oracle.feature_width(grid))
    square = _cell(f, grid, 1, 2)
    assert square[list(COLORS).index("red")] == 1 and square[NC + SHAPES.index("square")] == 1
    assert square[:NC + NS].sum() == 2
    assert torch.allclose(square[NC + NS:NC + NS + 4], torch.tensor([0.0, 0.0, 84 / 224, 84 / 224]))
    star = _cell(f, grid, 164 // 28, 155 // 28)
    assert star[list(COLORS).index("blue")] == 1 and star[NC + SHAPES.index("star")] == 1
    background = _cell(f, grid, 7, 0)
    assert background[:NC + NS + 4].abs().sum() == 0
    rows, cols = f[:, NC + NS + 4:NC + NS + 4 + grid], f[:, NC + NS + 4 + grid:]
    assert torch.equal(rows.argmax(1), torch.arange(grid * grid) // grid)
    assert torch.equal(cols.argmax(1), torch.arange(grid * grid) % grid)
    assert rows.sum() == cols.sum() == grid * grid


def test_oracle_features_of_a_padded_image_are_in_padded_fractions():
    # a 448 x 224 image is padded to 448 square: its objects sit in the middle rows
    f = oracle.oracle_features([("green", "circle", (0, 0, 224, 224))], (448, 224), 8)
    owned = torch.nonzero(f[:, list(COLORS).index("green")]).flatten()
    assert set((owned // 8).tolist()) == {2, 3, 4, 5} and set((owned % 8).tolist()) == {0, 1, 2, 3}
    assert torch.allclose(f[owned[0], NC + NS:NC + NS + 4], torch.tensor([0.0, 0.25, 0.5, 0.75]))


TINY_PILOT = {
    "scenes": 6, "data_seed": 0, "turns": 32, "independent_turns": True, "vocab_size": 512,
    "coordinate_tokens": True, "kinds": ["shapes"], "tasks": ["rec", "detection"],
    "model": {"preset": "tiny-224", "seed": 0, "overrides": {"vision": {"patch_size": 28, "qf_queries": 2}}},
    "train": {"train": ["llm", "proj", "tokens"], "steps": 100, "batch_size": 1, "lr": 2e-3, "warmup": 5,
              "min_lr": 1e-4, "max_len": 2560, "save_every": 100, "log_every": 10, "seed": 0},
    "procs": 2,
}


def test_the_oracle_trains_the_pilot_language_model_and_takes_the_pilot_measures(tmp_path, monkeypatch):
    from click.testing import CliRunner

    monkeypatch.setattr(recipe, "PILOT", TINY_PILOT)
    recipe.write_training_files(tmp_path / "w", TINY_PILOT, progress=False)
    cfg = oracle.oracle_config(tmp_path / "w", "base", None)
    assert cfg.batch_size == 2 and cfg.steps == 100 and cfg.train == ["llm"]  # the global batch, one process
    run = CliRunner().invoke(oracle.oracle_command, ["--work", str(tmp_path / "w"), "--hypothesis", "base",
                                                     "--n", "6", "--threads", "1"])
    assert run.exit_code == 0, run.output
    res = json.loads((tmp_path / "w" / "oracle-base-100x2.json").read_text())
    assert res["llm"] == {"dim": 64, "n_layers": 2, "n_heads": 4} and res["steps"] == 100
    first, last = res["loss_every_50_steps"]
    assert last < first  # it learns from the oracle tokens
    assert res["teacher_forced"]["rec"]["first_corners"] > 0 and 0 <= res["first_corner_mae_3plus"] <= 1
    assert 0 <= res["named_object_nearest_3plus"] <= 1
    bad = CliRunner().invoke(oracle.oracle_command, ["--work", str(tmp_path / "w"), "--hypothesis", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output
    # with both attention hops trained: their loss is logged beside the answers'
    run = CliRunner().invoke(oracle.oracle_command, ["--work", str(tmp_path / "w"), "--hypothesis", "base",
                                                     "--n", "2", "--threads", "1", "--steps", "50",
                                                     "--attend", "1", "--attend-question", "0"])
    assert run.exit_code == 0, run.output
    res = json.loads((tmp_path / "w" / "oracle-base-50x2-attend1-q0.json").read_text())
    assert res["attend"] == 1 and res["attend_question"] == 0
    assert len(res["loss_every_50_steps"]["answer"]) == 1 and res["loss_every_50_steps"]["attend"][0] > 0
    for args, message in [(["--attend", "1", "--no-box"], "--attend needs --box"),
                          (["--attend-question", "0"], "--attend-question goes with --attend")]:
        bad = CliRunner().invoke(oracle.oracle_command, ["--work", str(tmp_path / "w"), *args])
        assert bad.exit_code == 2 and message in bad.output
