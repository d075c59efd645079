"""The image-token probes (sphinx_tools.demo.probe): patch labels and the linear probe."""

from types import SimpleNamespace

import numpy as np
import torch

from sphinx_tools.demo import probe as bench
from sphinx_tools.demo.synth import COLORS, SHAPES
from sphinx_tools.transforms import PaddedResize



def test_patch_labels_follow_the_padded_quadrants():
    # a 200 x 100 image padded to a square: it fills rows 112..336 of the 448 input
    obj = SimpleNamespace(xyxy=(0.0, 0.0, 200.0, 100.0), color="blue", category="star")
    scene = SimpleNamespace(size=(200, 100), objects=[obj])
    labels = bench.patch_labels(scene, PaddedResize(448), grid=4).reshape(4, 4, 4, 2)
    want = (list(COLORS).index("blue"), SHAPES.index("star"))
    inside = np.zeros((4, 4, 4), bool)  # (quadrant, row, column); patch centres 28, 84, 140, 196
    inside[:2, 2:] = True  # top quadrants: rows centred at 140 and 196 (+0)
    inside[2:, :2] = True  # bottom quadrants: rows centred at 252 and 308
    assert (labels[inside] == want).all() and (labels[~inside] == -1).all()


def test_a_single_view_model_s_patch_labels_are_its_one_view_s():
    obj = SimpleNamespace(xyxy=(0.0, 0.0, 200.0, 100.0), color="blue", category="star")
    scene = SimpleNamespace(size=(200, 100), objects=[obj])
    labels = bench.patch_labels(scene, PaddedResize(224), grid=4, n_views=1).reshape(4, 4, 2)
    assert bench.probed_views(1) == [0] and bench.probed_views(5) == [1, 2, 3, 4]
    inside = np.zeros((4, 4), bool)
    inside[1:3] = True  # the middle rows of the padded square: centres 84 and 140 of 56..168
    assert (labels[inside] == (list(COLORS).index("blue"), SHAPES.index("star"))).all()
    assert (labels[~inside] == -1).all()


def test_patch_objects_index_the_object_under_each_patch_and_later_ones_win():
    a = SimpleNamespace(xyxy=(0.0, 0.0, 448.0, 224.0), color="red", category="circle")
    b = SimpleNamespace(xyxy=(0.0, 0.0, 112.0, 112.0), color="blue", category="star")
    scene = SimpleNamespace(size=(448, 448), objects=[a, b])
    idx = bench.patch_objects(scene, PaddedResize(448), grid=4).reshape(5, 4, 4)
    want = np.full((5, 4, 4), -1)
    want[0, :2] = 0  # global view: a is the top half
    want[0, 0, 0] = 1  # b is its top-left patch, drawn later
    want[1:3] = 0  # the top quadrants are all under a
    want[1, :2, :2] = 1  # b covers the top-left quarter of the top-left quadrant
    assert (idx == want).all()


def test_linear_probe_learns_a_separable_label_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    assert (bench.linear_probe(x, y, 300) == y[300:]).float().mean() > 0.9
    noise = torch.randint(4, (400,), generator=g)
    assert (bench.linear_probe(x, noise, 300) == noise[300:]).float().mean() < 0.45


def test_the_probe_command_measures_a_single_view_model(tmp_path):
    import json

    from click.testing import CliRunner

    from sphinx_tools import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "m", variant="sphinx")  # one 224 view
    out = tmp_path / "probe.json"
    run = CliRunner().invoke(bench.probe_command, ["--checkpoint", str(ckpt), "--scenes", "6",
                                                   "--where-scenes", "10", "--word-scenes", "8",
                                                   "--out", str(out)])
    assert run.exit_code == 0, run.output
    res = json.loads(out.read_text())
    from sphinx_tools import SphinxModel

    g = SphinxModel.from_pretrained(ckpt).transformer.cfg.vision.grid
    assert res["what"]["patches"] == 6 * g * g  # the one view's patches of each scene
    assert 0 <= res["what"]["color_accuracy_on_objects"] <= 1
    assert set(res["own_box"]) == {"scenes", "ridge_lambda", "global"}  # no quadrants
    assert len(res["own_box"]["global"]["llm_layers_corner_mae"]) > 0
    words = res["words"]  # every word of 8 scenes (a few may fall between patch centres)
    assert 8 <= words["words"] <= 8 * 8 and 0 <= words["accuracy"] <= 1
    assert 0 < words["commonest"] <= 1 and 0 <= words["accuracy_from_box_alone"] <= 1
