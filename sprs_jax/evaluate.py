"""Evaluation: heat maps of the whole test split, metrics and PNG panels."""

import os
import time
import zlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from sprs_jax import distributed
from sprs_jax import input_pipeline
from sprs_jax import metrics as metrics_lib
from sprs_jax import model as model_lib
from sprs_jax import scoring
from sprs_jax import threshold as threshold_lib
from sprs_jax import visualize


def score_split(config, params, source):
  """Scores every example of ``source`` with the given (EMA) params.

  The batch is split over all local devices. Each image's noise comes from
  `image_noise_keys`, so the output depends on the seed and the pixels but not
  on the order of the images. Other batch sizes or device counts can change
  scores in the last float32 bit.

  The host keeps the per-image outputs below plus one batch in memory. The
  arrays are allocated once at full length, and only the panel candidates
  keep a display image.

  Returns:
    A dict in source order: NumPy arrays ``heatmaps`` float32 [N, S, S],
    ``scores`` float32 [N], ``masks`` uint8 {0, 1} [N, S, S], ``labels``
    int32 [N], ``original_sizes`` int32 [N, 2] (height, width of each
    photo); lists ``file_names``, ``defect_types``; and ``display``, a dict
    from source index to the uint8 [S, S, 3] photo of the first
    eval.num_panels images of each defect type, which includes every image
    that `select_panel_indices` picks. S is eval.heatmap_size.
  """
  eval_config = config.eval
  num_devices = jax.local_device_count()
  if eval_config.batch_size % num_devices:
    raise ValueError(
        f"eval.batch_size={eval_config.batch_size} must be divisible by the "
        f"{num_devices} local devices.")
  score_batch = make_device_scorer(config, params)

  num_examples = len(source)
  size = eval_config.heatmap_size
  outputs = {
      "heatmaps": np.empty((num_examples, size, size), np.float32),
      "scores": np.empty(num_examples, np.float32),
      "masks": np.empty((num_examples, size, size), np.uint8),
      "labels": np.empty(num_examples, np.int32),
      "original_sizes": np.empty((num_examples, 2), np.int32),
      "file_names": [],
      "defect_types": [],
      "display": {},
  }
  displays_per_type = {}

  begin = 0
  start = time.perf_counter()
  for batch in input_pipeline.eval_batches(
      source, config.data.image_size, size, eval_config.batch_size):
    pixels = np.rint((batch["image"] + 1.0) * 127.5).astype(np.uint8)
    keys = image_noise_keys(config.seed, pixels)
    heatmaps, scores = score_batch(batch["image"], keys)

    # Padding examples come last in a batch, after the valid ones.
    count = int(np.count_nonzero(batch["valid"]))
    end = begin + count
    outputs["heatmaps"][begin:end] = heatmaps[:count]
    outputs["scores"][begin:end] = scores[:count]
    outputs["masks"][begin:end] = batch["mask"][:count]
    outputs["labels"][begin:end] = batch["label"][:count]
    outputs["original_sizes"][begin:end] = batch["original_size"][:count]
    outputs["file_names"] += batch["file_name"][:count]
    outputs["defect_types"] += batch["defect_type"][:count]

    for offset, defect_type in enumerate(batch["defect_type"][:count]):
      kept = displays_per_type.get(defect_type, 0)
      if kept < eval_config.num_panels:
        outputs["display"][begin + offset] = batch["display"][offset].copy()
        displays_per_type[defect_type] = kept + 1
    begin = end

  seconds = time.perf_counter() - start
  logging.info("Scored %d test images in %.1f s (%.1f images/s).",
               num_examples, seconds, num_examples / max(seconds, 1e-9))
  return outputs


def image_noise_keys(seed: int, images_uint8: np.ndarray):
  """Returns one PRNG key per image, folded from the CRC-32 of its pixels.

  ``images_uint8`` is uint8 [B, S, S, 3], the model input before it is mapped
  to [-1, 1]. Evaluation and the predict mode both draw the noise of an image
  from this key, so the same photo gets the same score in both.
  """
  base_key = jax.random.fold_in(jax.random.key(seed), 0x5C0E)
  checksums = np.array(
      [zlib.crc32(np.ascontiguousarray(image).tobytes())
       for image in images_uint8], np.uint32)
  return jax.vmap(lambda data: jax.random.fold_in(base_key, data))(
      jnp.asarray(checksums))


def make_device_scorer(config, params):
  """Returns score(images, keys) -> (heat maps, image scores) as NumPy arrays.

  The batch is split over all local devices, so its size must be a multiple
  of jax.local_device_count(). ``images`` is float32 [B, S, S, 3] in [-1, 1]
  and ``keys`` contains one PRNG key per image. Heat maps are float32
  [B, heatmap_size, heatmap_size] and scores [B]. In a multi-process run the
  scorer stays on this process's devices and waits for no other process.
  """
  devices = jax.local_devices()
  num_devices = len(devices)
  model = model_lib.create_model(config.model, config.sde.sigma_max)
  score_batch = jax.pmap(
      scoring.make_score_batch(model, config.eval, config.sde.sigma_max),
      devices=devices)
  replicated_params = flax.jax_utils.replicate(params, devices)

  def score(images, keys):
    size = len(images)
    heatmaps, scores = score_batch(
        replicated_params, _split(images, num_devices),
        _split(keys, num_devices))
    heatmaps = np.asarray(heatmaps)
    return (heatmaps.reshape((size,) + heatmaps.shape[2:]),
            np.asarray(scores).reshape(size))

  return score


def _split(array, num_devices):
  return array.reshape((num_devices, -1) + array.shape[1:])


def _restore_aspect_ratio(display, mask, heatmap, original_size):
  """Stretches square pictures of a photo back to its aspect ratio.

  The height stays at eval.heatmap_size S and the width becomes S * width /
  height of the original photo. Returns (display, mask, heat map).
  """
  height, width = (int(side) for side in original_size)
  side = display.shape[0]
  target_width = max(1, round(side * width / height))
  if target_width == side:
    return display, mask, heatmap
  display = np.asarray(Image.fromarray(display).resize(
      (target_width, side), Image.Resampling.BILINEAR))
  mask = np.asarray(Image.fromarray(mask).resize(
      (target_width, side), Image.Resampling.NEAREST))
  return display, mask, visualize.resize_heatmap(heatmap, target_width, side)


def select_panel_indices(defect_types, num_panels: int) -> list[int]:
  """Picks up to num_panels test images, taking each defect type in turn."""
  by_type = {}
  for index, defect_type in enumerate(defect_types):
    by_type.setdefault(defect_type, []).append(index)
  chosen = []
  while len(chosen) < num_panels and any(by_type.values()):
    for defect_type in sorted(by_type):
      if by_type[defect_type] and len(chosen) < num_panels:
        chosen.append(by_type[defect_type].pop(0))
  return sorted(chosen)


def evaluate(config, category_dir: str, params, source,
             checkpoint_step: int) -> dict:
  """Scores the test split, computes the metrics and writes the outputs.

  The F1-max threshold goes to ``<category_dir>/threshold.json`` (see
  ``sprs_jax.threshold``) with ``checkpoint_step``, the training step of
  ``params``, for the predict mode. Panels go to
  ``<category_dir>/panels``. They share one colour scale (the heat maps' min
  and max over the split) so they can be compared, and their titles give
  each image's verdict at that threshold.

  In a multi-process run every process scores the whole split on its own
  devices and returns the same metrics, and process 0 alone writes the
  threshold and the panels.

  Returns:
    The dict of ``metrics.compute_metrics`` plus ``num_test_images``.
  """
  # NOTE: evaluation is not sharded over processes, so more hosts do not make
  # it faster. The other processes would otherwise wait for process 0.
  outputs = score_split(config, params, source)
  results = metrics_lib.compute_metrics(
      outputs["labels"], outputs["scores"], outputs["masks"],
      outputs["heatmaps"])
  results["num_test_images"] = int(len(outputs["labels"]))
  record = threshold_lib.make_record(
      results["f1_threshold"], results["f1_max"], outputs["labels"],
      outputs["scores"], outputs["heatmaps"], config, checkpoint_step,
      params)
  if not distributed.is_primary():
    return results
  threshold_path = threshold_lib.save(category_dir, record)
  logging.info("Wrote the decision threshold %.6g (F1-max %.4f) to %s",
               record["threshold"], record["f1_max"], threshold_path)

  chosen = select_panel_indices(outputs["defect_types"],
                                config.eval.num_panels)
  if chosen:
    panel_dir = os.path.join(category_dir, "panels")
    pictures = [
        _restore_aspect_ratio(outputs["display"][i], outputs["masks"][i],
                              outputs["heatmaps"][i],
                              outputs["original_sizes"][i])
        for i in chosen]
    paths = visualize.save_panels(
        panel_dir,
        [picture[0] for picture in pictures],
        [picture[1] for picture in pictures],
        [picture[2] for picture in pictures],
        [outputs["file_names"][i] for i in chosen],
        outputs["scores"][chosen],
        vmin=record["heatmap_min"],
        vmax=record["heatmap_max"],
        threshold=record["threshold"])
    logging.info("Wrote %d panels to %s", len(paths), panel_dir)
  return results
