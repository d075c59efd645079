import sys
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers (tiny_sam)

# Tests run in parallel workers on small machines: one math thread each avoids OpenMP
# oversubscription (which makes small matmuls ~50x slower).
torch.set_num_threads(1)
GOLDEN = DATA / "golden" / "sphinx-1k-tiny"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def golden_io() -> dict:
    return torch.load(GOLDEN / "golden_io.pt", weights_only=True)


@pytest.fixture(scope="session")
def golden_model():
    from sphinx_tools import SphinxModel

    return SphinxModel.from_pretrained(GOLDEN)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from sphinx_tools import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=1)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    from sphinx_tools import SphinxModel

    return SphinxModel.from_pretrained(tiny_ckpt)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
