"""Runs notebooks/quickstart.ipynb headless with a tiny config.

The parameters cell is replaced so that the notebook skips the install,
trains the tiny model of test_run.py for one epoch on the demo category and
scores a grayscale, non-square photo written by the test. A last cell scores
again without a photo, which falls back to a demo test image. The kernel is
an ipykernel of this Python, started in the repository root, and inherits
the 2 forced host devices of conftest.py.
"""

import base64
import io
import json
import pathlib
import re
import sys

import nbclient
import nbformat
import numpy as np
from PIL import Image
import pytest

from test_run import OVERRIDES

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_PATH = REPO_ROOT / "notebooks" / "quickstart.ipynb"
CATEGORY = "gravel"
NUM_PANELS = 2
SCORE_LINE = re.compile(r"image score (-?\d+\.\d+)")

sys.path.insert(0, str(REPO_ROOT / "notebooks"))
import make_quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position


def _tiny_parameters(workdir, data_dir, photo_path):
  return "\n".join([
      "INSTALL = False",
      "REPO_URL = ''",
      f"CATEGORY = {CATEGORY!r}",
      f"WORKDIR = {str(workdir)!r}",
      f"DATA_DIR = {str(data_dir)!r}",
      f"CONFIG_OVERRIDES = {OVERRIDES!r}",
      f"MY_IMAGE = {str(photo_path)!r}",
      f"NUM_PANELS = {NUM_PANELS}",
  ])


def _code_cell(notebook, marker):
  """Returns the one code cell whose source contains `marker`."""
  cells = [cell for cell in notebook.cells
           if cell.cell_type == "code" and marker in cell.source]
  assert len(cells) == 1, marker
  return cells[0]


def _text(cell):
  """Returns the stream and plain-text outputs of a cell, joined."""
  parts = []
  for output in cell.outputs:
    if output.output_type == "stream" and output.name == "stdout":
      parts.append(output.text)
    elif output.output_type in ("execute_result", "display_data"):
      parts.append(output.data.get("text/plain", ""))
  return "\n".join(parts)


def _png_outputs(cell):
  return [output for output in cell.outputs
          if output.output_type == "display_data"
          and "image/png" in output.data]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """Returns the notebook after a headless run with the tiny parameters."""
  root = tmp_path_factory.mktemp("notebook")
  photo_path = root / "my photo.png"
  pixels = np.random.default_rng(0).integers(0, 256, (20, 30), np.uint8)
  Image.fromarray(pixels).save(photo_path)

  notebook = nbformat.read(NOTEBOOK_PATH, as_version=4)
  parameters = [cell for cell in notebook.cells
                if "parameters" in cell.metadata.get("tags", [])]
  assert len(parameters) == 1
  parameters[0].source = _tiny_parameters(root / "workdir", root / "data",
                                          photo_path)
  score_source = _code_cell(notebook, "detector.predict").source
  notebook.cells.append(nbformat.v4.new_code_cell(
      "MY_IMAGE = ''\n" + score_source))

  client = nbclient.NotebookClient(
      notebook, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": str(REPO_ROOT)}})
  client.execute()
  return notebook, root


def test_committed_notebook_is_generated():
  committed = json.loads(NOTEBOOK_PATH.read_text())
  generated = json.loads(nbformat.writes(make_quickstart.build_notebook()))
  assert committed == generated


def test_committed_notebook_has_no_outputs():
  notebook = nbformat.read(NOTEBOOK_PATH, as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [], cell.id
      assert cell.execution_count is None, cell.id


def test_notebook_cells_run_without_error(executed):
  notebook, _ = executed
  for cell in notebook.cells:
    if cell.cell_type != "code":
      continue
    errors = [output for output in cell.outputs
              if output.output_type == "error"]
    assert errors == [], cell.source[:80]
    assert cell.execution_count is not None, cell.source[:80]


def test_notebook_trains_and_prints_metrics(executed):
  notebook, root = executed
  text = _text(_code_cell(notebook, "run_lib.run("))
  assert "image AUROC" in text
  assert "pixel AUROC" in text
  assert (root / "workdir" / CATEGORY / "threshold.json").is_file()


def test_notebook_shows_panels(executed):
  notebook, _ = executed
  cell = _code_cell(notebook, "panel_dir")
  assert "4 panels in" in _text(cell)
  assert len(_png_outputs(cell)) == NUM_PANELS


def _png_size(output):
  """Returns (width, height) of a display_data PNG output."""
  content = base64.b64decode(output.data["image/png"])
  with Image.open(io.BytesIO(content)) as image:
    return image.size


def test_notebook_scores_own_photo(executed):
  notebook, root = executed
  # The notebook's scoring cell; the test appended the last cell.
  cell = notebook.cells[-2]
  text = _text(cell)
  assert f"{root / 'my photo.png'}: image score" in text
  assert SCORE_LINE.search(text)
  assert "threshold" in text
  images = _png_outputs(cell)
  assert len(images) == 1
  # The photo (30 x 20) and its overlay side by side.
  assert _png_size(images[0]) == (60, 20)


def test_notebook_falls_back_to_demo_image(executed):
  notebook, _ = executed
  cell = notebook.cells[-1]
  text = _text(cell)
  assert "demo test image test/" in text
  assert SCORE_LINE.search(text)
  images = _png_outputs(cell)
  assert len(images) == 1
  # A 128 x 128 demo image and its overlay side by side.
  assert _png_size(images[0]) == (256, 128)
