"""The notebooks run top to bottom, as a user runs them (nbclient + ipykernel), and are stored
without outputs.

Each runs on a tiny random-weight checkpoint passed through ``SPHINX_TOOLS_CHECKPOINT`` (the
"real checkpoint by path" route of the notebooks), so CI needs no weights; a failing cell fails
the test with the cell's traceback.
"""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 240  # per cell; generous: a whole notebook takes seconds to a minute


@pytest.fixture(scope="session")
def shared_tiny_ckpt(tmp_path_factory) -> Path:
    "One tiny checkpoint for every test worker of this run (built once, renamed atomically)."
    from sphinx_tools.pipelines.webapp import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.getbasetemp().parent)


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:3] == [
        "01_tasks.ipynb", "02_sam_and_diffusion.ipynb", "03_autolabel_coco.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name}: strip outputs before committing (jupyter nbconvert "
                "--clear-output --inplace notebooks/*.ipynb)"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, shared_tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("SPHINX_TOOLS_CHECKPOINT", str(shared_tiny_ckpt))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # tests run 2 workers on small machines
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working folder
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.get("output_type") == "error"]
    assert not errors
