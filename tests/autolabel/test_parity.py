"""On the tiny checkpoint: shared-work labeling equals independent per-task ``generate`` calls."""

from sphinx_tools.pipelines.autolabel import Labeler, open_source
from sphinx_tools.pipelines.autolabel.engine import SequentialModel
from sphinx_tools.pipelines.autolabel.run import load_work, shard_items

TASKS = ["detection", "ocr", "caption", "layout", "grounded_caption"]


class Recorder:
    "Wraps a model; keeps every generation that ``generate_multi`` returns."

    def __init__(self, model):
        self.model, self.generations = model, []

    def generate_multi(self, images, questions, **sampling):
        out = self.model.generate_multi(images, questions, **sampling)
        self.generations += [(g.token_ids, g.text, g.finish_reason) for row in out for g in row]
        return out


def label(model, synth_dir, batch_size):
    labeler = Labeler(model, TASKS, max_gen_len=12, model_id="tiny")
    items = list(shard_items(open_source(synth_dir / "images"), limit=3))
    works = [load_work(item, labeler, set()) for item in items]
    records = []
    for start in range(0, len(works), batch_size):
        records += labeler.label(works[start: start + batch_size])
    return [(r["file_name"], r["task"], r["result"]) for r in records]


def test_greedy_labels_equal_independent_generate_calls(tiny_model, synth_dir):
    shared, independent = Recorder(tiny_model), Recorder(SequentialModel(tiny_model))
    got = label(shared, synth_dir, batch_size=3)
    want = label(independent, synth_dir, batch_size=1)
    assert len(shared.generations) == len(independent.generations) == 3 * len(TASKS)
    assert shared.generations == independent.generations
    assert got == want


def test_held_images_give_the_labels_of_the_full_images(tiny_model, synth_dir, tmp_path):
    "Images reduced to the model's tensor on loading (a large copy too) label as the full ones."
    from PIL import Image

    from sphinx_tools.pipelines.autolabel.engine import Work
    from sphinx_tools.pipelines.autolabel.sources import ImageItem

    labeler = Labeler(tiny_model, TASKS, max_gen_len=12, model_id="tiny")
    items = list(shard_items(open_source(synth_dir / "images"), limit=2))
    big = Image.open(items[0].path).convert("RGB")
    big = big.resize((big.width * 5, big.height * 5), Image.NEAREST)
    big.save(tmp_path / "big.png")
    items.append(ImageItem(2, tmp_path / "big.png", "big.png", 3))
    held = [load_work(item, labeler, set()) for item in items]
    assert all(w.image.shape[-1] == tiny_model.cfg.image_size for w in held)
    full = [Work(w.item, Image.open(w.item.path).convert("RGB"), w.hash, w.keys, w.pending)
            for w in held]
    assert labeler.label(held) == labeler.label(full)
