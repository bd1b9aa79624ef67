"""Writes notebooks/quickstart.ipynb, without outputs.

Edit the cells here, then run ``python notebooks/make_quickstart.py`` and
commit both files. tests/test_notebook.py checks that the committed notebook
matches this script.
"""

import pathlib

import nbformat

NOTEBOOK_PATH = pathlib.Path(__file__).with_name("quickstart.ipynb")

INTRO = """\
# sprs-jax quick start

This notebook trains an SPR anomaly detector on one category of the embedded
demo data set (`spr_textures`), shows the heat maps that evaluation draws,
and scores a photo of your own.

In Colab, set `REPO_URL` below to the git address of the sprs-jax repository
and run all cells. Training and evaluation of the demo recipe took about
4 minutes on the 2-core CPU of README's measurements. The install cell
installs the CPU build of JAX. The notebook has not been tried on Colab's GPU
or TPU runtimes.
"""

PARAMETERS = """\
# Parameters. tests/test_notebook.py replaces this cell with a tiny config.

# Clone the repository (when the notebook does not run inside a checkout)
# and pip install its requirements.txt.
INSTALL = True
# The git address to clone, for example your fork of sprs-jax.
REPO_URL = ""
# Demo category: "brick", "grass" or "gravel".
CATEGORY = "brick"
# Folder for checkpoints, metrics and heat maps, relative to the checkout.
WORKDIR = "workdirs/quickstart"
# TFDS data folder for the prepared data set; "" selects TFDS's default.
DATA_DIR = ""
# Config fields to change, as {"group.field": value}, for example
# {"training.num_epochs": 40}.
CONFIG_OVERRIDES = {}
# Path of a photo to score. When empty, Colab opens an upload dialog, and
# elsewhere (or when nothing is uploaded) an anomalous demo test image is
# scored.
MY_IMAGE = ""
# Number of evaluation panels to show.
NUM_PANELS = 4
"""

SETUP_INTRO = """\
## Install

The next cell finds the repository above the current folder (or in
`./sprs-jax`), clones it there if it is missing, and installs its
requirements. If pip upgrades a package that Colab had already imported,
Colab prompts for a restart of the session. Restart it and run all cells again, which
reuses the clone.
"""

SETUP = """\
import os
import pathlib
import subprocess
import sys


def find_checkout(start: pathlib.Path) -> pathlib.Path | None:
  \"\"\"Returns the sprs-jax checkout at or above `start`, or in start/sprs-jax.\"\"\"
  for folder in [start, *start.parents, start / "sprs-jax"]:
    if (folder / "run.py").is_file() and (folder / "sprs_jax").is_dir():
      return folder
  return None


checkout = find_checkout(pathlib.Path.cwd())
if checkout is None:
  if not (INSTALL and REPO_URL):
    raise ValueError(
        f"No sprs-jax checkout found at or above {pathlib.Path.cwd()}. Set "
        "INSTALL = True and REPO_URL to the repository's git address, or "
        "start the notebook from inside a checkout.")
  subprocess.run(["git", "clone", "--depth=1", REPO_URL, "sprs-jax"],
                 check=True)
  checkout = pathlib.Path("sprs-jax").resolve()

os.chdir(checkout)
if str(checkout) not in sys.path:
  sys.path.insert(0, str(checkout))
if INSTALL:
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r",
                  "requirements.txt"], check=True)
print(f"Using the checkout at {checkout}")
"""

TRAIN_INTRO = """\
## Train and evaluate

`configs/demo.py` is the 2-core CPU recipe. The first run builds the demo
data set into the TFDS data folder. Rerunning the cell resumes from the last
checkpoint, and a finished category is only evaluated again.
"""

TRAIN = """\
from configs import demo
from sprs_jax import cli
from sprs_jax import run_lib

config = demo.get_config(CATEGORY)
config.update_from_flattened_dict({"data.data_dir": DATA_DIR,
                                   **CONFIG_OVERRIDES})
cli.setup_logging()
results = run_lib.run(config, WORKDIR, "train_and_evaluate")
metrics = results[CATEGORY]
print(f"image AUROC {metrics['image_auroc']:.4f}, "
      f"pixel AUROC {metrics['pixel_auroc']:.4f}")
"""

PANELS_INTRO = """\
## Heat maps of the test split

Each panel shows a test image, its ground-truth mask and the heat-map
overlay, titled with the image score and the verdict at the decision
threshold. All panels of a category share one colour scale.
"""

PANELS = """\
from IPython.display import Image as PngImage
from IPython.display import display

panel_dir = pathlib.Path(WORKDIR, CATEGORY, "panels")
panels = sorted(panel_dir.glob("*.png"))
print(f"{len(panels)} panels in {panel_dir}")
for path in panels[:NUM_PANELS]:
  print(path.name)
  display(PngImage(filename=str(path)))
"""

SCORE_INTRO = """\
## Score your own photo

`sprs_jax.load` restores the trained detector. Photos of any size are
resized to the model input without a crop, and the heat map is stretched
back to the photo's size.
"""

SCORE = """\
import numpy as np
from PIL import Image

import sprs_jax
from sprs_jax import input_pipeline
from sprs_jax import predict
from sprs_jax import visualize

detector = sprs_jax.load(WORKDIR, category=CATEGORY)
print(detector)

photo_path = MY_IMAGE
if not photo_path:
  try:
    from google.colab import files
  except ImportError:
    files = None
  if files is not None:
    uploaded = files.upload()  # {file name: content}
    if uploaded:
      name, content = next(iter(uploaded.items()))
      upload_dir = pathlib.Path(WORKDIR, "uploads")
      upload_dir.mkdir(parents=True, exist_ok=True)
      photo_path = str(upload_dir / name)
      pathlib.Path(photo_path).write_bytes(content)

if photo_path:
  photo = predict.load_image(photo_path)  # uint8 RGB, any size
  photo_name = photo_path
else:
  test_split = input_pipeline.load_split(config.data, "test")
  example = next(test_split[index] for index in range(len(test_split))
                 if test_split[index]["label"] == 1)
  photo = example["image"]
  photo_name = f"demo test image {example['file_name'].decode()}"

result = detector.predict([photo])
score = float(result.scores[0])
print(f"{photo_name}: image score {score:.4f}")
if result.verdicts is not None:
  verdict = "anomalous" if result.verdicts[0] else "normal"
  print(f"normalized score {result.normalized_scores[0]:.3f} "
        f"(threshold {detector.threshold:.4f}): {verdict}")

# The colour scale of the evaluation panels, when the category has one.
heatmap = result.heatmaps[0]
record = detector.threshold_record
if record is not None:
  vmin, vmax = float(record["heatmap_min"]), float(record["heatmap_max"])
else:
  vmin, vmax = float(heatmap.min()), float(heatmap.max())
vmax = max(vmax, float(np.nextafter(vmin, np.inf)))
height, width = photo.shape[:2]
overlay = visualize.heatmap_overlay(
    photo, visualize.resize_heatmap(heatmap, width, height), vmin, vmax)
display(Image.fromarray(np.concatenate([photo, overlay], axis=1)))
"""


def build_notebook() -> nbformat.NotebookNode:
  """Returns the quick-start notebook, with the parameters cell tagged."""
  cells = [
      nbformat.v4.new_markdown_cell(INTRO),
      nbformat.v4.new_code_cell(PARAMETERS,
                                metadata={"tags": ["parameters"]}),
      nbformat.v4.new_markdown_cell(SETUP_INTRO),
      nbformat.v4.new_code_cell(SETUP),
      nbformat.v4.new_markdown_cell(TRAIN_INTRO),
      nbformat.v4.new_code_cell(TRAIN),
      nbformat.v4.new_markdown_cell(PANELS_INTRO),
      nbformat.v4.new_code_cell(PANELS),
      nbformat.v4.new_markdown_cell(SCORE_INTRO),
      nbformat.v4.new_code_cell(SCORE),
  ]
  # Fixed ids keep the file identical from one generation to the next.
  for index, cell in enumerate(cells):
    cell["id"] = f"cell-{index}"
  notebook = nbformat.v4.new_notebook(cells=cells)
  notebook.metadata["kernelspec"] = {
      "name": "python3", "display_name": "Python 3", "language": "python"}
  notebook.metadata["language_info"] = {"name": "python"}
  notebook.metadata["colab"] = {"provenance": []}
  return notebook


def main() -> None:
  notebook = build_notebook()
  nbformat.validate(notebook)
  nbformat.write(notebook, NOTEBOOK_PATH)
  print(f"Wrote {NOTEBOOK_PATH}")


if __name__ == "__main__":
  main()
