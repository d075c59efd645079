"""The progress of ``label``: one tick per image as soon as its labels are done, not per batch."""

import pytest
import torch

from sphinx_tools.pipelines.autolabel import Labeler, label_dataset, open_source
from sphinx_tools.pipelines.autolabel import run as run_module
from sphinx_tools.pipelines.autolabel.engine import SequentialModel, Work
from sphinx_tools.pipelines.autolabel.sources import ImageItem

from .conftest import ScriptedModel


class Bar:
    "Stands in for the tqdm bar: records each update and what was logged at that moment."

    def __init__(self, out):
        self.updates, self.out = [], out

    def update(self, n):
        from sphinx_tools.pipelines.autolabel.worklog import WorkLog, log_dir_for

        self.updates.append((n, sum(1 for _ in WorkLog(log_dir_for(self.out)).records())))

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


class ReportingModel(ScriptedModel):
    "Answers like ``ScriptedModel`` and reports its images last to first, as they finish."

    def generate_multi(self, images, questions, on_image=None, **sampling):
        out = super().generate_multi(images, questions, **sampling)
        for j in reversed(range(len(images)) if on_image is not None else []):
            on_image(j)
        return out


@pytest.mark.parametrize("model", [ScriptedModel(), ReportingModel()], ids=["plain", "reporting"])
def test_the_bar_ticks_once_per_image_before_the_batch_is_written(model, synth_dir, tmp_path,
                                                                  monkeypatch):
    out = tmp_path / "labels.json"
    bar = Bar(out)
    monkeypatch.setattr(run_module, "_progress", lambda *a: bar)
    labeler = Labeler(model, ["detection", "pose", "caption"], model_id="scripted")
    summary = label_dataset(labeler, open_source(synth_dir / "images"), out, batch_size=4,
                            limit=5, progress=True, workers=1)
    assert summary.labeled == 5
    # 5 images in batches of 4 and 1: every image ticks once, before its batch is logged
    assert bar.updates == [(1, 0)] * 4 + [(1, 4 * 3)]


def test_label_reports_each_image_once_as_its_last_stage_ends(tiny_model):
    # the real model reports an image when its last answer is decoded, inside generate_multi;
    # an image with a second stage (pose) only after that stage; a failed image once as well
    calls, inside = [], []
    real = tiny_model.generate_multi

    def spy(images, questions, on_image=None, **kwargs):
        calls.append(len(images))
        inside.append(True)
        try:
            return real(images, questions, on_image=on_image, **kwargs)
        finally:
            inside.pop()

    tiny_model.generate_multi = spy
    try:
        labeler = Labeler(tiny_model, ["detection", "pose", "caption"], max_gen_len=4)
        items = [ImageItem(i, None, f"{i}.png", i + 1) for i in range(3)]
        tasks = [["caption"], ["detection", "pose"], ["caption", "detection"]]
        batch = [Work(it, tiny_model.preprocess(_image(i)), f"h{i}",
                      labeler.keys(f"h{i}", it), t, size=(64, 48))
                 for i, (it, t) in enumerate(zip(items, tasks))]
        seen = []
        records = labeler.label(
            batch, lambda w: seen.append((w.item.file_name, len(calls), bool(inside))))
        # 0 and 2 during the first stage's call, 1 (pose) during the second stage's
        assert calls == [3, 1]
        assert sorted(seen) == [("0.png", 1, True), ("1.png", 2, True), ("2.png", 1, True)]
        assert seen[-1][0] == "1.png"
        assert records == Labeler(SequentialModel(tiny_model), ["detection", "pose", "caption"],
                                  max_gen_len=4).label(batch)
        bad = ImageItem(3, None, "3.png", 4)  # a tensor of the wrong size: generation fails
        work = Work(bad, torch.zeros(3, 8, 8), "h3", labeler.keys("h3", bad), ["caption"],
                    size=(64, 48))
        seen.clear()
        (record,) = labeler.label([work], seen.append)
        assert record["kind"] == "failure" and seen == [work]
    finally:
        del tiny_model.generate_multi


def _image(i):
    from PIL import Image

    return Image.new("RGB", (64, 48), (40 * i, 90, 200 - 40 * i))
