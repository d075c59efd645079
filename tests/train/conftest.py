"Shared data of the finetuning tests: a tiny synthetic conversation set and its tokenizer."

import json
from pathlib import Path

import pytest
import yaml

from sphinx_tools.demo.synth import write_dataset
from sphinx_tools.tiny import train_tokenizer
from sphinx_tools.train import conversation_text


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_dataset(root / "data", 8, seed=3, progress=False, turns=2)
    convs = json.loads((root / "data" / "conversations.json").read_text())
    corpus = [conversation_text(c["conversations"])[0] for c in convs]
    train_tokenizer(root / "tok.model", 512, corpus=corpus)
    return root


def write_config(root: Path, out: str, **kw) -> Path:
    cfg = dict(init={"preset": "tiny", "tokenizer": "tok.model", "seed": 0},
               data=[{"path": "data/conversations.json", "root": "data"}], out=out,
               train=["llm", "proj", "tokens", "encoders"], steps=4, batch_size=2, lr=3e-3,
               warmup=1, save_every=2, log_every=1, seed=0)
    cfg.update(kw)
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def coco_file(tmp_path, images, boxes):
    cats = [{"id": 7, "name": "thing"}, {"id": 9, "name": "other"}]
    anns = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b} for k, (i, c, b) in enumerate(boxes)]
    p = tmp_path / "coco.json"
    p.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return p
