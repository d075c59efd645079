"""``label_folder``: the ``label`` job in one call, returning an ``sv.DetectionDataset``."""

import json

import supervision as sv
from click.testing import CliRunner

from sphinx_tools.cli import main
from sphinx_tools.pipelines.autolabel import label_folder

from .conftest import ScriptedModel


def test_label_folder_returns_a_dataset_and_resumes(synth_dir, tmp_path):
    out = tmp_path / "labels.json"
    model = ScriptedModel()
    result = label_folder(model, synth_dir / "images", tasks=["detection", "ocr"], out=out,
                          progress=False)
    assert isinstance(result.dataset, sv.DetectionDataset) and result.coco_path == out
    coco = json.loads(out.read_text())
    assert len(result.dataset) == len(coco["images"]) == 6 and not result.failed
    assert sum(len(d) for _, _, d in result.dataset) == len(coco["annotations"])
    assert set(result.dataset.classes) == {"person", "dog", "text"}  # OCR boxes are "text"
    again = label_folder(ScriptedModel(), synth_dir / "images", tasks=["detection", "ocr"],
                         out=out, progress=False)
    assert again.summary.skipped == 6 and again.summary.labeled == 0  # resumed from the log
    only = label_folder(model, synth_dir / "images", tasks=["detection", "ocr"],
                        out=tmp_path / "f.json", progress=False, nms=0.5, min_score=0.0)
    assert only.merged.dropped == {"task": 0, "min_score": 0, "nms": 0}


def test_label_folder_shares_its_work_log_with_the_command(synth_dir, tiny_ckpt, tmp_path):
    out = tmp_path / "labels.json"
    result = label_folder(str(tiny_ckpt), synth_dir / "images", tasks=["detection"], out=out,
                          device="cpu", max_gen_len=6, limit=2, progress=False)
    assert result.summary.labeled == 2
    cli = CliRunner().invoke(main, ["label", str(synth_dir / "images"), "-c", str(tiny_ckpt),
                                    "--out", str(out), "--tasks", "detection", "--max-gen-len",
                                    "6", "--limit", "2", "--no-progress", "--device", "cpu"])
    assert cli.exit_code == 0, cli.output
    assert "0 labeled, 2 already done" in cli.output
