"""docs/quickstart.ipynb runs from top to bottom, its cells executed in order in this process
(as a kernel would, with IPython's display collecting what they show)."""

import json

import pytest

from helpers import ROOT

IPython = pytest.importorskip("IPython", reason="the notebook test needs the test extra")


def test_quickstart_notebook_cells_compile_and_name_the_sound_kind():
  # The quick half of the notebook's check: every code cell is valid Python, and the notebook
  # headlines the sound certificate (the slow tier runs it).
  notebook = json.loads((ROOT / "docs" / "quickstart.ipynb").read_text())
  code = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
  for number, source in enumerate(code):
    compile(source, f"quickstart.ipynb code cell {number}", "exec")
  assert len(code) >= 3 and any("locally_constant" in source for source in code)


@pytest.mark.slow
def test_quickstart_notebook_runs(monkeypatch, tmp_path):
  import IPython.display
  shown = []
  monkeypatch.setattr(IPython.display, "display", lambda *objects: shown.extend(objects))
  monkeypatch.chdir(ROOT)
  notebook = json.loads((ROOT / "docs" / "quickstart.ipynb").read_text())
  namespace = {}
  for number, cell in enumerate(notebook["cells"]):
    if cell["cell_type"] == "code":
      exec(compile("".join(cell["source"]), f"quickstart.ipynb cell {number}", "exec"), namespace)
  plots = [o for o in shown if isinstance(o, IPython.display.Image)]
  tables = [o.data for o in shown if isinstance(o, IPython.display.Markdown)]
  assert plots and len(plots[0].data) > 1000  # the plot, as a PNG
  assert any("| locally_constant |" in t and "| fixed_sigma |" in t for t in tables)
