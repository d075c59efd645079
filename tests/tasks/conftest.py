"""Fixtures for the task/plugin tests: no third-party plugins, no user config, a scripted model."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Set before sphinx_tools.registry loads anything: tests never see installed third-party plugins.
os.environ["SPHINX_TOOLS_LOAD_PLUGINS"] = "none"

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path, monkeypatch):
    "No user prompt config leaks in; tests that want one write it to this path."
    monkeypatch.setenv("SPHINX_TOOLS_CONFIG", str(tmp_path / "prompts.yaml"))
    monkeypatch.setenv("SPHINX_TOOLS_LOAD_PLUGINS", "none")


@dataclass
class FakeGeneration:
    "Stands in for the runtime's Generation: text, token ids, logprobs, offsets, finish reason."

    text: str
    token_ids: list = field(default_factory=list)
    logprobs: list | None = None
    offsets: list | None = None
    finish_reason: str = "stop"


class FakeModel:
    """A scripted model (like llm's ``MockModel``): ``enqueue`` answers, ``generate`` pops them.

    Every call is recorded in ``calls`` as ``(prompts, images, kwargs)``.
    """

    def __init__(self):
        self.queue = []
        self.calls = []

    def enqueue(self, text, logprobs=None, offsets=None):
        self.queue.append(FakeGeneration(text, list(range(len(logprobs or []))), logprobs, offsets))
        return self

    def generate(self, prompts, images, **kwargs):
        assert len(prompts) == len(images)
        self.calls.append((list(prompts), list(images), kwargs))
        assert len(self.queue) >= len(prompts), "FakeModel: not enough enqueued answers"
        out, self.queue = self.queue[: len(prompts)], self.queue[len(prompts) :]
        return out


@pytest.fixture
def fake_model():
    return FakeModel()


@pytest.fixture(scope="session")
def real_outputs():
    "The real SPHINX outputs transcribed from the official repository (tests/data)."
    with open(DATA / "sphinx_real_outputs.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def register_plugin():
    "Register throwaway plugins with the real plugin manager; unregistered after the test."
    from sphinx_tools.registry import load_plugins, pm

    load_plugins()
    names = []

    def register(plugin, name):
        pm.register(plugin, name=name)
        names.append(name)
        return plugin

    yield register
    for name in names:
        if pm.get_plugin(name) is not None:
            pm.unregister(name=name)
