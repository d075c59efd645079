"""A real ``sphinx-tools label`` run, SIGKILLed while labeling, while appending to the work log,
while writing the merge's section files and while assembling the final file, each time resumed
by the next run: the last run removes the debris and writes the same COCO file as one
uninterrupted run. The images include duplicates that the kills split across runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from PIL import Image

from sphinx_tools.cli import main
from sphinx_tools.pipelines.autolabel.worklog import log_dir_for

ARGS = ["--tasks", "detection,caption", "--max-gen-len", "6", "--batch-size", "2",
        "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# Runs the CLI in a fresh interpreter, first wrapping one function so that the process SIGKILLs
# itself at a named point: a kill at an exact moment, with no hook in the code under test.
DRIVER = r'''
import os, signal, sys
from sphinx_tools.pipelines.autolabel import coco, worklog

point, argv = sys.argv[1], sys.argv[2:]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

if point == "append":  # half of a batch's lines reach the disk
    def append(self, records):
        f = self._open()
        text = "".join(worklog.json_text(r) + "\n" for r in records)
        f.write(text[: len(text) // 2])
        f.flush()
        os.fsync(f.fileno())
        die()
    worklog.WorkLog.append = append
elif point == "sections":  # the merge's section files are half written
    add, count = coco._ArrayFile.add, [0]
    def counted(self, item):
        count[0] += 1
        if count[0] == 8:
            self.f.flush()
            die()
        add(self, item)
    coco._ArrayFile.add = counted
elif point == "assemble":  # the final temp file is half written
    copy, count = coco.shutil.copyfileobj, [0]
    def copied(source, target, *args):
        count[0] += 1
        if count[0] == 3:
            target.flush()
            die()
        copy(source, target, *args)
    coco.shutil.copyfileobj = copied

from sphinx_tools.cli import main
main(argv, prog_name="sphinx-tools")
'''


def command(src, ckpt, out, point="none"):
    return [sys.executable, "-c", DRIVER, point, "label", str(src), "-c", str(ckpt), "--out",
            str(out), *ARGS]


def content(path) -> dict:
    coco = json.loads(path.read_text())
    del coco["info"]["date_created"]
    return coco


def debris(out) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def log_lines(out) -> int:
    return sum(1 for p in log_dir_for(out).glob("*.jsonl") for _ in p.open("rb"))


@pytest.fixture
def src(synth_dir, tmp_path):
    "Ten images: six scenes, two more, and two copies of the first ones, sorted last."
    folder = tmp_path / "src"
    shutil.copytree(synth_dir / "images", folder)
    for i in range(2):
        Image.new("RGB", (48 + 8 * i, 40), (30 + 90 * i, 160, 90)).save(folder / f"p{i}.png")
    shutil.copy(folder / "000000.png", folder / "q0.png")
    shutil.copy(folder / "000001.png", folder / "q1.png")
    return folder


@pytest.mark.slow
def test_sigkilled_runs_resume_to_the_uninterrupted_file(src, tiny_ckpt, tmp_path):
    reference = tmp_path / "ref" / "labels.json"
    clean = CliRunner().invoke(main, ["label", str(src), "-c", str(tiny_ckpt), "--out",
                                      str(reference), *ARGS])
    assert clean.exit_code == 0, clean.output
    out = tmp_path / "run" / "labels.json"
    out.parent.mkdir()

    # 1. while labeling: killed from outside once the first batch is in the log
    proc = subprocess.Popen(command(src, tiny_ckpt, out), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(p.stat().st_size for p in log_dir_for(out).glob("*.jsonl")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    first = log_lines(out)
    assert 0 < first < 20 and not out.exists()

    # 2. while appending a batch: a torn last line
    # 3. while writing the merge's section files: a temp folder of *.part files
    # 4. while assembling the final file: a half-written .labels.json.tmp-PID
    earlier: list = []
    for point, left in (("append", []), ("sections", ["dir"]), ("assemble", ["dir", "tmp"])):
        proc = subprocess.run(command(src, tiny_ckpt, out, point), env=ENV, capture_output=True,
                              text=True, timeout=180)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-2000:])
        assert not out.exists(), point
        kinds = sorted("tmp" if ".tmp-" in name else "dir" for name in debris(out))
        assert kinds == left, (point, debris(out))
        assert not set(earlier) & set(debris(out))  # each run removed the one before's
        earlier = debris(out)
    assert log_lines(out) > first

    # 5. the next run removes the debris and writes the uninterrupted run's file
    result = CliRunner().invoke(main, ["label", str(src), "-c", str(tiny_ckpt), "--out", str(out),
                                       *ARGS])
    assert result.exit_code == 0, result.output
    assert "0 labeled, 10 already done" in result.output and "not labeled" not in result.output
    assert result.output.count("left by an interrupted merge") == 2
    assert debris(out) == []
    got, want = content(out), content(reference)
    assert got == want
    names = {im["file_name"]: im["id"] for im in got["images"]}
    assert len(names) == 10
    captions = {c["image_id"]: c["caption"] for c in got["captions"]}
    assert captions[names["q0.png"]] == captions[names["000000.png"]]
