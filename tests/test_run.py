"""``run_task`` (sphinx_tools.run) and ``sphinx-tools label`` share one default: greedy decoding, so
the same task on the same image gives the same answer in Python and on the command line."""

import numpy as np
import pytest
from PIL import Image

from sphinx_tools.run import run_task

TASKS = ["detection", "caption", "ocr"]
MAX_GEN_LEN = 12


class Recorder:
    "Wraps a model; keeps the sampling settings and answer texts of every call."

    def __init__(self, model):
        self.model, self.sampling, self.texts = model, [], []

    def preprocess(self, image):
        return self.model.preprocess(image)

    def generate(self, prompts, images, **kwargs):
        out = self.model.generate(prompts, images, **kwargs)
        self.sampling.append({k: kwargs.get(k) for k in ("temperature", "top_p")})
        self.texts += [g.text for g in out]
        return out

    def generate_multi(self, images, questions, **kwargs):
        out = self.model.generate_multi(images, questions, **kwargs)
        self.sampling.append({k: kwargs.get(k) for k in ("temperature", "top_p")})
        self.texts += [g.text for row in out for g in row]
        return out


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    pixels = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "scene.png")
    return folder


@pytest.mark.parametrize("name", TASKS)
def test_run_task_and_label_give_the_same_answer(tiny_model, image_dir, name):
    from sphinx_tools.pipelines.autolabel import Labeler, open_source
    from sphinx_tools.pipelines.autolabel.run import load_work, shard_items

    direct = Recorder(tiny_model)
    image = Image.open(image_dir / "scene.png").convert("RGB")
    result = run_task(direct, image, name, max_gen_len=MAX_GEN_LEN)

    labeled = Recorder(tiny_model)
    labeler = Labeler(labeled, [name], max_gen_len=MAX_GEN_LEN, model_id="tiny")
    (item,) = shard_items(open_source(image_dir))
    (record,) = labeler.label([load_work(item, labeler, set())])

    assert direct.sampling == labeled.sampling == [{"temperature": 0.0, "top_p": 0.95}]
    assert direct.texts == labeled.texts and len(direct.texts) == 1
    assert record["task"] == name and "error" not in record
    assert result is not None


class Asked:
    "A model with trained task options that records each prompt and answers one layout region."

    task_options = {"layout": {"variant": "classes"}}

    def __init__(self):
        self.prompts = []

    def generate(self, prompts, images, **kwargs):
        from sphinx_tools.generate import Generation

        self.prompts += prompts
        return [Generation(text="<p>title</p> [0.10,0.10,0.90,0.20]", token_ids=[]) for _ in prompts]


def test_run_task_asks_in_the_model_s_trained_wording_unless_told_otherwise():
    model, image = Asked(), Image.new("RGB", (100, 100))
    trained = run_task(model, image, "layout")
    run_task(model, image, "layout", variant="default")
    assert "Detect all layout regions (" in model.prompts[0]
    assert "Detect the layout of the document in the image." in model.prompts[1]
    assert list(trained.data["class_name"]) == ["title"]
