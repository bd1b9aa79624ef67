"""Tests of the predict mode and of the threshold that evaluation stores.

One module-scoped workdir is trained and evaluated on a fake MVTec AD
category (`anomaly_trees`) with the tiny model of test_run.py, so JAX compiles
the training step and the scorer once each. Two runs score photos: run.py in
a subprocess on a folder, and run_lib.predict on a glob. Every error case
raises before anything is scored, so it compiles nothing.
"""

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

import anomaly_trees
from configs import mvtec
from sprs_jax import predict
from sprs_jax import run_lib
from sprs_jax import threshold
from test_run import OVERRIDES

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CATEGORY = anomaly_trees.SPECS["mvtec_ad"].category

# Photos of the predict runs: file name -> (width, height). All differ from
# the 16-pixel model input, and most are not square.
PHOTO_SIZES = {
    "gray_40x24.png": (40, 24),
    "rgba.png": (30, 20),
    "palette.bmp": (12, 10),
    "deep16.png": (20, 12),
    "photo.JPG": (18, 18),
    "scan.tiff": (16, 22),
}
# Files of the photo folder that the predict mode skips.
SKIPPED_FILES = (".hidden.png", ".DS_Store", "Thumbs.db", "notes.txt")


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _read_csv(path):
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


def _write_photos(folder: pathlib.Path) -> None:
  """Writes the PHOTO_SIZES photos in several modes, plus skipped files."""
  rng = np.random.default_rng(1)
  folder.mkdir(parents=True)

  def noise(name, channels=None, dtype=np.uint8, high=256):
    width, height = PHOTO_SIZES[name]
    shape = (height, width) if channels is None else (height, width, channels)
    return rng.integers(0, high, shape).astype(dtype)

  Image.fromarray(noise("gray_40x24.png")).save(folder / "gray_40x24.png")
  Image.fromarray(noise("rgba.png", 4), "RGBA").save(folder / "rgba.png")
  palette = Image.fromarray(noise("palette.bmp", high=4), "P")
  palette.putpalette([0, 0, 0, 200, 30, 30, 30, 200, 30, 30, 30, 200])
  palette.save(folder / "palette.bmp")
  Image.fromarray(noise("deep16.png", dtype=np.uint16, high=65536)).save(
      folder / "deep16.png")
  Image.fromarray(noise("photo.JPG", 3)).save(folder / "photo.JPG",
                                              format="JPEG")
  Image.fromarray(noise("scan.tiff", 3)).save(folder / "scan.tiff")

  Image.fromarray(noise("rgba.png", 3)).save(folder / ".hidden.png")
  (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
  (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
  (folder / "notes.txt").write_text("not a photo\n")
  (folder / "__MACOSX").mkdir()
  shutil.copy(folder / "photo.JPG", folder / "__MACOSX" / "._photo.JPG")
  # The same stem in a subfolder, which a recursive glob also matches.
  (folder / "sub").mkdir()
  shutil.copy(folder / "gray_40x24.png", folder / "sub" / "gray_40x24.png")


def _copy_workdir(source, tmp_path):
  target = tmp_path / "workdir"
  shutil.copytree(source, target)
  return target


def _snapshot(folder):
  """Returns {relative path: bytes} of every file under folder."""
  return {
      str(path.relative_to(folder)): path.read_bytes()
      for path in sorted(pathlib.Path(folder).rglob("*")) if path.is_file()
  }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Returns a workdir trained (one step) and evaluated on a fake category."""
  root = tmp_path_factory.mktemp("predict")
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
def photos(tmp_path_factory):
  folder = tmp_path_factory.mktemp("photos") / "photos"
  _write_photos(folder)
  return folder


@pytest.fixture(scope="module")
def cli_predict(workdir, photos):
  """Runs run.py --mode=predict on the photo folder, default output folder."""
  command = [sys.executable, "run.py", "--mode=predict",
             f"--workdir={workdir}", f"--images={photos}"]
  environment = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      JAX_PLATFORMS="cpu",
  )
  completed = subprocess.run(
      command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
      timeout=300)
  assert completed.returncode == 0, completed.stderr[-3000:]
  output_dir = workdir / CATEGORY / run_lib.PREDICTIONS_DIR
  columns, rows = _read_csv(output_dir / predict.CSV_NAME)
  return completed, output_dir, columns, rows


@pytest.fixture(scope="module")
def glob_predict(workdir, photos, tmp_path_factory):
  """Runs run_lib.predict on a recursive glob that matches two equal stems."""
  output_dir = tmp_path_factory.mktemp("glob") / "out"
  summary = run_lib.predict(str(workdir), str(photos / "**" / "gray_*.png"),
                            str(output_dir))
  columns, rows = _read_csv(output_dir / predict.CSV_NAME)
  return summary, output_dir, rows


# Threshold written by evaluation


def test_evaluate_writes_threshold_file(workdir):
  record = _read_json(workdir / CATEGORY / threshold.FILE_NAME)
  metrics = _read_json(workdir / "metrics.json")[CATEGORY]

  assert record["method"] == "f1_max"
  assert record["threshold"] == metrics["f1_threshold"]
  assert record["f1_max"] == metrics["f1_max"]
  assert record["num_test_images"] == 4
  assert record["num_anomalous_test_images"] == 2
  assert record["score_min"] <= record["threshold"] <= record["score_max"]
  assert record["heatmap_min"] < record["heatmap_max"]
  # The image score is the heat-map maximum, so it bounds the pixel range.
  assert record["score_max"] == record["heatmap_max"]


def test_threshold_records_step_and_scoring(workdir):
  record = _read_json(workdir / CATEGORY / threshold.FILE_NAME)
  assert record["checkpoint_step"] == 1
  assert record["scoring"]["eval.filter_size"] == OVERRIDES["eval.filter_size"]
  assert record["scoring"]["data.image_size"] == OVERRIDES["data.image_size"]
  assert sorted(record["scoring"]) == sorted(threshold.SCORING_FIELDS)


def test_threshold_load_round_trip(workdir):
  loaded = threshold.load(str(workdir / CATEGORY))
  assert loaded == _read_json(workdir / CATEGORY / threshold.FILE_NAME)


def test_threshold_load_rejects_invalid_field(tmp_path):
  (tmp_path / threshold.FILE_NAME).write_text(json.dumps(
      {"threshold": "high", "score_min": 0.0, "score_max": 1.0,
       "heatmap_min": 0.0, "heatmap_max": 1.0}))
  with pytest.raises(ValueError, match="'threshold'.*--mode=evaluate"):
    threshold.load(str(tmp_path))


# Normalized score


@pytest.mark.parametrize("value", [0.0, 0.1, 3.3, 1234.5678, -2.0])
def test_normalize_threshold_maps_to_half(value):
  normalized = threshold.normalize([value], value, value - 1.7, value + 0.3)
  assert normalized[0] == 0.5


def test_normalize_formula_and_clipping():
  scores = [0.0, 1.0, 2.0, 3.0, 10.0, -10.0]
  normalized = threshold.normalize(scores, threshold=2.0, score_min=0.0,
                                   score_max=4.0)
  np.testing.assert_array_equal(normalized, [0.0, 0.25, 0.5, 0.75, 1.0, 0.0])


def test_normalize_is_monotone():
  scores = np.linspace(-1.0, 5.0, 101)
  normalized = threshold.normalize(scores, 1.5, 0.5, 3.5)
  assert (np.diff(normalized) >= 0).all()


def test_normalize_zero_span():
  normalized = threshold.normalize([0.5, 1.0, 2.0], 1.0, 1.0, 1.0)
  np.testing.assert_array_equal(normalized, [0.0, 0.5, 1.0])


# Finding and reading images


def test_find_images_folder_skips_hidden(photos):
  paths = predict.find_images(str(photos))
  assert [os.path.basename(path) for path in paths] == sorted(PHOTO_SIZES)
  for name in SKIPPED_FILES:
    assert str(photos / name) not in paths, name


def test_find_images_single_file(photos):
  path = str(photos / "rgba.png")
  assert predict.find_images(path) == [path]


def test_find_images_single_file_any_extension(photos, tmp_path):
  path = tmp_path / "frame.webp"
  shutil.copy(photos / "rgba.png", path)
  assert predict.find_images(str(path)) == [str(path)]


def test_find_images_glob(photos):
  paths = predict.find_images(str(photos / "*.png"))
  assert [os.path.basename(path) for path in paths] == [
      "deep16.png", "gray_40x24.png", "rgba.png"]


def test_find_images_recursive_glob_skips_macos_folder(photos):
  paths = predict.find_images(str(photos / "**" / "*.[jJ][pP][gG]"))
  assert paths == [str(photos / "photo.JPG")]


def test_find_images_missing_path():
  with pytest.raises(ValueError, match="'/no/such/photos'.*no such file"):
    predict.find_images("/no/such/photos")


def test_find_images_glob_without_match(photos):
  pattern = str(photos / "*.gif")
  with pytest.raises(ValueError) as error:
    predict.find_images(pattern)
  assert repr(pattern) in str(error.value)


def test_find_images_folder_without_images(tmp_path):
  (tmp_path / ".hidden.png").write_bytes(b"")
  (tmp_path / "readme.md").write_text("photos go here\n")
  with pytest.raises(ValueError, match="Only visible files"):
    predict.find_images(str(tmp_path))


def test_load_image_16_bit_keeps_high_byte(tmp_path):
  path = tmp_path / "deep.png"
  Image.fromarray(np.full((3, 5), 0x1234, np.uint16)).save(path)

  image = predict.load_image(str(path))

  assert image.shape == (3, 5, 3)
  assert image.dtype == np.uint8
  assert (image == 0x12).all()


def test_load_image_drops_alpha(tmp_path):
  path = tmp_path / "rgba.png"
  pixels = np.zeros((2, 3, 4), np.uint8)
  pixels[..., :3] = (10, 20, 30)
  Image.fromarray(pixels, "RGBA").save(path)

  image = predict.load_image(str(path))

  assert image.shape == (2, 3, 3)
  assert (image == (10, 20, 30)).all()


def test_load_image_maps_palette(photos):
  image = predict.load_image(str(photos / "palette.bmp"))
  colors = {tuple(color) for color in image.reshape(-1, 3)}
  assert colors <= {(0, 0, 0), (200, 30, 30), (30, 200, 30), (30, 30, 200)}


def test_overlay_file_names_unique():
  names = predict.overlay_file_names(
      ["a/x.png", "b/x.png", "c/X.jpg", "x_2.png", "d/y.tif"])
  assert names == ["x.png", "x_2.png", "X_3.png", "x_2_2.png", "y.png"]


# Predict end to end


def test_cli_predict_summary(cli_predict):
  completed, output_dir, _, _ = cli_predict
  summary_lines = [line for line in completed.stdout.splitlines()
                   if line.startswith("Scored ")]
  assert len(summary_lines) == 1
  assert f"Scored {len(PHOTO_SIZES)} images: " in summary_lines[0]
  assert str(output_dir / predict.CSV_NAME) in summary_lines[0]


def test_cli_predict_csv_rows(cli_predict, photos):
  _, _, columns, rows = cli_predict
  assert tuple(columns) == predict.CSV_COLUMNS
  assert [row["path"] for row in rows] == [
      str(photos / name) for name in sorted(PHOTO_SIZES)]


def test_cli_predict_verdicts_match_threshold(cli_predict, workdir):
  _, _, _, rows = cli_predict
  record = threshold.load(str(workdir / CATEGORY))
  for row in rows:
    score = float(row["score"])
    expected = "anomalous" if score >= record["threshold"] else "normal"
    assert row["verdict"] == expected, row["path"]
    normalized = threshold.normalize(
        [score], record["threshold"], record["score_min"],
        record["score_max"])[0]
    assert float(row["normalized_score"]) == normalized, row["path"]


def test_cli_predict_overlay_sizes(cli_predict):
  _, output_dir, _, rows = cli_predict
  for row in rows:
    name = os.path.basename(row["path"])
    with Image.open(output_dir / row["heatmap"]) as overlay:
      assert overlay.size == PHOTO_SIZES[name], name
      assert overlay.mode == "RGB", name
  overlays = sorted(path.name for path in (output_dir / "heatmaps").iterdir())
  assert overlays == sorted(
      os.path.splitext(name)[0] + ".png" for name in PHOTO_SIZES)


def test_cli_predict_existing_csv_kept(cli_predict, workdir, photos):
  _, output_dir, _, _ = cli_predict
  before = _snapshot(output_dir)
  csv_path = output_dir / predict.CSV_NAME

  with pytest.raises(ValueError, match="--output") as error:
    run_lib.predict(str(workdir), str(photos))

  assert str(csv_path) in str(error.value)
  assert _snapshot(output_dir) == before


def test_glob_predict_unique_overlays(glob_predict, photos):
  summary, output_dir, rows = glob_predict
  assert summary.num_images == 2
  assert [row["path"] for row in rows] == [
      str(photos / "gray_40x24.png"), str(photos / "sub" / "gray_40x24.png")]
  assert [row["heatmap"] for row in rows] == [
      "heatmaps/gray_40x24.png", "heatmaps/gray_40x24_2.png"]
  for row in rows:
    with Image.open(output_dir / row["heatmap"]) as overlay:
      assert overlay.size == PHOTO_SIZES["gray_40x24.png"]


def test_glob_predict_scores_match_folder_run(glob_predict, cli_predict):
  # Noise depends on the pixels only, so equal photos get equal scores in
  # any run and batch.
  _, _, glob_rows = glob_predict
  _, _, _, folder_rows = cli_predict
  folder_score = {row["path"]: float(row["score"]) for row in folder_rows}
  gray_score = folder_score[glob_rows[0]["path"]]
  for row in glob_rows:
    np.testing.assert_allclose(float(row["score"]), gray_score, rtol=1e-6,
                               err_msg=row["path"])


def test_predict_scores_like_evaluation(workdir, tmp_path):
  copy = _copy_workdir(workdir, tmp_path)
  # Scoring fields come from threshold.json, not from the training config.
  saved_config = _read_json(copy / CATEGORY / "config.json")
  saved_config["eval"]["filter_size"] = 3
  saved_config["eval"]["num_draws"] = 1
  (copy / CATEGORY / "config.json").write_text(json.dumps(saved_config))
  test_images = workdir.parent / "manual" / CATEGORY / "test" / "*" / "*.png"

  run_lib.predict(str(copy), str(test_images), str(tmp_path / "out"))

  _, rows = _read_csv(tmp_path / "out" / predict.CSV_NAME)
  scores = [float(row["score"]) for row in rows]
  record = _read_json(workdir / CATEGORY / threshold.FILE_NAME)
  assert len(scores) == record["num_test_images"]
  assert min(scores) == pytest.approx(record["score_min"], rel=1e-5)
  assert max(scores) == pytest.approx(record["score_max"], rel=1e-5)


def test_find_images_link_counted_once(photos, tmp_path):
  folder = tmp_path / "photos"
  shutil.copytree(photos, folder)
  # A link back to its own parent folder, which a ** glob walks again.
  (folder / "sub" / "loop").symlink_to(folder, target_is_directory=True)

  paths = predict.find_images(str(folder / "**" / "*.png"))

  real_paths = [os.path.realpath(path) for path in paths]
  assert len(real_paths) == len(set(real_paths))
  assert len(paths) == 4


def test_find_images_bracket_hint(tmp_path):
  folder = tmp_path / "run[1]"
  folder.mkdir()
  Image.new("RGB", (4, 4)).save(folder / "a.png")
  with pytest.raises(ValueError, match=r"write a literal \[ as \[\[\]"):
    predict.find_images(str(folder / "*.png"))


# Predict errors, raised before anything is scored or written


def test_predict_stale_threshold(workdir, photos, tmp_path):
  copy = _copy_workdir(workdir, tmp_path)
  path = copy / CATEGORY / threshold.FILE_NAME
  record = _read_json(path)
  record["checkpoint_step"] = 0
  path.write_text(json.dumps(record))

  with pytest.raises(ValueError, match=r"latest checkpoint \(step 1\)"):
    run_lib.predict(str(copy), str(photos), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_predict_threshold_of_other_params(workdir, photos, tmp_path):
  copy = _copy_workdir(workdir, tmp_path)
  path = copy / CATEGORY / threshold.FILE_NAME
  record = _read_json(path)
  # Same step, other params: a retrained model that reached the same step.
  record["params_fingerprint"] = "00000000"
  path.write_text(json.dumps(record))

  with pytest.raises(ValueError, match="fingerprint 00000000"):
    run_lib.predict(str(copy), str(photos), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_predict_old_threshold_format(workdir, photos, tmp_path):
  copy = _copy_workdir(workdir, tmp_path)
  path = copy / CATEGORY / threshold.FILE_NAME
  record = _read_json(path)
  del record["scoring"]
  path.write_text(json.dumps(record))

  with pytest.raises(ValueError, match="older format"):
    run_lib.predict(str(copy), str(photos), str(tmp_path / "out"))


def test_predict_output_not_writable(workdir, photos, tmp_path):
  blocker = tmp_path / "file.txt"
  blocker.write_text("a file, not a folder\n")
  output_dir = blocker / "out"

  with pytest.raises(ValueError, match="Cannot write to the output folder"):
    run_lib.predict(str(workdir), str(photos), str(output_dir))


def test_predict_corrupt_images_named(workdir, photos, tmp_path):
  folder = tmp_path / "photos"
  shutil.copytree(photos, folder)
  truncated = (photos / "rgba.png").read_bytes()[:60]
  (folder / "cut.png").write_bytes(truncated)
  (folder / "text.jpg").write_text("not a JPEG\n")
  output_dir = tmp_path / "out"

  with pytest.raises(ValueError) as error:
    run_lib.predict(str(workdir), str(folder), str(output_dir))

  message = str(error.value)
  assert "2 of 8 images cannot be read" in message
  assert str(folder / "cut.png") in message
  assert str(folder / "text.jpg") in message
  assert not output_dir.exists()


def test_predict_existing_output_csv_kept(workdir, photos, tmp_path):
  output_dir = tmp_path / "out"
  output_dir.mkdir()
  csv_path = output_dir / predict.CSV_NAME
  csv_path.write_text("path,score\nold.png,1.0\n")

  with pytest.raises(ValueError, match="already exists") as error:
    run_lib.predict(str(workdir), str(photos), str(output_dir))

  assert str(csv_path) in str(error.value)
  assert csv_path.read_text() == "path,score\nold.png,1.0\n"
  assert [path.name for path in output_dir.iterdir()] == [predict.CSV_NAME]


def test_predict_without_threshold(workdir, photos, tmp_path):
  copy = _copy_workdir(workdir, tmp_path)
  (copy / CATEGORY / threshold.FILE_NAME).unlink()

  with pytest.raises(ValueError, match="--mode=evaluate"):
    run_lib.predict(str(copy), str(photos), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_predict_several_categories_need_category(workdir, photos, tmp_path):
  copy = _copy_workdir(workdir, tmp_path)
  shutil.copytree(copy / CATEGORY, copy / "grid")

  with pytest.raises(ValueError, match="2 categories: bottle, grid") as error:
    run_lib.predict(str(copy), str(photos), str(tmp_path / "out"))
  assert "--category" in str(error.value)


def test_predict_unknown_category_lists_trained(workdir, photos, tmp_path):
  with pytest.raises(ValueError, match="'wood'.*Trained categories: bottle"):
    run_lib.predict(str(workdir), str(photos), str(tmp_path / "out"),
                    category="wood")


def test_predict_missing_workdir(photos, tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    run_lib.predict(str(tmp_path / "none"), str(photos))


def test_predict_images_without_match(workdir, tmp_path):
  pattern = str(tmp_path / "*.png")
  with pytest.raises(ValueError) as error:
    run_lib.predict(str(workdir), pattern, str(tmp_path / "out"))
  assert repr(pattern) in str(error.value)


def test_cli_other_mode_requires_config():
  completed = subprocess.run(
      [sys.executable, "run.py", "--mode=evaluate", "--workdir=unused"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert completed.returncode == 1
  assert "error: --config is required by --mode=evaluate" in completed.stderr


def test_predict_existing_heatmaps_kept(workdir, photos, tmp_path):
  heatmap_dir = tmp_path / "out" / predict.HEATMAP_DIR
  heatmap_dir.mkdir(parents=True)
  (heatmap_dir / "a.png").write_bytes(b"earlier overlay")

  with pytest.raises(ValueError, match="earlier run") as error:
    run_lib.predict(str(workdir), str(photos), str(tmp_path / "out"))

  assert str(heatmap_dir) in str(error.value)
  assert (heatmap_dir / "a.png").read_bytes() == b"earlier overlay"


def test_predict_empty_output(workdir, photos):
  with pytest.raises(ValueError, match="--output is empty"):
    run_lib.predict(str(workdir), str(photos), "")


def test_predict_category_folder_as_workdir(workdir, photos):
  with pytest.raises(ValueError, match="folder of one category") as error:
    run_lib.predict(str(workdir / CATEGORY), str(photos))
  assert f"--workdir={workdir} --category={CATEGORY}" in str(error.value)
