"""docs/quickstart.ipynb runs from top to bottom without a cell error."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs the test extra")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs the test extra")

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_runs():
  notebook = nbformat.read(ROOT / "docs" / "quickstart.ipynb", as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                   resources={"metadata": {"path": str(ROOT)}})
  client.execute()  # raises CellExecutionError, naming the cell, on any error
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot, inline
  assert any("locally_constant" in o.get("data", {}).get("text/markdown", "") for o in outputs)
