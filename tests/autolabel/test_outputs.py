"""``sphinx-tools label``'s outputs under stress: undecodable file names, a full disk, debris of
killed merges, a second job on the same output, unwritable folders, exit status and exports."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from pycocotools.coco import COCO

from sphinx_tools.cli import main
from sphinx_tools.pipelines.autolabel import cli as label_cli
from sphinx_tools.pipelines.autolabel import coco as coco_module
from sphinx_tools.pipelines.autolabel import export as export_module
from sphinx_tools.pipelines.autolabel import worklog as worklog_module
from sphinx_tools.pipelines.autolabel.worklog import WorkLog, lock_path_for, log_dir_for

ARGS = ["--tasks", "detection,caption", "--max-gen-len", "4", "--batch-size", "2",
        "--no-progress"]
ODD = b"\xff\xfe.png"  # not valid UTF-8


def label(src, ckpt, out, *extra):
    return CliRunner().invoke(main, ["label", str(src), "-c", str(ckpt), "--out", str(out),
                                     *ARGS, *extra])


def images(folder, n=3):
    "``n`` small distinct PNGs in ``folder``."
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (32 + 4 * i, 24), (60 * i, 100, 200 - 40 * i)).save(folder / f"{i}.png")
    return folder


def leftovers(out) -> list[str]:
    "Temp files and folders of a merge beside ``out``."
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def no_traceback(result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output


@pytest.fixture
def no_model(monkeypatch):
    "Fail the test if the model is loaded."
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(label_cli, "_load_model", refuse)


# -- file names that are not UTF-8 ----------------------------------------------------------------
def test_worklog_round_trips_a_surrogate_file_name(tmp_path):
    name = os.fsdecode(ODD)
    with WorkLog(tmp_path) as log:
        log.append([{"key": "k", "kind": "result", "file_name": name, "caption": "café"},
                    {"key": "m", "kind": "result", "file_name": "é.png"}])
    lines = (tmp_path / "rank-00000.jsonl").read_bytes().decode("utf-8").splitlines()
    assert '"\\udcff\\udcfe.png"' in lines[0] and '"é.png"' in lines[1]  # plain UTF-8 kept
    records = list(WorkLog(tmp_path).records())
    assert [r["file_name"] for r in records] == [name, "é.png"]
    assert os.fsencode(records[0]["file_name"]) == ODD and records[0]["caption"] == "café"


def test_an_undecodable_file_name_is_labeled_and_round_trips(tiny_ckpt, tmp_path):
    src = images(tmp_path / "src", 2)
    Image.new("RGB", (40, 30), (9, 9, 9)).save(os.path.join(os.fsencode(src), ODD), "PNG")
    with open(os.path.join(os.fsencode(src), b"\xff.png"), "wb") as f:
        f.write(b"not an image")
    out = tmp_path / "out" / "labels.json"
    result = label(src, tiny_ckpt, out, "--allow-failures")
    assert result.exit_code == 0, result.output
    no_traceback(result)
    assert "failed: \\xff.png:" in result.output  # shown escaped, not as mojibake
    out.read_bytes().decode("utf-8")  # valid UTF-8 JSON
    coco = COCO(str(out)).dataset
    names = [os.fsencode(im["file_name"]) for im in coco["images"]]
    assert names == [b"0.png", b"1.png", ODD]
    assert [os.fsencode(f["file_name"]) for f in coco["failures"]] == [b"\xff.png"]
    assert len(coco["captions"]) == 3
    again = label(src, tiny_ckpt, out, "--allow-failures")  # resumes: nothing to redo
    assert again.exit_code == 0 and "0 labeled, 3 already done" in again.output


# -- a full disk, debris ---------------------------------------------------------------------------
def test_full_disk_in_the_final_write_keeps_the_previous_file(tiny_ckpt, tmp_path, monkeypatch):
    src, out = images(tmp_path / "src"), tmp_path / "labels.json"
    assert label(src, tiny_ckpt, out).exit_code == 0
    before = out.read_bytes()
    real = coco_module.shutil.copyfileobj

    def full(source, target, *args):
        target.write(source.read(10))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(coco_module.shutil, "copyfileobj", full)
    result = label(src, tiny_ckpt, out)
    monkeypatch.setattr(coco_module.shutil, "copyfileobj", real)
    assert result.exit_code == 1
    no_traceback(result)
    assert "the disk is full" in result.output and "unchanged" in result.output
    assert out.read_bytes() == before and leftovers(out) == []


def test_full_disk_in_a_section_file_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    src, out = images(tmp_path / "src"), tmp_path / "labels.json"

    def full(self, item):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(coco_module._ArrayFile, "add", full)
    result = label(src, tiny_ckpt, out)
    assert result.exit_code == 1 and "the disk is full" in result.output
    no_traceback(result)
    assert not out.exists() and leftovers(out) == []


def test_full_disk_in_the_work_log_is_one_message_and_no_torn_line(tiny_ckpt, tmp_path,
                                                                     monkeypatch):
    src, out = images(tmp_path / "src"), tmp_path / "labels.json"
    assert label(src, tiny_ckpt, out, "--limit", "2").exit_code == 0
    log = log_dir_for(out) / "rank-00000.jsonl"
    before = log.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(worklog_module.os, "fsync", full)
    result = label(src, tiny_ckpt, out)
    assert result.exit_code == 1, result.output
    no_traceback(result)
    assert "cannot write the work log" in result.output and "the disk is full" in result.output
    assert log.read_bytes() == before  # the failed batch left no part of itself


def test_debris_of_killed_merges_is_removed_and_nothing_else(tiny_ckpt, tmp_path):
    src, out = images(tmp_path / "src", 2), tmp_path / "labels.json"
    parts = tmp_path / ".labels.json.k2x_9abc"
    parts.mkdir()
    (parts / "images.part").write_text("[{")
    (tmp_path / ".labels.json.tmp-4242").write_text('{"info": ')
    keep = [".labels.json.notes", ".other.json.tmp-1", ".labels.json.tmp-12x"]
    for name in keep:
        (tmp_path / name).write_text("x")
    mine = tmp_path / ".labels.json.mine0000"  # holds a file that no merge writes
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    result = label(src, tiny_ckpt, out)
    assert result.exit_code == 0, result.output
    assert "removed .labels.json.tmp-4242" in result.output
    assert not parts.exists() and not (tmp_path / ".labels.json.tmp-4242").exists()
    assert all((tmp_path / name).exists() for name in keep) and (mine / "notes.txt").exists()


# -- one job per output, folders checked first -----------------------------------------------------
def test_a_second_job_on_the_same_output_is_refused(tiny_ckpt, tmp_path, no_model):
    src, out = images(tmp_path / "src", 2), tmp_path / "labels.json"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, b'%d\\n' % os.getpid())\n"
         "print('locked', flush=True)\n"
         "time.sleep(120)\n", str(lock_path_for(out))],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = label(src, tiny_ckpt, out)
        assert result.exit_code == 1
        no_traceback(result)
        assert f"another `label` job (pid {holder.pid}) is writing" in result.output
        assert not any(log_dir_for(out).glob("*.jsonl")) and not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_released_and_taken_again(tmp_path):
    from sphinx_tools.pipelines.autolabel.worklog import OutputBusy, OutputLock

    out = tmp_path / "labels.json"
    with OutputLock(out):
        assert lock_path_for(out).read_text().strip() == str(os.getpid())
        with pytest.raises(OutputBusy, match=f"pid {os.getpid()}"):
            OutputLock(out).acquire()
    with OutputLock(out):
        pass


def test_an_unwritable_output_folder_fails_before_the_model_loads(tiny_ckpt, tmp_path,
                                                                  no_model):
    src = images(tmp_path / "src", 1)
    (tmp_path / "file").write_text("not a folder")
    result = label(src, tiny_ckpt, tmp_path / "file" / "labels.json")
    assert result.exit_code == 1
    no_traceback(result)
    assert "cannot write the output folder" in result.output and "file" in result.output


def test_a_read_only_work_log_fails_before_the_model_loads(tiny_ckpt, tmp_path, no_model,
                                                           monkeypatch):
    src, out = images(tmp_path / "src", 1), tmp_path / "labels.json"
    log = log_dir_for(out)
    log.mkdir()
    (log / "rank-00000.jsonl").write_text("")
    real = os.access
    monkeypatch.setattr(worklog_module.os, "access",
                        lambda path, mode: False if str(path).endswith(".jsonl") else
                        real(path, mode))  # root may write anywhere: pretend it may not
    result = label(src, tiny_ckpt, out)
    assert result.exit_code == 1
    no_traceback(result)
    assert "rank-00000.jsonl" in result.output and "Permission denied" in result.output


# -- exit status, exports, outside the root --------------------------------------------------------
def test_any_failed_image_makes_the_exit_status_1_unless_allowed(tiny_ckpt, tmp_path):
    src, out = images(tmp_path / "src", 2), tmp_path / "labels.json"
    (src / "bad.png").write_bytes(b"junk")
    result = label(src, tiny_ckpt, out)
    assert result.exit_code == 1 and "1 image(s) failed" in result.output
    assert "--allow-failures" in result.output
    again = label(src, tiny_ckpt, out)  # the recorded failure still counts
    assert again.exit_code == 1 and "1 failures" in again.output
    allowed = label(src, tiny_ckpt, out, "--allow-failures")
    assert allowed.exit_code == 0, allowed.output
    assert len(json.loads(out.read_text())["images"]) == 2


def test_help_documents_the_exit_status_and_flags():
    text = CliRunner().invoke(main, ["label", "--help"]).output
    assert "Exit status" in text and "--allow-failures" in text and "--allow-outside-root" in text
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "--allow-failures" in readme and "--allow-outside-root" in readme


def test_a_failing_export_does_not_stop_the_others(tiny_ckpt, tmp_path, monkeypatch):
    src, out = images(tmp_path / "src", 2), tmp_path / "e.json"

    real = export_module.export

    def yolo_breaks(coco_path, fmt, *args, **kwargs):
        if fmt == "yolo":
            raise ValueError("No foreground-contained seam found")
        return real(coco_path, fmt, *args, **kwargs)

    monkeypatch.setattr(export_module, "export", yolo_breaks)
    result = label(src, tiny_ckpt, out, "--format", "yolo", "--format", "voc", "--format",
                   "label-studio")
    assert result.exit_code == 1
    no_traceback(result)
    assert "export yolo failed: ValueError: No foreground-contained seam found" in result.output
    assert (tmp_path / "e_voc").is_dir() and (tmp_path / "e.label-studio.json").is_file()
    assert "exit status 1: export failed: yolo" in result.output


def test_outside_root_file_names_need_the_flag(tiny_ckpt, tmp_path):
    images(tmp_path, 1)
    root = tmp_path / "data"
    root.mkdir()
    coco = {"images": [{"id": 1, "file_name": "../0.png", "width": 32, "height": 24}],
            "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    (root / "gt.json").write_text(json.dumps(coco))
    refused = label(root / "gt.json", tiny_ckpt, tmp_path / "o.json")
    assert refused.exit_code != 0 and "--allow-outside-root" in refused.output
    no_traceback(refused)
    result = label(root / "gt.json", tiny_ckpt, tmp_path / "o.json", "--allow-outside-root")
    assert result.exit_code == 0, result.output
    assert [im["file_name"] for im in json.loads((tmp_path / "o.json").read_text())["images"]] \
        == ["../0.png"]
