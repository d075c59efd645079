"""Fixtures for the auto-labeling tests: a scripted multi-question model, synthetic data, SAM."""

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tiny_sam import tiny_sam
import torch

os.environ["SPHINX_TOOLS_LOAD_PLUGINS"] = "none"

# Scripted answers, chosen by a phrase of the task's prompt.
ANSWERS = {
    "layout": "<p>title</p> [0.10,0.05,0.90,0.15]",
    "Detect all": "<p>person</p> [0.10,0.10,0.40,0.90] <p>2 dogs</p> [0.50,0.50,0.70,0.70;"
                  "0.75,0.50,0.95,0.70]",
    "key points": "<p>nose</p> [0.25,0.30] <p>left eye</p> [0.27,0.29] <p>right eye</p> "
                  "[0.23,0.29] <p>left hip</p> [0.30,0.60]",
    "texts": "<p>HELLO</p> [0.05,0.05,0.30,0.12]",
    "one-sentence caption": "A person with two dogs.",
    "short description": "a brown dog",
    "relationships": "<p>person</p> [0.10,0.10,0.40,0.90] next to <p>dog</p> "
                     "[0.50,0.50,0.70,0.70]",
    "sentence describes": "[0.10,0.10,0.40,0.90]",
    "Describe the image concisely": "<p>A person</p> [0.10,0.10,0.40,0.90] walks.",
}


@dataclass
class Gen:
    "Stands in for the runtime's Generation."

    text: str
    token_ids: list = field(default_factory=list)
    logprobs: list | None = None
    offsets: list | None = None
    finish_reason: str = "stop"


def answer_for(prompt: str) -> str:
    for phrase, text in ANSWERS.items():
        if phrase in prompt:
            return text
    return "yes"


class ScriptedModel:
    """A model whose ``generate_multi`` answers by prompt phrase (see ``ANSWERS``).

    Every call is recorded in ``calls`` as ``(n_images, questions)``; ``fail_when(images)`` may
    raise to simulate a batch that does not fit.
    """

    def __init__(self, fail_when=None):
        self.calls = []
        self.budgets = []  # per call, its max_gen_len
        self.fail_when = fail_when

    def generate_multi(self, images, questions, **sampling):
        self.calls.append((len(images), [list(q) for q in questions]))
        self.budgets.append(sampling.get("max_gen_len"))
        if self.fail_when is not None and self.fail_when(images):
            raise RuntimeError("scripted failure")
        out = []
        for qs in questions:
            row = []
            for q in qs:
                text = answer_for(q)
                row.append(Gen(text, list(range(len(text))), [-0.1] * len(text),
                               list(range(len(text)))))
            out.append(row)
        return out


@pytest.fixture
def scripted():
    return ScriptedModel()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    "Six synthetic scenes (shapes, words, pose, document) with COCO and REC ground truth."
    from sphinx_tools.demo.synth import write_dataset

    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, 6, seed=3, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from sphinx_tools import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=1)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    from sphinx_tools import SphinxModel

    return SphinxModel.from_pretrained(tiny_ckpt)


@pytest.fixture
def box_sam():
    "A real ``SamPredictor`` on the tiny SAM whose best mask is exactly its prompt box."
    from segment_anything import SamPredictor

    class BoxSam(SamPredictor):
        def predict_torch(self, point_coords, point_labels, boxes=None, multimask_output=True,
                          **kw):
            _, _, low = super().predict_torch(point_coords, point_labels, boxes=boxes,
                                              multimask_output=multimask_output, **kw)
            h, w = self.original_size
            new_h, new_w = self.transform.get_preprocess_shape(h, w, self.transform.target_length)
            scale = torch.tensor([new_w / w, new_h / h] * 2)
            rect = torch.zeros(len(boxes), h, w, dtype=torch.bool)
            for i, (x1, y1, x2, y2) in enumerate((boxes / scale).round().long().tolist()):
                rect[i, y1:y2, x1:x2] = True
            c = 3 if multimask_output else 1
            return rect[:, None].repeat(1, c, 1, 1), torch.full((len(boxes), c), 0.9), low

    return BoxSam(tiny_sam())
