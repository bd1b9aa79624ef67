"""Tests of the Python API: sprs_jax.load, Detector and Predictions.

One module-scoped workdir is trained (one step) and evaluated on a fake MVTec
AD category with the tiny model of test_run.py. The shared detector compiles
the scorer once, for padded batches of eval.batch_size, and the score network
for two image shapes. Error cases raise before anything is compiled.
"""

import csv
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

import anomaly_trees
import sprs_jax
from configs import mvtec
from sprs_jax import api
from sprs_jax import input_pipeline
from sprs_jax import model as model_lib
from sprs_jax import predict
from sprs_jax import run_lib
from sprs_jax import threshold
from test_run import OVERRIDES

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CATEGORY = anomaly_trees.SPECS["mvtec_ad"].category
IMAGE_SIZE = OVERRIDES["data.image_size"]
HEATMAP_SIZE = OVERRIDES["eval.heatmap_size"]
# RGB photos scored by both the API and the predict mode: name -> (width,
# height). One has the model's input size, the others are resized.
PHOTO_SIZES = {
    "wide.png": (40, 24),
    "square.png": (IMAGE_SIZE, IMAGE_SIZE),
    "small.png": (12, 10),
}


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _write_json(path, content):
  path.write_text(json.dumps(content))


def _copy_workdir(source, tmp_path):
  target = tmp_path / "workdir"
  shutil.copytree(source, target)
  return target


def _random_images(seed, shape):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Returns a workdir trained (one step) and evaluated on a fake category."""
  root = tmp_path_factory.mktemp("api")
  tree = anomaly_trees.write_category(root / "manual",
                                      anomaly_trees.SPECS["mvtec_ad"])
  config = mvtec.get_config(CATEGORY)
  config.update_from_flattened_dict({
      "data.manual_dir": str(tree.manual_dir),
      "data.data_dir": str(root / "data"),
      **OVERRIDES,
  })
  path = root / "workdir"
  run_lib.run(config, str(path), "train_and_evaluate")
  return path


@pytest.fixture(scope="module")
def detector(workdir):
  return api.load(str(workdir))


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("photos")
  for seed, (name, (width, height)) in enumerate(sorted(PHOTO_SIZES.items())):
    Image.fromarray(_random_images(seed, (height, width, 3))).save(
        folder / name)
  return folder


@pytest.fixture(scope="module")
def predict_mode_rows(workdir, photo_dir, tmp_path_factory):
  """Returns the predictions.csv rows of run_lib.predict on photo_dir."""
  output_dir = tmp_path_factory.mktemp("predict_mode") / "out"
  run_lib.predict(str(workdir), str(photo_dir), str(output_dir))
  with open(output_dir / predict.CSV_NAME, newline="") as f:
    return list(csv.DictReader(f))


# Loading


def test_load_single_category(detector, workdir):
  assert detector.category == CATEGORY
  assert detector.category_dir == str(workdir / CATEGORY)
  assert detector.step == 1
  assert detector.config.data.image_size == IMAGE_SIZE
  assert "category='bottle'" in repr(detector)


def test_load_reads_threshold(detector, workdir):
  record = threshold.load(str(workdir / CATEGORY))
  assert detector.threshold_record == record
  assert detector.threshold == record["threshold"]


def test_load_by_category_and_path(workdir):
  detector = sprs_jax.load(workdir, category=CATEGORY)
  assert detector.category == CATEGORY
  assert detector.step == 1


def test_package_exports_api():
  assert sprs_jax.load is api.load
  assert sprs_jax.Detector is api.Detector
  assert sprs_jax.Predictions is api.Predictions
  with pytest.raises(AttributeError, match="no attribute 'nothing'"):
    getattr(sprs_jax, "nothing")


def test_import_leaves_api_unloaded():
  code = ("import sys, sprs_jax; print(*(name in sys.modules for name in "
          "('sprs_jax.api', 'flax', 'tensorflow')))")
  completed = subprocess.run(
      [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
      text=True, timeout=60)
  assert completed.returncode == 0, completed.stderr
  assert completed.stdout.split() == ["False", "False", "False"]


def test_load_uses_threshold_scoring_fields(workdir, tmp_path):
  copy = _copy_workdir(workdir, tmp_path)
  config_path = copy / CATEGORY / "config.json"
  saved_config = _read_json(config_path)
  saved_config["eval"]["filter_size"] = 3
  _write_json(config_path, saved_config)

  detector = api.load(copy)

  assert detector.config.eval.filter_size == OVERRIDES["eval.filter_size"]
  assert detector.threshold is not None


def test_load_stale_threshold_warns(workdir, tmp_path, caplog):
  copy = _copy_workdir(workdir, tmp_path)
  path = copy / CATEGORY / threshold.FILE_NAME
  record = _read_json(path)
  record["params_fingerprint"] = "00000000"
  _write_json(path, record)
  caplog.set_level("WARNING", logger="absl")

  detector = api.load(copy)

  assert detector.threshold is None
  assert detector.threshold_record is None
  assert "fingerprint 00000000" in caplog.text


# Load errors


def test_load_missing_workdir(tmp_path):
  path = tmp_path / "none"
  with pytest.raises(ValueError, match="does not exist") as error:
    api.load(path)
  assert repr(str(path)) in str(error.value)


def test_load_workdir_without_category(tmp_path):
  with pytest.raises(ValueError, match="no trained category") as error:
    api.load(tmp_path)
  assert f"--workdir={tmp_path}" in str(error.value)


def test_load_category_folder_as_workdir(workdir):
  with pytest.raises(ValueError, match="folder of one category") as error:
    api.load(workdir / CATEGORY)
  assert f"load({str(workdir)!r}, category={CATEGORY!r})" in str(error.value)


def test_load_several_categories_need_category(workdir, tmp_path):
  copy = _copy_workdir(workdir, tmp_path)
  shutil.copytree(copy / CATEGORY, copy / "grid")

  with pytest.raises(ValueError, match="2 categories: bottle, grid") as error:
    api.load(copy)
  assert "category=" in str(error.value)
  assert repr(str(copy)) in str(error.value)


def test_load_unknown_category(workdir):
  with pytest.raises(ValueError, match="'wood'.*Trained categories: bottle"):
    api.load(workdir, category="wood")


def test_load_without_checkpoint(workdir, tmp_path):
  copy = _copy_workdir(workdir, tmp_path)
  shutil.rmtree(copy / CATEGORY / "checkpoints")

  with pytest.raises(ValueError, match="No checkpoint") as error:
    api.load(copy)
  assert str(copy / CATEGORY / "checkpoints") in str(error.value)


# Score network


def test_score_network_matches_model_apply(detector):
  images = np.random.default_rng(0).uniform(
      -1.0, 1.0, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  t = np.array([0.05, 0.5], np.float32)
  config = detector.config
  params, _ = run_lib.restore_for_evaluation(config, detector.category_dir)
  model = model_lib.create_model(config.model, config.sde.sigma_max)

  output = detector.score_network(images, t)

  assert isinstance(output, np.ndarray)
  assert output.shape == images.shape
  assert output.dtype == np.float32
  expected = model.apply({"params": params}, images, t)
  np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)


def test_score_network_scalar_t_broadcasts(detector):
  images = np.random.default_rng(1).uniform(
      -1.0, 1.0, (2, IMAGE_SIZE, IMAGE_SIZE, 3))
  np.testing.assert_array_equal(
      detector.score_network(images, 0.3),
      detector.score_network(images, np.array([0.3, 0.3])))


def test_score_network_other_image_size(detector):
  # 6 x 10 is neither square nor divisible by 4, the U-Net's pooling factor.
  images = np.random.default_rng(2).uniform(
      -1.0, 1.0, (2, 6, 10, 3)).astype(np.float32)
  output = detector.score_network(images, 0.1)
  assert output.shape == (2, 6, 10, 3)
  assert np.isfinite(output).all()


def test_score_network_accepts_noisy_images(detector):
  # Noise of sigma(1) ~ 9.85 takes values far outside [-1, 1].
  images = np.random.default_rng(3).normal(
      0.0, 10.0, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  assert detector.score_network(images, 1.0).shape == images.shape


_SQUARE = (2, IMAGE_SIZE, IMAGE_SIZE, 3)


@pytest.mark.parametrize("images, t, message", [
    (np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32), 0.1,
     r"shape \[16, 16, 3\].*images\[None\]"),
    (np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 4), np.float32), 0.1,
     r"expected \[B, H, W, 3\]"),
    (np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32), 0.1, "B >= 1"),
    (np.zeros(_SQUARE, np.uint8), 0.1, "dtype uint8.*x / 127.5 - 1"),
    (np.full(_SQUARE, 200.0, np.float32), 0.1, "look like 0..255 pixels"),
    (np.full(_SQUARE, np.nan, np.float32), 0.1, "NaN"),
    (np.zeros((2, 3, IMAGE_SIZE, 3), np.float32), 0.1,
     "at least 4x4 pixels"),
    (np.zeros(_SQUARE, np.float32), 0.0, r"in \(0, 1\]"),
    (np.zeros(_SQUARE, np.float32), [0.1, 1.5], r"in \(0, 1\]"),
    (np.zeros(_SQUARE, np.float32), [0.1, 0.2, 0.3], "vector of 2"),
])
def test_score_network_rejects_invalid_input(detector, images, t, message):
  with pytest.raises(ValueError, match=message):
    detector.score_network(images, t)


# Predict


def test_predict_matches_predict_mode(detector, photo_dir, predict_mode_rows):
  paths = [str(photo_dir / name) for name in sorted(PHOTO_SIZES)]
  assert [row["path"] for row in predict_mode_rows] == paths
  photos = [predict.load_image(path) for path in paths]

  result = detector.predict(photos)

  assert result.scores.shape == (len(paths),)
  assert result.scores.dtype == np.float32
  assert result.heatmaps.shape == (len(paths), HEATMAP_SIZE, HEATMAP_SIZE)
  assert result.heatmaps.dtype == np.float32
  np.testing.assert_allclose(
      result.scores, [float(row["score"]) for row in predict_mode_rows],
      rtol=1e-6)
  np.testing.assert_allclose(
      result.normalized_scores,
      [float(row["normalized_score"]) for row in predict_mode_rows],
      rtol=1e-6)
  assert [("anomalous" if verdict else "normal")
          for verdict in result.verdicts] == [
              row["verdict"] for row in predict_mode_rows]


def test_predict_verdicts_follow_threshold(detector):
  result = detector.predict(_random_images(4, (3, 24, 40, 3)))
  assert result.verdicts.dtype == bool
  np.testing.assert_array_equal(result.verdicts,
                                result.scores >= detector.threshold)
  record = detector.threshold_record
  np.testing.assert_array_equal(
      result.normalized_scores,
      threshold.normalize(result.scores, record["threshold"],
                          record["score_min"], record["score_max"]))


def test_predict_uint8_and_float_agree(detector):
  pixels = _random_images(5, (3, 24, 40, 3))
  from_uint8 = detector.predict(pixels)
  from_float = detector.predict(input_pipeline.to_model_range(pixels))
  np.testing.assert_array_equal(from_float.scores, from_uint8.scores)
  np.testing.assert_array_equal(from_float.heatmaps, from_uint8.heatmaps)


def test_predict_float64_list_agrees(detector):
  pixels = _random_images(6, (2, IMAGE_SIZE, IMAGE_SIZE, 3))
  floats = [image.astype(np.float64) / 127.5 - 1.0 for image in pixels]
  np.testing.assert_array_equal(detector.predict(floats).scores,
                                detector.predict(pixels).scores)


def test_predict_single_image(detector, photo_dir):
  photos = [predict.load_image(str(photo_dir / name))
            for name in sorted(PHOTO_SIZES)]
  together = detector.predict(photos)

  alone = detector.predict(photos[1])

  assert alone.scores.shape == (1,)
  assert alone.heatmaps.shape == (1, HEATMAP_SIZE, HEATMAP_SIZE)
  np.testing.assert_allclose(alone.scores[0], together.scores[1], rtol=1e-6)


def test_predict_more_images_than_batch(detector):
  count = OVERRIDES["eval.batch_size"] + 1
  pixels = _random_images(7, (count, IMAGE_SIZE, IMAGE_SIZE, 3))

  result = detector.predict(pixels)

  assert result.scores.shape == (count,)
  assert result.heatmaps.shape == (count, HEATMAP_SIZE, HEATMAP_SIZE)
  # An image's noise depends on its pixels only, not on its batch.
  last_alone = detector.predict(pixels[-1])
  np.testing.assert_allclose(result.scores[-1], last_alone.scores[0],
                             rtol=1e-6)


def test_predict_without_threshold(detector, workdir, tmp_path):
  copy = _copy_workdir(workdir, tmp_path)
  (copy / CATEGORY / threshold.FILE_NAME).unlink()
  pixels = _random_images(8, (2, 24, 40, 3))

  unthresholded = api.load(copy)
  result = unthresholded.predict(pixels)

  assert unthresholded.threshold is None
  assert result.normalized_scores is None
  assert result.verdicts is None
  # config.json has the scoring fields of threshold.json here.
  np.testing.assert_allclose(result.scores, detector.predict(pixels).scores,
                             rtol=1e-6)


_GRAY = np.zeros((10, 12), np.uint8)


@pytest.mark.parametrize("images, message", [
    ([], "empty list"),
    (np.zeros((0, 8, 8, 3), np.uint8), "N >= 1"),
    (_GRAY, r"images has shape \[10, 12\]"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 4), np.uint8)],
     r"images\[1\] has shape \[8, 8, 4\].*load_image"),
    (np.zeros((2, 8, 8, 3), np.int32), r"images\[0\] has dtype int32"),
    (np.full((8, 8, 3), 255.0), r"\[255, 255\], outside \[-1, 1\]"),
    (np.full((8, 8, 3), np.inf, np.float32), "NaN or infinite"),
    (np.zeros((1, 2, 8, 8, 3), np.uint8), r"shape \[1, 2, 8, 8, 3\]"),
])
def test_predict_rejects_invalid_images(detector, images, message):
  with pytest.raises(ValueError, match=message):
    detector.predict(images)
