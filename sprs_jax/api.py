"""A Python API that scores images with a category trained by run.py.

  detector = sprs_jax.load("workdirs/spr_textures")
  result = detector.predict(photos)  # uint8 [N, H, W, 3] or a list of photos
  result.scores, result.heatmaps, result.verdicts

`load` restores the EMA params of the category's latest checkpoint.
`Detector.predict` scores images as `run.py --mode=predict` scores photos:
the same resize to data.image_size, the same noise keys (from the resized
uint8 pixels) and the same eval settings, so a photo gets the same score in
both. `Detector.score_network` evaluates the raw score network s(x, t).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from sprs_jax import evaluate as evaluate_lib
from sprs_jax import model as model_lib
from sprs_jax import predict as predict_lib
from sprs_jax import run_lib
from sprs_jax import threshold as threshold_lib

# Float images may exceed [-1, 1] by this much, for example after float
# rounding. Values within it are clipped to [-1, 1].
_RANGE_TOLERANCE = 0.01
# A float input to score_network whose values are all >= 0 and reach above
# this is taken for 0..255 pixels. Images in [-1, 1] stay below it, and added
# noise large enough to pass it almost surely gives negative values too.
_PIXEL_RANGE_LIMIT = 2.0
_SCALE_HINT = ("Pass 0..255 pixels as uint8 to predict, or scale them to "
               "[-1, 1] with x / 127.5 - 1.")


@dataclasses.dataclass(frozen=True)
class Predictions:
  """Image scores and heat maps of the N images of one `Detector.predict` call.

  Attributes:
    scores: float32 [N], image scores (the maximum of each heat map). Higher
      is more anomalous.
    heatmaps: float32 [N, S, S] with S = eval.heatmap_size, the anomaly map of
      each image's square model input. `visualize.resize_heatmap` stretches
      one back to its photo's width and height.
    normalized_scores: float64 [N] in [0, 1] with the threshold at 0.5
      (`threshold.normalize`), or None when the detector has no threshold.
    verdicts: bool [N], True (anomalous) where the score is >= the threshold,
      or None when the detector has no threshold.

  The detector has no threshold when the category was never evaluated (no
  threshold.json), or when its threshold.json is unreadable or was chosen
  for other params, such as a checkpoint trained after the evaluation.
  `load` logs a warning in the last two cases.
  """

  scores: np.ndarray
  heatmaps: np.ndarray
  normalized_scores: np.ndarray | None
  verdicts: np.ndarray | None


class Detector:
  """A trained category: its config, EMA params and decision threshold.

  Create it with `load`.

  Attributes:
    category: the category name.
    category_dir: the folder <workdir>/<category>.
    step: the training step of the restored checkpoint.
    config: the training config (<category_dir>/config.json). When the
      threshold belongs to these params, its scoring fields (seed, image
      size, model dtype and eval settings) replace the config's, as in the
      predict mode.
    params: the EMA params of the checkpoint.
    threshold_record: the content of threshold.json, or None when the
      detector has no threshold (see `Predictions`).
  """

  def __init__(self, *, category: str, category_dir: str, step: int,
               config: ml_collections.ConfigDict, params,
               threshold_record: dict | None):
    self.category = category
    self.category_dir = category_dir
    self.step = step
    self.config = config
    self.params = params
    self.threshold_record = threshold_record

    model = model_lib.create_model(config.model, config.sde.sigma_max)
    self._min_side = 2**(len(config.model.widths) - 1)
    # jax.jit compiles once per shape of the images and keeps each program.
    self._apply = jax.jit(
        lambda params, images, t: model.apply({"params": params}, images, t))
    self._batch_size = predict_lib.device_batch_size(config)
    # Built by the first predict call, which also compiles it.
    self._score_batch = None

  @property
  def threshold(self) -> float | None:
    """Decision threshold (an image score), or None without a threshold."""
    if self.threshold_record is None:
      return None
    return float(self.threshold_record["threshold"])

  def __repr__(self) -> str:
    return (f"Detector(category={self.category!r}, step={self.step}, "
            f"image_size={self.config.data.image_size}, "
            f"threshold={self.threshold!r})")

  def score_network(self, images, t) -> np.ndarray:
    """Evaluates the score network s(x, t) on a batch of images.

    Args:
      images: float [B, H, W, 3], images in [-1, 1], with or without added
        noise. H and W must be at least 2^(len(model.widths) - 1) pixels and
        need not equal data.image_size.
      t: diffusion times in (0, 1], a vector [B] or one number for the whole
        batch.

    Returns:
      float32 NumPy [B, H, W, 3], the model's estimate of the gradient of
      log p_t(x). Each shape of `images` is compiled once, on first use.

    Raises:
      ValueError: if images is not a float [B, H, W, 3] array of finite
        values, looks like 0..255 pixels, or t does not match.
    """
    images = np.asarray(images)
    self._check_network_images(images)
    t = self._check_times(t, len(images))
    output = self._apply(self.params, jnp.asarray(images, jnp.float32),
                         jnp.asarray(t))
    return np.asarray(output)

  def _check_network_images(self, images: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
      hint = " Add a batch axis with images[None]." if images.ndim == 3 else ""
      raise ValueError(
          f"images has shape {list(images.shape)}, expected [B, H, W, 3] with "
          f"B >= 1.{hint}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(
          f"images has dtype {images.dtype}, expected float pixels in "
          f"[-1, 1]. {_SCALE_HINT}")
    height, width = images.shape[1:3]
    if min(height, width) < self._min_side:
      raise ValueError(
          f"images of {height}x{width} pixels are too small for a U-Net of "
          f"{len(self.config.model.widths)} levels. Pass images of at least "
          f"{self._min_side}x{self._min_side} pixels.")
    values = images.astype(np.float32)
    if not np.isfinite(values).all():
      raise ValueError("images contains NaN or infinite values.")
    if values.min() >= 0.0 and values.max() > _PIXEL_RANGE_LIMIT:
      raise ValueError(
          f"images has values in [{values.min():g}, {values.max():g}], which "
          f"look like 0..255 pixels. {_SCALE_HINT}")

  def _check_times(self, t, batch: int) -> np.ndarray:
    """Checks t and returns it as float32 [batch], broadcast from a number."""
    times = np.asarray(t, np.float64)
    if times.ndim == 0:
      times = np.full(batch, times)
    if times.shape != (batch,):
      raise ValueError(
          f"t has shape {list(times.shape)}, expected one number or a vector "
          f"of {batch} diffusion times, one per image.")
    if not (np.isfinite(times).all() and (times > 0.0).all()
            and (times <= 1.0).all()):
      raise ValueError(
          f"t contains {times.tolist()}, expected diffusion times in (0, 1], "
          "for example the eval.noise_levels "
          f"{tuple(self.config.eval.noise_levels)}.")
    return times.astype(np.float32)

  def predict(self, images) -> Predictions:
    """Scores images as `run.py --mode=predict` does.

    Each image is resized to the square data.image_size input without a crop
    (`input_pipeline.resize_image`) and scored with the config's eval
    settings. Float images are first rounded to uint8 pixels,
    rint((x + 1) * 127.5), the precision of the photos the model was trained
    on, so x / 127.5 - 1 of uint8 pixels scores exactly as the pixels do. The
    images are scored in padded batches of eval.batch_size, which compile
    once for any N.

    Args:
      images: uint8 pixels (0..255) or float pixels in [-1, 1], as an array
        [N, H, W, 3], one image [H, W, 3], or a list of [H, W, 3] images of
        different sizes. Convert grayscale or RGBA photos to RGB first, for
        example with `predict.load_image`.

    Returns:
      The Predictions of the N images, in input order (N = 1 for one image).

    Raises:
      ValueError: naming the first image of another shape, dtype or value
        range.
    """
    photos = _to_uint8_photos(images)
    if self._score_batch is None:
      self._score_batch = evaluate_lib.make_device_scorer(self.config,
                                                          self.params)

    heatmaps, scores = [], []
    for first in range(0, len(photos), self._batch_size):
      batch = photos[first:first + self._batch_size]
      batch_heatmaps, batch_scores = predict_lib.score_photos(
          self.config, self._score_batch, batch, self._batch_size)
      heatmaps.append(batch_heatmaps)
      scores.append(batch_scores)
    heatmaps = np.concatenate(heatmaps).astype(np.float32)
    scores = np.concatenate(scores).astype(np.float32)

    if self.threshold_record is None:
      return Predictions(scores, heatmaps, None, None)
    record = self.threshold_record
    normalized = threshold_lib.normalize(
        scores, record["threshold"], record["score_min"], record["score_max"])
    verdicts = scores.astype(np.float64) >= self.threshold
    return Predictions(scores, heatmaps, normalized, verdicts)


def _to_uint8_photos(images) -> list[np.ndarray]:
  """Returns the images as a list of uint8 [H, W, 3] arrays."""
  if isinstance(images, (list, tuple)):
    if not images:
      raise ValueError("images is an empty list. Pass at least one image.")
    return [_to_uint8(image, f"images[{index}]")
            for index, image in enumerate(images)]

  images = np.asarray(images)
  if images.ndim == 3:
    return [_to_uint8(images, "image")]
  if images.ndim != 4 or len(images) == 0:
    raise ValueError(
        f"images has shape {list(images.shape)}, expected [N, H, W, 3] with "
        "N >= 1, one image [H, W, 3] or a list of images.")
  return [_to_uint8(image, f"images[{index}]")
          for index, image in enumerate(images)]


def _to_uint8(image, name: str) -> np.ndarray:
  """Checks one image [H, W, 3] and returns its uint8 pixels."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
    raise ValueError(
        f"{name} has shape {list(image.shape)}, expected [H, W, 3] RGB. "
        "Convert grayscale or RGBA photos to RGB first, for example with "
        "sprs_jax.predict.load_image(path).")
  if image.dtype == np.uint8:
    return image
  if not jnp.issubdtype(image.dtype, jnp.floating):
    raise ValueError(
        f"{name} has dtype {image.dtype}, expected uint8 pixels (0..255) or "
        "float pixels in [-1, 1]. Convert 0..255 integers with "
        ".astype(np.uint8).")

  values = image.astype(np.float32)
  if not np.isfinite(values).all():
    raise ValueError(f"{name} contains NaN or infinite values.")
  low, high = float(values.min()), float(values.max())
  # NOTE: images scaled to [0, 1] pass this check and are read as the bright
  # half of [-1, 1], so they get wrong scores without an error.
  if low < -1.0 - _RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
    raise ValueError(
        f"{name} has float values in [{low:g}, {high:g}], outside [-1, 1]. "
        f"{_SCALE_HINT}")
  return np.rint((np.clip(values, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def _select_category(workdir: str, category: str | None) -> str:
  """Returns `category`, or the workdir's only trained category if None.

  Like `run_lib.select_category`, but the messages name the arguments of
  `load` in place of command-line flags.
  """
  if not os.path.isdir(workdir):
    raise ValueError(
        f"The workdir {workdir!r} does not exist or is not a folder. Pass the "
        "--workdir of a run.py training run.")
  categories = run_lib.trained_categories(workdir)
  if not categories and os.path.isfile(os.path.join(workdir, "config.json")):
    parent = os.path.dirname(os.path.abspath(workdir))
    name = os.path.basename(os.path.abspath(workdir))
    raise ValueError(
        f"{workdir!r} is the folder of one category, not a workdir. Call "
        f"load({parent!r}, category={name!r}).")
  if not categories:
    raise ValueError(
        f"The workdir {workdir!r} contains no trained category (no "
        "<category>/config.json). Train one first with run.py "
        f"--mode=train_and_evaluate --workdir={workdir}.")
  if category is None:
    if len(categories) > 1:
      raise ValueError(
          f"The workdir {workdir!r} contains {len(categories)} categories: "
          f"{', '.join(categories)}. Select one with load(workdir, "
          "category=...).")
    return categories[0]
  if category not in categories:
    raise ValueError(
        f"Category {category!r} is not trained in the workdir {workdir!r}. "
        f"Trained categories: {', '.join(categories)}.")
  return category


def _load_matching_threshold(config, category_dir: str, params, step: int):
  """Returns (scoring config, threshold record), or (config, None).

  The record is returned only when threshold.json was chosen for these
  params. The scoring config is a copy of config with the record's scoring
  fields.
  """
  path = os.path.join(category_dir, threshold_lib.FILE_NAME)
  if not os.path.exists(path):
    logging.info("%s is missing, so predictions have no verdicts. Run "
                 "run.py --mode=evaluate to choose a threshold.", path)
    return config, None

  scoring_config = ml_collections.ConfigDict(config.to_dict())
  try:
    record = threshold_lib.load(category_dir)
    run_lib.check_threshold_params(record, params, step, category_dir)
    run_lib.apply_threshold_scoring(scoring_config, record, category_dir)
  except ValueError as error:
    logging.warning("Predictions have no verdicts because the threshold is "
                    "not usable: %s", error)
    return config, None
  return scoring_config, record


def load(workdir: str | os.PathLike, category: str | None = None) -> Detector:
  """Restores a category of a workdir trained by run.py as a Detector.

  Uses the EMA params of the category's latest checkpoint, its config.json
  and, when it matches those params, its threshold.json.

  Args:
    workdir: the --workdir of a run.py training run. "~" is expanded.
    category: the category to load. It may be None when the workdir contains
      only one trained category.

  Raises:
    ValueError: naming the path and the fix if the workdir does not exist,
      contains no trained category, contains several and `category` is None,
      does not contain `category`, or if the category has no checkpoint or
      an unreadable config.json.
  """
  workdir = os.path.expanduser(os.fspath(workdir))
  category = _select_category(workdir, category)
  category_dir = os.path.join(workdir, category)
  config = run_lib.load_saved_config(category_dir)

  try:
    params, step = run_lib.restore_for_evaluation(config, category_dir)
  except FileNotFoundError as error:
    raise ValueError(str(error)) from error

  config, record = _load_matching_threshold(config, category_dir, params,
                                            step)
  return Detector(category=category, category_dir=category_dir, step=step,
                  config=config, params=params, threshold_record=record)
