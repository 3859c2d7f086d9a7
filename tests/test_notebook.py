"""The Colab demo notebook (notebooks/dakd_demo.ipynb) executed headless, as a user would run it.

nbclient runs every cell in a fresh kernel started from this interpreter, with the repository
root as the working directory and QUICK settings; the generated data, the TFDS files and the
workdir go to a temp folder through the environment variables the notebook's settings cell
reads, so the run leaves nothing in the repository.
"""
import ast
import json
import os
import sys

import nbclient
import nbformat
import pytest

from tests import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "dakd_demo.ipynb")
# Where the notebook would write with its default settings (all inside the repository).
DEFAULT_OUTPUTS = ("workdirs", "data", "notebooks")


def _snapshot(root):
  """{relative path: (size, mtime_ns)} of every file under the given repository folders."""
  files = {}
  for top in DEFAULT_OUTPUTS:
    for folder, dirs, names in os.walk(os.path.join(root, top)):
      dirs[:] = [d for d in dirs if d not in ("__pycache__", ".ipynb_checkpoints")]
      for name in names:
        path = os.path.join(folder, name)
        stat = os.stat(path)
        files[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns)
  return files


def _kernel_spec_dir(tmp_path):
  """A 'python3' kernelspec that starts this interpreter (not whatever `python` is on PATH)."""
  spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          "display_name": "Python 3 (test)", "language": "python"}
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  return str(tmp_path / "jupyter")


def _text_outputs(cell):
  """Everything a code cell printed or displayed as text."""
  parts = []
  for output in cell.get("outputs", []):
    if output["output_type"] == "stream":
      parts.append(output["text"])
    elif "data" in output:
      # Markdown displays carry their text as text/markdown (text/plain is only a repr).
      parts.append(output["data"].get("text/markdown", output["data"].get("text/plain", "")))
  return "".join(parts)


def _tagged(notebook, tag):
  cells = [c for c in notebook.cells if tag in c.get("metadata", {}).get("tags", [])]
  assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
  return cells[0]


def _quick_overrides(notebook):
  """The dict literal the settings cell passes to `overrides.update` under QUICK."""
  for cell in notebook.cells:
    for node in ast.walk(ast.parse(cell.source)) if cell.cell_type == "code" else ():
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "update" and getattr(node.func.value, "id", "") == "overrides"):
        return ast.literal_eval(node.args[0])
  raise AssertionError("no overrides.update({...}) in the notebook")


def test_quick_settings_are_the_test_suites_tiny_run():
  """QUICK trains the tiny run's network on its shapes and schedules (tests/tiny.py), so the
  run below loads the suite's compiled programs instead of compiling its own; the numbers of
  steps and evaluation settings, which no program holds, may differ."""
  quick = _quick_overrides(nbformat.read(NOTEBOOK, as_version=4))
  compiled_in = ("model.depth", "model.width", "model.non_local", "synthetic.num_train_ids",
                 "data.ids_per_batch", "data.images_per_id", "teacher.steps_per_epoch",
                 "pretrain.num_ids", "pretrain.steps_per_epoch")
  tiny_run = {**tiny.TINY, **tiny.PRETRAIN}
  assert {k: quick[k] for k in compiled_in} == {k: tiny_run[k] for k in compiled_in}


@pytest.mark.slow
def test_demo_notebook_runs_top_to_bottom_on_quick_settings(tmp_path, monkeypatch):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # The committed file carries no outputs (they would be stale and bloat the diff).
  assert all(not c.get("outputs") and c.get("execution_count") is None
             for c in notebook.cells if c.cell_type == "code")
  workdir = tmp_path / "work"
  monkeypatch.setenv("DAKD_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("DAKD_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("DAKD_NOTEBOOK_DATA", str(tmp_path / "data"))
  monkeypatch.setenv("JUPYTER_PATH", _kernel_spec_dir(tmp_path))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  before = _snapshot(REPO)

  # Generous start-up and IOPub waits: on a loaded CI machine a late message would be lost.
  client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=600,
                                   startup_timeout=180, iopub_timeout=60,
                                   resources={"metadata": {"path": REPO}})
  client.execute()  # Raises CellExecutionError (with the cell and traceback) on any error.

  errors = [o for c in notebook.cells for o in c.get("outputs", [])
            if o["output_type"] == "error"]
  assert not errors
  with open(workdir / "eval" / "results.json") as f:
    report = json.load(f)
  # The demo config's protocols, each with the QUICK number of gallery trials.
  assert sorted(report["results"]) == sorted(
      f"sysu_mm01/{m}/{s}-shot" for m in ("all", "indoor") for s in ("single", "multi"))
  assert all(len(s["trials"]) == 2 for s in report["results"].values())
  assert "student" in report["source"]
  # The table cell shows the table read back from results.json.
  table = _text_outputs(_tagged(notebook, "table"))
  assert "sysu_mm01/all/single-shot" in table and "mAP" in table
  # The pictures cell displays every PNG the evaluation wrote, as images.
  pngs = sorted(p.name for p in (workdir / "eval").glob("*.png"))
  assert {"cmc.png", "training_curves.png"} <= set(pngs)
  assert any(name.startswith("ranked_") for name in pngs)
  pictures = _tagged(notebook, "pictures")
  shown = [o for o in pictures["outputs"] if "image/png" in o.get("data", {})]
  assert len(shown) == len(pngs)
  report_cell = _text_outputs(_tagged(notebook, "report"))
  assert "DAKD run report" in report_cell
  assert (workdir / "report.md").is_file()
  # Nothing was written to the repository's data, workdirs or notebooks folders.
  assert _snapshot(REPO) == before
