"""The Colab notebooks (issue 19): each runs top to bottom on CPU in a
fresh kernel (nbclient), and none is committed with outputs."""

import pathlib
import time

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Per-cell timeout: a guard against a hung kernel, not a benchmark (each
# notebook ran in about 1-2 minutes on 2 CPU cores).
CELL_TIMEOUT_S = 600


def test_the_four_notebooks_exist():
  assert {p.stem for p in NOTEBOOKS} == {
      "quickstart", "train_drafter", "pararnn", "sharded_decoding"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
          f"{path.name} cell {i} has outputs: clear them before committing")


# Notebooks that decode SmolLM2 (`realmodel`: compiled with full
# optimisation, tests/conftest.py); the others run tiny models.
REAL_MODEL_NOTEBOOKS = ("quickstart", "sharded_decoding")


@pytest.mark.slow
@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.realmodel)
    if p.stem in REAL_MODEL_NOTEBOOKS else p for p in NOTEBOOKS],
                         ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(path, as_version=4)
  t0 = time.perf_counter()
  NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                 resources={"metadata": {"path": str(ROOT)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  print(f"{path.stem}: {time.perf_counter() - t0:.0f} s")
