"""The decision threshold chosen at evaluation, and normalized image scores.

Evaluation writes ``<workdir>/<category>/threshold.json``. Its ``threshold`` is
the image score that reaches the image-level F1-max on the test split: an
image whose score is >= the threshold is anomalous. The file also stores the
minimum and maximum of the test split's image scores, which normalize scores
as `normalize` of anomalib's min-max normalization module does::

  normalized = clip((score - threshold) / (score_max - score_min) + 0.5, 0, 1)

so the threshold maps to 0.5, higher scores to more than 0.5, and the map is
monotone. ``heatmap_min`` and ``heatmap_max`` are the test split's heat-map
pixel range, the colour scale of the evaluation panels and of the overlays of
the predict mode. ``checkpoint_step``, ``params_fingerprint`` and ``scoring`` (the config fields
that change image scores) tie the threshold to the evaluated params and
settings, so the predict mode scores photos as evaluation scored the test
split, and refuses params that were not evaluated.
"""

import json
import math
import os
import zlib

import jax
import numpy as np

from sprs_jax import train as train_lib

FILE_NAME = "threshold.json"
METHOD = "f1_max"
_FLOAT_FIELDS = ("threshold", "score_min", "score_max", "heatmap_min",
                 "heatmap_max")
# Config fields that change image scores, stored in the record's "scoring".
SCORING_FIELDS = ("seed", "data.image_size", "model.dtype",
                  "eval.noise_levels", "eval.num_draws", "eval.batch_size",
                  "eval.heatmap_size", "eval.filter_size")


def params_fingerprint(params) -> str:
  """Returns a CRC-32 of every array in params, as 8 hex digits.

  Two checkpoints of the same step but from different training runs get
  different fingerprints, so a threshold is tied to the exact params.
  """
  checksum = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    checksum = zlib.crc32(jax.tree_util.keystr(path).encode(), checksum)
    checksum = zlib.crc32(np.ascontiguousarray(leaf).tobytes(), checksum)
  return f"{checksum:08x}"


def scoring_fields(config) -> dict:
  """Returns {dotted field: value} of SCORING_FIELDS in config (JSON types)."""
  fields = {}
  for dotted in SCORING_FIELDS:
    value = config
    for part in dotted.split("."):
      value = value[part]
    fields[dotted] = list(value) if isinstance(value, (tuple, list)) else value
  return fields


def make_record(threshold: float, f1: float, labels: np.ndarray,
                scores: np.ndarray, heatmaps: np.ndarray, config,
                checkpoint_step: int, params) -> dict:
  """Returns the threshold.json content of one evaluated test split.

  Args:
    threshold: the image score that reaches the F1-max (metrics.f1_max).
    f1: that F1-max.
    labels: [N] image labels of the test split, 0 normal and 1 anomalous.
    scores: [N] image scores of the test split.
    heatmaps: [N, H, W] heat maps of the test split.
    config: the config the test split was scored with.
    checkpoint_step: training step of the scored params.
    params: the scored (EMA) params, whose fingerprint is stored.
  """
  labels = np.asarray(labels)
  return {
      "checkpoint_step": int(checkpoint_step),
      "params_fingerprint": params_fingerprint(params),
      "scoring": scoring_fields(config),
      "threshold": float(threshold),
      "method": METHOD,
      "rule": "anomalous when image score >= threshold",
      "f1_max": float(f1),
      "score_min": float(np.min(scores)),
      "score_max": float(np.max(scores)),
      "heatmap_min": float(np.min(heatmaps)),
      "heatmap_max": float(np.max(heatmaps)),
      "num_test_images": int(labels.size),
      "num_anomalous_test_images": int(np.count_nonzero(labels)),
  }


def save(category_dir: str, record: dict) -> str:
  """Writes <category_dir>/threshold.json atomically and returns its path."""
  path = os.path.join(category_dir, FILE_NAME)
  train_lib.write_json_atomically(path, record)
  return path


def load(category_dir: str) -> dict:
  """Reads and checks <category_dir>/threshold.json.

  Raises:
    ValueError: if the file is missing (the category was never evaluated),
      is not valid JSON, or lacks a finite value of a required field.
  """
  path = os.path.join(category_dir, FILE_NAME)
  rerun = ("Run --mode=evaluate with the category's --config and this "
           "--workdir to write it.")
  if not os.path.exists(path):
    raise ValueError(
        f"{path} is missing because the category has not been evaluated, so "
        f"it has no decision threshold. {rerun}")
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, json.JSONDecodeError) as error:
    raise ValueError(f"Failed to read {path}: {error}. {rerun}") from error

  for field in _FLOAT_FIELDS:
    value = record.get(field) if isinstance(record, dict) else None
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value):
      raise ValueError(
          f"{path} has no finite number in field {field!r}. {rerun}")
  scoring = record.get("scoring")
  if (not isinstance(record.get("checkpoint_step"), int)
      or not isinstance(record.get("params_fingerprint"), str)
      or not isinstance(scoring, dict)
      or sorted(scoring) != sorted(SCORING_FIELDS)):
    raise ValueError(
        f"{path} does not say which checkpoint and scoring fields its "
        f"threshold belongs to (an older format or an edited file). {rerun}")
  return record


def normalize(scores, threshold: float, score_min: float,
              score_max: float) -> np.ndarray:
  """Maps image scores to [0, 1] with the threshold at exactly 0.5.

  Returns clip((score - threshold) / (score_max - score_min) + 0.5, 0, 1) as
  float64. When score_max == score_min, scores above the threshold map to 1
  and scores below it to 0.
  """
  scores = np.asarray(scores, np.float64)
  span = float(score_max) - float(score_min)
  difference = scores - float(threshold)
  if span > 0.0:
    normalized = difference / span + 0.5
  else:
    normalized = 0.5 + 0.5 * np.sign(difference)
  return np.clip(normalized, 0.0, 1.0)
