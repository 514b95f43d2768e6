"""Clears the outputs of notebooks before they are committed.

  python notebooks/clear_outputs.py notebooks/*.ipynb
"""

import sys

import nbformat


def clear(path: str) -> None:
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  nbformat.write(nb, path)


if __name__ == "__main__":
  for p in sys.argv[1:]:
    clear(p)
