"""``sphinx-tools label`` on the tiny checkpoint: dry run, exports, exit codes, a killed run,
and data / model parallel runs over gloo that give the same file as one process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from sphinx_tools.cli import main
from sphinx_tools.pipelines.autolabel.worklog import log_dir_for

ARGS = ["--tasks", "detection,ocr,caption", "--max-gen-len", "6", "--batch-size", "2",
        "--no-progress"]


def label(src, ckpt, out, *extra):
    return CliRunner().invoke(main, ["label", str(src), "-c", str(ckpt), "--out", str(out),
                                     *ARGS, *extra])


def content(path) -> dict:
    coco = json.loads(path.read_text())
    return {k: coco[k] for k in ("images", "annotations", "captions", "categories", "failures")}


@pytest.fixture(scope="module")
def reference(synth_dir, tiny_ckpt, tmp_path_factory):
    "One uninterrupted single-process run."
    out = tmp_path_factory.mktemp("ref") / "labels.json"
    result = label(synth_dir / "images", tiny_ckpt, out)
    assert result.exit_code == 0, result.output
    return out


def test_label_writes_coco_and_a_rerun_is_a_noop(reference, synth_dir, tiny_ckpt):
    coco = json.loads(reference.read_text())
    assert len(coco["images"]) == 6 and len(coco["captions"]) == 6
    assert coco["info"]["model"].startswith("ckpt:")
    again = label(synth_dir / "images", tiny_ckpt, reference)
    assert again.exit_code == 0 and "0 labeled, 6 already done" in again.output
    dry = label(synth_dir / "images", tiny_ckpt, reference, "--dry-run")
    assert "caption: 0 to do, 6 done" in dry.output and "nothing to do" in dry.output


def test_dry_run_lists_work_without_writing(synth_dir, tiny_ckpt, tmp_path):
    out = tmp_path / "x.json"
    result = label(synth_dir / "images", tiny_ckpt, out, "--dry-run", "--limit", "3")
    assert result.exit_code == 0, result.output
    assert "3 images" in result.output and "detection: 3 to do" in result.output
    assert "000000.png: detection, ocr, caption" in result.output
    assert not out.exists() and not log_dir_for(out).exists()


def test_exports(reference, synth_dir, tiny_ckpt, tmp_path):
    out = tmp_path / "e.json"
    result = label(synth_dir / "images", tiny_ckpt, out, "--format", "yolo,voc",
                   "--format", "label-studio", "--limit", "2")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "e_yolo" / "data.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "e_yolo" / "images" / "train").iterdir()) == \
        ["000000.png", "000001.png"]  # the labeled images, linked
    assert (tmp_path / "e_voc").is_dir()
    tasks = json.loads((tmp_path / "e.label-studio.json").read_text())
    root = str((synth_dir / "images").resolve()).lstrip("/")
    assert [t["data"]["image"] for t in tasks] == [
        f"/data/local-files/?d={root}/{name}" for name in ("000000.png", "000001.png")]
    assert (tmp_path / "e.label-studio.xml").is_file()
    bad = label(synth_dir / "images", tiny_ckpt, out, "--format", "yolo,csv")
    assert bad.exit_code == 2 and "unknown format 'csv'" in bad.output


def test_nothing_succeeded_exits_non_zero(tiny_ckpt, tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "a.png").write_bytes(b"")
    (src / "b.jpg").write_bytes(b"junk")
    result = label(src, tiny_ckpt, tmp_path / "bad.json")
    assert result.exit_code == 1
    assert "2 failures" in result.output and "failed: a.png: empty file" in result.output


def test_bad_option_names_the_value(synth_dir, tiny_ckpt, tmp_path):
    result = label(synth_dir / "images", tiny_ckpt, tmp_path / "o.json", "--option", "caption")
    assert result.exit_code != 0 and "TASK.KEY=VALUE" in result.output
    result = label(synth_dir / "images", tiny_ckpt, tmp_path / "o.json", "--option",
                   "vqa.question=hi")
    assert result.exit_code != 0 and "'vqa'" in result.output


def test_the_checkpoint_s_trained_wording_is_asked_unless_an_option_overrides_it(
        synth_dir, tiny_ckpt, tmp_path, monkeypatch):
    import shutil

    from sphinx_tools.pipelines.autolabel import cli as label_cli

    from .conftest import ScriptedModel

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    (ckpt / "task_options.json").write_text('{"layout": {"variant": "classes"}, "vqa": {}}')
    models = []
    monkeypatch.setattr(label_cli, "_load_model", lambda *a, **k: models.append(ScriptedModel())
                        or models[-1])

    def asked(*extra):
        out = tmp_path / f"{len(models)}.json"
        res = CliRunner().invoke(main, ["label", str(synth_dir / "images"), "-c", str(ckpt), "--out",
                                        str(out), "--tasks", "layout", "--limit", "1",
                                        "--no-progress", *extra])
        assert res.exit_code == 0, res.output  # trained options of tasks not run are no error
        return {q for _, rows in models[-1].calls for qs in rows for q in qs}

    (classes,) = asked()
    assert "Detect all layout regions (text, title, list, table or figure)" in classes
    (default,) = asked("--option", "layout.variant=default")
    assert "Detect the layout of the document in the image." in default
    (ckpt / "task_options.json").write_text('{"layout": {"bogus": 1}}')
    res = CliRunner().invoke(main, ["label", str(synth_dir / "images"), "-c", str(ckpt), "--out",
                                    str(tmp_path / "x.json"), "--tasks", "layout", "--no-progress"])
    assert res.exit_code != 0 and "bogus" in res.output and len(models) == 2  # before loading


def command(src, ckpt, out, *extra):
    return [sys.executable, "-m", "sphinx_tools.cli", "label", str(src), "-c", str(ckpt),
            "--out", str(out), *ARGS, *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_killed_run_resumes_to_the_same_file(reference, synth_dir, tiny_ckpt, tmp_path):
    out = tmp_path / "k.json"
    proc = subprocess.Popen(command(synth_dir / "images", tiny_ckpt, out, "--batch-size", "1"),
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    logs = log_dir_for(out)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(p.stat().st_size for p in logs.glob("*.jsonl")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    done = sum(1 for p in logs.glob("*.jsonl") for _ in p.open())
    assert 0 < done < 18
    result = label(synth_dir / "images", tiny_ckpt, out, "--batch-size", "1")
    assert result.exit_code == 0, result.output
    assert content(out) == content(reference)


@pytest.mark.parametrize("extra", [[], ["--model-parallel", "2"]], ids=["dp2", "mp2"])
def test_two_processes_give_the_same_file(reference, synth_dir, tiny_ckpt, tmp_path, extra):
    out = tmp_path / "d.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *command(synth_dir / "images", tiny_ckpt, out, *extra)[1:]]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert content(out) == content(reference)
    logs = sorted(log_dir_for(out).glob("*.jsonl"))
    assert len(logs) == (1 if extra else 2)  # one log per data-parallel rank
    assert json.loads(out.read_text())["info"]["data_parallel"] == (1 if extra else 2)


def test_readme_main_job_labels_examples_with_the_embedded_demo_model(tmp_path):
    from pathlib import Path

    examples = Path(__file__).parents[2] / "examples"
    out = tmp_path / "labels.json"
    res = CliRunner().invoke(main, ["label", str(examples / "images"), "--tasks", "detection,pose",
                                    "--out", str(out), "--limit", "3", "--max-gen-len", "96",
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    coco = json.loads(out.read_text())
    assert len(coco["images"]) == 3 and coco["info"]
    assert any(c["name"] == "person" and len(c["keypoints"]) == 17 for c in coco["categories"])
    res = CliRunner().invoke(main, ["evaluate", str(out), str(examples / "coco.json")])
    assert res.exit_code == 0, res.output
