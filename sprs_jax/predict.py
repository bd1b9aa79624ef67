"""Scores unlabeled photos with a trained category and writes the results.

The photos are found with `find_images`, decoded once by `check_images` so
that an unreadable file stops the run before any output is written, and then
scored in batches by `write_predictions`. Each photo is converted to 8-bit RGB
and resized to the square model input like the training images (see
`input_pipeline.resize_image`): no crop, so non-square photos are stretched.
Its heat map is resized back to the photo's own width and height for the
overlay.

The noise that perturbs a photo comes from a key folded from the CRC-32 of its
resized pixels (`evaluate.image_noise_keys`), so a photo gets the same score
whichever other photos are scored with it, and the same as in evaluation.
"""

import csv
import dataclasses
import glob
import io
import math
import os
import pathlib
import time
import uuid

import jax
import numpy as np
from absl import logging
from PIL import Image

from sprs_jax import evaluate as evaluate_lib
from sprs_jax import input_pipeline
from sprs_jax import threshold as threshold_lib
from sprs_jax import visualize
from tfds_builders import layout

# Extensions, lower case, of the files that a folder or glob contributes. A
# single file given by its path is read whatever its extension.
IMAGE_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")
CSV_NAME = "predictions.csv"
HEATMAP_DIR = "heatmaps"
CSV_COLUMNS = ("path", "score", "normalized_score", "verdict", "heatmap")
_GLOB_CHARACTERS = frozenset("*?[")
# Maximum number of unreadable files named in one error message. The rest
# are only counted.
_MAX_LISTED_FAILURES = 10


@dataclasses.dataclass(frozen=True)
class Summary:
  """Counts and output paths of one `write_predictions` run.

  Attributes:
    num_images: photos scored.
    num_anomalous: photos whose score is >= the threshold.
    threshold: the decision threshold, an image score.
    csv_path: the predictions.csv written.
    heatmap_dir: the folder of the overlay PNGs.
  """

  num_images: int
  num_anomalous: int
  threshold: float
  csv_path: str
  heatmap_dir: str

  def describe(self) -> str:
    """Returns the one-line summary that the predict mode prints."""
    return (
        f"Scored {self.num_images} images: {self.num_anomalous} anomalous, "
        f"{self.num_images - self.num_anomalous} normal (threshold "
        f"{self.threshold:.6g}). Wrote {self.csv_path} and overlays in "
        f"{self.heatmap_dir}.")


def _is_skipped(path: str) -> bool:
  """Returns whether a listed file is a hidden or OS metadata file."""
  parts = pathlib.PurePath(path).parts
  return layout.is_hidden(pathlib.PurePath(path)) or (
      layout.MACOS_ARCHIVE_DIR in parts)


def _has_image_extension(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def find_images(pattern: str) -> list[str]:
  """Returns the image files that `pattern` names, sorted by path.

  `pattern` is one of:
    * a file, returned as it is whatever its extension;
    * a folder, whose files (not subfolders) with an extension in
      IMAGE_EXTENSIONS, in any letter case, are returned;
    * a glob pattern, where "**" matches any depth of folders, whose matching
      files with such an extension are returned.
  From folders and globs, hidden files (names starting with "."), OS metadata
  files (Thumbs.db, desktop.ini) and files under __MACOSX/ are skipped, and a
  file reached by several paths (through links) is returned once.

  Raises:
    ValueError: naming `pattern` when it matches no image.
  """
  expanded = os.path.expanduser(pattern)
  if os.path.isfile(expanded):
    return [expanded]

  if os.path.isdir(expanded):
    candidates = [os.path.join(expanded, name) for name in os.listdir(expanded)]
    where = f"the folder {pattern!r}"
  elif _GLOB_CHARACTERS & set(expanded):
    candidates = glob.glob(expanded, recursive=True)
    where = f"the pattern {pattern!r}"
  else:
    raise ValueError(
        f"No images match {pattern!r} because no such file or folder exists. "
        "Pass an image file, a folder or a quoted glob pattern with --images.")

  paths = []
  real_paths = set()
  for path in sorted(candidates):
    if (not os.path.isfile(path) or not _has_image_extension(path)
        or _is_skipped(path)):
      continue
    # A file reached twice, through a folder link for example, counts once.
    real_path = os.path.realpath(path)
    if real_path not in real_paths:
      real_paths.add(real_path)
      paths.append(path)
  if not paths:
    hint = ""
    if "[" in expanded:
      hint = (" In a glob pattern, [...] matches one character of a set: "
              "write a literal [ as [[].")
    raise ValueError(
        f"No images match {where}. Only visible files with the extension "
        f"{', '.join(IMAGE_EXTENSIONS)} (any letter case) count.{hint}")
  return paths


def load_image(path: str) -> np.ndarray:
  """Decodes the image at `path` as uint8 RGB [H, W, 3].

  Grayscale is repeated over the channels, palette images are mapped to their
  colors, alpha is dropped and of 16-bit gray the 8 most significant bits are
  kept, as for training images (`layout.convert_to_rgb`).

  Raises:
    ValueError: naming `path` if the file cannot be read or decoded.
  """
  try:
    with open(path, "rb") as file, Image.open(file) as image:
      image.load()
      rgb = layout.convert_to_rgb(image)
  except layout.PIL_READ_ERRORS as error:
    raise ValueError(f"Failed to read image {path}: {error}") from error
  return np.asarray(rgb)


def check_images(paths: list[str]) -> list[tuple[int, int]]:
  """Decodes every image once and returns their (width, height).

  All files are tried before raising, so one error lists every unreadable
  file.

  Raises:
    ValueError: naming each file that cannot be decoded.
  """
  sizes, failures = [], []
  for path in paths:
    try:
      image = load_image(path)
    except ValueError as error:
      failures.append(str(error))
      continue
    sizes.append((image.shape[1], image.shape[0]))

  if failures:
    listed = failures[:_MAX_LISTED_FAILURES]
    more = len(failures) - len(listed)
    tail = f"\n  ... and {more} more" if more else ""
    raise ValueError(
        f"{len(failures)} of {len(paths)} images cannot be read, so nothing "
        "was scored. Replace or remove them:\n  " + "\n  ".join(listed) + tail)
  return sizes


def overlay_file_names(paths: list[str]) -> list[str]:
  """Returns a distinct PNG name per path: "<stem>.png", then "<stem>_2.png"...

  Names are compared in lower case, so they stay distinct on file systems
  that ignore letter case.
  """
  return visualize.distinct_png_names(
      [pathlib.PurePath(path).stem or "image" for path in paths])


def _write_csv_atomically(path: str, rows: list[dict]) -> None:
  """Writes the rows to a temporary file, then renames it to `path`.

  Raises:
    ValueError: if `path` appeared while the photos were scored.
  """
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)

  temporary_name = f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp"
  temporary = os.path.join(os.path.dirname(path), temporary_name)
  with open(temporary, "w", newline="") as f:
    f.write(text.getvalue())
  # NOTE: a file created between this check and the rename is replaced. The
  # check only guards against another run that finished in the meantime.
  if os.path.exists(path):
    os.unlink(temporary)
    raise ValueError(
        f"{path} was created by another run while the photos were scored. "
        "Pass another folder with --output.")
  os.replace(temporary, path)


def device_batch_size(config) -> int:
  """Returns eval.batch_size rounded up to a multiple of the local devices."""
  num_devices = jax.local_device_count()
  return math.ceil(config.eval.batch_size / num_devices) * num_devices


def score_photos(config, score_batch, photos: list[np.ndarray],
                 batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Scores 1 to batch_size uint8 photos [H, W, 3] of any sizes as one batch.

  Each photo is resized to data.image_size, and the batch is padded to
  batch_size by repeating its last photo, so `score_batch` (from
  `evaluate.make_device_scorer`) always gets one shape and compiles once.
  The noise of each photo comes from `evaluate.image_noise_keys` of its
  resized pixels.

  Returns:
    (heat maps float32 [len(photos), S, S], image scores float32
    [len(photos)]) with S = eval.heatmap_size.
  """
  image_size = config.data.image_size
  resized = np.stack(
      [input_pipeline.resize_image(photo, image_size) for photo in photos])
  padding = batch_size - len(photos)
  resized = np.concatenate([resized, np.repeat(resized[-1:], padding, 0)])

  heatmaps, scores = score_batch(
      input_pipeline.to_model_range(resized),
      evaluate_lib.image_noise_keys(config.seed, resized))
  return heatmaps[:len(photos)], scores[:len(photos)]


def write_predictions(config, params, paths: list[str], record: dict,
                      output_dir: str) -> Summary:
  """Scores the photos and writes predictions.csv and one overlay per photo.

  Overlays are PNGs of each photo's own size under <output_dir>/heatmaps,
  coloured on the test split's heat-map range of `record`. predictions.csv is
  written last, so a run that fails on the way leaves no CSV.

  Args:
    config: the config the category was trained with.
    params: its EMA params.
    paths: photo files, already checked with `check_images`.
    record: the category's threshold record (`threshold.load`).
    output_dir: folder for predictions.csv and heatmaps/, created if missing.
  """
  heatmap_dir = os.path.join(output_dir, HEATMAP_DIR)
  os.makedirs(heatmap_dir, exist_ok=True)
  names = overlay_file_names(paths)
  threshold = float(record["threshold"])
  vmin = float(record["heatmap_min"])
  # A constant test split would give vmax == vmin, which has no colour scale.
  vmax = max(float(record["heatmap_max"]), float(np.nextafter(vmin, np.inf)))

  batch_size = device_batch_size(config)
  score_batch = evaluate_lib.make_device_scorer(config, params)

  rows = []
  start = time.perf_counter()
  for first in range(0, len(paths), batch_size):
    batch_paths = paths[first:first + batch_size]
    photos = [load_image(path) for path in batch_paths]
    heatmaps, scores = score_photos(config, score_batch, photos, batch_size)
    normalized = threshold_lib.normalize(
        scores, threshold, record["score_min"], record["score_max"])

    for index, path in enumerate(batch_paths):
      name = names[first + index]
      visualize.save_overlay(os.path.join(heatmap_dir, name), photos[index],
                             heatmaps[index], vmin, vmax)
      score = float(scores[index])
      rows.append({
          "path": os.path.abspath(path),
          "score": repr(score),
          "normalized_score": repr(float(normalized[index])),
          "verdict": "anomalous" if score >= threshold else "normal",
          "heatmap": f"{HEATMAP_DIR}/{name}",
      })
    logging.info("Scored %d of %d images.", len(rows), len(paths))

  seconds = time.perf_counter() - start
  logging.info("Scored %d images in %.1f s (%.1f images/s).", len(rows),
               seconds, len(rows) / max(seconds, 1e-9))
  csv_path = os.path.join(output_dir, CSV_NAME)
  _write_csv_atomically(csv_path, rows)
  num_anomalous = sum(row["verdict"] == "anomalous" for row in rows)
  return Summary(num_images=len(rows), num_anomalous=num_anomalous,
                 threshold=threshold, csv_path=csv_path,
                 heatmap_dir=heatmap_dir)
