"""The first hour on the command line: defaults (the demo model, ``--device auto``), examples in
``--help``, each task's options in ``tasks``, and the README's Python example on shipped files."""

import json
import re
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from sphinx_tools.cli import _device, main

ROOT = Path(__file__).resolve().parents[1]


def _option(command: str, name: str) -> click.Option:
    return next(p for p in main.get_command(None, command).params if p.name == name)


@pytest.mark.parametrize("command", ["label", "ask", "serve"])
def test_main_commands_default_to_auto_device_and_show_examples(command):
    assert _option(command, "device").default == "auto"
    if command != "serve":  # serve's unset checkpoint also means the demo model
        assert _option(command, "checkpoint").default == "demo"
    text = CliRunner().invoke(main, [command, "--help"]).output
    assert "Examples:" in text and f"sphinx-tools {command} " in text


def test_export_help_shows_examples_and_filters_off_by_default():
    text = CliRunner().invoke(main, ["export", "--help"]).output
    assert "Examples:" in text
    for flag in ("--min-score", "--nms", "--split", "--image-url-prefix", "--tasks"):
        assert flag in text
    assert "[default: off]" in " ".join(text.split())


def test_auto_device_is_cuda_only_when_present(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device("auto") == "cpu" and _device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _device("auto") == "cuda"


def test_tasks_lists_each_task_options_with_types_and_defaults():
    text = CliRunner().invoke(main, ["tasks"]).output
    detection = text.split("\ndetection  ")[1].split("\ngrounded_caption  ")[0]
    assert re.search(r"classes: list\[str\] \| None \(default null\)", detection)
    assert "every task also takes:" in text and "max_objects: int (default 100)" in text
    rows = json.loads(CliRunner().invoke(main, ["tasks", "--json"]).output)
    vqa = next(r for r in rows if r["name"] == "vqa")
    question = next(o for o in vqa["options"] if o["name"] == "question")
    assert question == {"name": "question", "type": "str | None", "default": None,
                        "required": False, "help": "the question.", "common": False}
    assert all({o["name"] for o in r["options"]} >= {"template", "variant"} for r in rows)


def test_ask_runs_the_demo_model_without_a_checkpoint():
    result = CliRunner().invoke(main, ["ask", "-i", str(ROOT / "examples/images/000003.png"),
                                       "What is in the image?", "--max-gen-len", "12",
                                       "--no-stream", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.strip()


def test_readme_python_example_runs_on_shipped_files(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    code = readme.split("## Ten lines of Python", 1)[1].split("```python\n", 1)[1].split("```")[0]
    paths = re.findall(r'"(examples/[^"]+)"', code)
    assert paths and all((ROOT / p).exists() for p in paths)  # only shipped files
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert len(scope["labels"].dataset) == 20 and (tmp_path / "people.png").is_file()
