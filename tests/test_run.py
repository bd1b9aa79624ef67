"""End-to-end tests of run.py and run_lib: outputs, resume and evaluate mode.

Every run uses one tiny config (16-pixel images, a 3-level U-Net of 8 to 16
channels), so JAX compiles few shapes. The trained workdir of the run.py
subprocess is shared by the module. Tests that write to a workdir work on a
copy of it.
"""

import json
import logging
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

import saved_states
from configs import demo
from configs import mvtec
from sprs_jax import run_lib
from sprs_jax import train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CATEGORY = "gravel"
# 160 training images in batches of 8.
STEPS_PER_EPOCH = 20
OVERRIDES = {
    "data.image_size": 16,
    "model.widths": (8, 16, 16),
    "model.num_groups": 4,
    "model.embed_dim": 16,
    "training.batch_size": 8,
    "training.num_epochs": 1,
    "eval.heatmap_size": 32,
    "eval.filter_size": 5,
    "eval.num_draws": 2,
    "eval.batch_size": 20,
    "eval.num_panels": 4,
}
METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
TIME_KEYS = ("train_seconds", "train_images_per_second")
# An entry of another category, written before the run.py run to check that
# results are merged into metrics.json.
BRICK_METRICS = {
    "image_auroc": 0.5,
    "pixel_auroc": 0.25,
    "aupro": 0.125,
    "f1_max": 0.75,
    "train_seconds": 10.0,
    "train_images_per_second": 16.0,
}


def _config(data_dir, **changes):
  """Returns the tiny gravel config with `changes` ({dotted field: value})."""
  config = demo.get_config(CATEGORY)
  config.update_from_flattened_dict({
      "data.data_dir": str(data_dir), **OVERRIDES, **changes})
  return config


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _copy_workdir(source, tmp_path, name):
  target = tmp_path / name
  shutil.copytree(source, target)
  return target


def _snapshot(folder):
  """Returns {relative path: bytes} of every file under folder."""
  return {
      str(path.relative_to(folder)): path.read_bytes()
      for path in sorted(pathlib.Path(folder).rglob("*")) if path.is_file()
  }


def _assert_trees_close(actual, expected):
  actual_leaves = jax.tree_util.tree_leaves_with_path(actual)
  expected_leaves = jax.tree_util.tree_leaves(expected)
  assert len(actual_leaves) == len(expected_leaves)
  for (path, a), b in zip(actual_leaves, expected_leaves):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def cli_run(data_dir, tmp_path_factory):
  """Runs `python run.py` for gravel once, on 2 forced host devices.

  The workdir starts with a metrics.json that contains only a brick entry.
  Returns (workdir, completed process).
  """
  workdir = tmp_path_factory.mktemp("cli") / "workdir"
  workdir.mkdir()
  (workdir / "metrics.json").write_text(json.dumps({"brick": BRICK_METRICS}))

  command = [
      sys.executable, "run.py", f"--config=configs/demo.py:{CATEGORY}",
      f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
  ]
  command += [f"--config.{key}={value}" for key, value in OVERRIDES.items()]
  environment = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      JAX_PLATFORMS="cpu",
  )
  completed = subprocess.run(
      command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
      timeout=600)
  return workdir, completed


@pytest.fixture
def cli_workdir(cli_run):
  workdir, completed = cli_run
  assert completed.returncode == 0, completed.stderr[-3000:]
  return workdir


def test_cli_trains_on_two_devices(cli_run):
  _, completed = cli_run
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "global batch 8 on 2 devices" in completed.stderr


def test_cli_metrics_schema(cli_workdir):
  metrics = _read_json(cli_workdir / "metrics.json")
  assert CATEGORY in metrics
  entry = metrics[CATEGORY]
  for key in METRIC_KEYS:
    assert isinstance(entry[key], float), key
    assert math.isfinite(entry[key]), key
    assert 0.0 <= entry[key] <= 1.0, key
  for key in TIME_KEYS:
    assert isinstance(entry[key], float), key
    assert entry[key] > 0.0, key
  assert entry["num_test_images"] == 100


def test_cli_prints_table(cli_run, cli_workdir):
  _, completed = cli_run
  assert "| Category | Image AUROC |" in completed.stdout
  assert f"| {CATEGORY} | " in completed.stdout
  # Only categories run now are printed.
  assert "| brick | " not in completed.stdout


def test_cli_results_table(cli_workdir):
  metrics = _read_json(cli_workdir / "metrics.json")
  lines = (cli_workdir / "results.md").read_text().splitlines()
  gravel_rows = [line for line in lines if line.startswith(f"| {CATEGORY} | ")]
  assert len(gravel_rows) == 1
  assert f"| {metrics[CATEGORY]['image_auroc']:.4f} |" in gravel_rows[0]


def test_cli_panels(cli_workdir):
  panels = sorted((cli_workdir / CATEGORY / "panels").glob("*.png"))
  assert len(panels) == 4
  # Panels take one image of each defect type in sorted order, and are named
  # after the file name, for example test_hole_001.png.
  defect_types = sorted(path.name.split("_")[1] for path in panels)
  assert defect_types == ["contamination", "good", "hole", "scratch"]
  for path in panels:
    with Image.open(path) as image:
      image.load()
      assert image.width > 0, path.name
      assert image.height > 0, path.name


def test_cli_checkpoint_and_config(cli_workdir):
  category_dir = cli_workdir / CATEGORY
  steps = sorted(os.listdir(category_dir / "checkpoints"))
  assert steps == [str(STEPS_PER_EPOCH)]

  saved = _read_json(category_dir / "config.json")
  assert saved["data"]["category"] == CATEGORY
  assert saved["model"]["widths"] == [8, 16, 16]
  assert saved["training"]["batch_size"] == 8


def test_metrics_merge_keeps_other_category(cli_workdir):
  metrics = _read_json(cli_workdir / "metrics.json")
  assert sorted(metrics) == ["brick", CATEGORY]
  assert metrics["brick"] == BRICK_METRICS

  results = (cli_workdir / "results.md").read_text()
  assert "| brick | 0.5000 | 0.2500 | 0.1250 | 0.7500 | 10 |" in results
  mean_auroc = (0.5 + metrics[CATEGORY]["image_auroc"]) / 2
  mean_rows = [line for line in results.splitlines()
               if line.startswith("| **mean** |")]
  assert len(mean_rows) == 1
  assert f"| **{mean_auroc:.4f}** |" in mean_rows[0]


def test_resume_matches_uninterrupted(cli_workdir, data_dir, tmp_path, caplog,
                                     monkeypatch):
  config = _config(data_dir, **{"training.num_epochs": 2})
  uninterrupted = tmp_path / "uninterrupted"
  written_stats = []
  write_json_atomically = train.write_json_atomically

  def record_json(path, payload):
    if os.path.basename(path) == "train_stats.json":
      written_stats.append(dict(payload))
    write_json_atomically(path, payload)

  monkeypatch.setattr(train, "write_json_atomically", record_json)
  config_with_saves = _config(data_dir, **{
      "training.num_epochs": 2,
      "training.checkpoint_every_steps": STEPS_PER_EPOCH})
  run_lib.run(config_with_saves, str(uninterrupted), "train")
  monkeypatch.undo()

  # The stats are written with the checkpoint in the middle and at the end.
  assert [(s["step"], s["total_steps"]) for s in written_stats] == [
      (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH),
      (2 * STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH)]
  assert written_stats[0]["train_images"] == STEPS_PER_EPOCH * 8

  # The run.py workdir contains the first epoch, so this run adds the second.
  resumed = _copy_workdir(cli_workdir, tmp_path, "resumed")
  caplog.set_level(logging.INFO, logger="absl")
  caplog.clear()
  run_lib.run(config, str(resumed), "train")

  assert f"starting at step {STEPS_PER_EPOCH}." in caplog.text
  steps = sorted(os.listdir(resumed / CATEGORY / "checkpoints"), key=int)
  assert steps == [str(STEPS_PER_EPOCH), str(2 * STEPS_PER_EPOCH)]
  stats = _read_json(resumed / CATEGORY / "train_stats.json")
  assert stats["train_images"] == 2 * 160

  expected = saved_states.restore_latest(config, uninterrupted / CATEGORY)[0]
  actual = saved_states.restore_latest(config, resumed / CATEGORY)[0]
  assert int(expected.step) == 2 * STEPS_PER_EPOCH
  assert int(actual.step) == 2 * STEPS_PER_EPOCH
  _assert_trees_close(actual.params, expected.params)
  _assert_trees_close(actual.ema_params, expected.ema_params)


def test_evaluate_mode_reproduces_metrics(cli_workdir, data_dir, tmp_path):
  trained = _read_json(cli_workdir / "metrics.json")[CATEGORY]
  workdir = _copy_workdir(cli_workdir, tmp_path, "workdir")

  results = run_lib.run(_config(data_dir), str(workdir), "evaluate")

  for key in METRIC_KEYS + ("f1_threshold",):
    assert results[CATEGORY][key] == trained[key], key


def test_evaluate_mode_seed_changes_metrics(cli_workdir, data_dir, tmp_path):
  trained = _read_json(cli_workdir / "metrics.json")[CATEGORY]
  workdir = _copy_workdir(cli_workdir, tmp_path, "workdir")

  results = run_lib.run(_config(data_dir, seed=1), str(workdir), "evaluate")

  assert results[CATEGORY]["pixel_auroc"] != trained["pixel_auroc"]


def test_evaluate_mode_without_checkpoint(data_dir, tmp_path):
  workdir = tmp_path / "empty"
  with pytest.raises(FileNotFoundError) as error:
    run_lib.run(_config(data_dir), str(workdir), "evaluate")
  message = str(error.value)
  assert str(workdir / CATEGORY / "checkpoints") in message
  assert "--mode=" in message
  assert not workdir.exists()


def test_other_widths_without_saved_config(cli_workdir, data_dir, tmp_path):
  workdir = _copy_workdir(cli_workdir, tmp_path, "workdir")
  (workdir / CATEGORY / "config.json").unlink()
  before = _snapshot(workdir)
  config = _config(data_dir, **{"model.widths": (8, 16, 32)})

  with pytest.raises(ValueError, match="does not fit the model") as error:
    run_lib.run(config, str(workdir), "evaluate")

  assert str(workdir / CATEGORY / "checkpoints") in str(error.value)
  assert _snapshot(workdir) == before


def test_other_image_size_rejected(cli_workdir, data_dir, tmp_path):
  workdir = _copy_workdir(cli_workdir, tmp_path, "workdir")
  before = _snapshot(workdir)
  config = _config(data_dir, **{"data.image_size": 32})

  with pytest.raises(ValueError, match="data.image_size: workdir has 16"):
    run_lib.run(config, str(workdir), "train")
  assert _snapshot(workdir) == before


def test_corrupt_metrics_file_named(cli_workdir, data_dir, tmp_path):
  workdir = _copy_workdir(cli_workdir, tmp_path, "workdir")
  (workdir / "metrics.json").write_text('{"brick": \n')
  before = _snapshot(workdir)

  with pytest.raises(ValueError, match="Repair or move away") as error:
    run_lib.run(_config(data_dir), str(workdir), "evaluate")

  assert str(workdir / "metrics.json") in str(error.value)
  assert _snapshot(workdir) == before


def test_failed_data_check_leaves_no_workdir(tmp_path):
  config = mvtec.get_config("bottle")
  config.data.manual_dir = str(tmp_path / "missing")
  config.data.data_dir = str(tmp_path / "tfds")
  workdir = tmp_path / "new" / "nested" / "workdir"

  with pytest.raises(ValueError, match="missing"):
    run_lib.run(config, str(workdir), "train")
  assert not (tmp_path / "new").exists()


def test_unfinished_training_warns(tmp_path, caplog):
  (tmp_path / "train_stats.json").write_text(
      json.dumps({"step": 20, "total_steps": 40}))
  caplog.set_level(logging.WARNING, logger="absl")

  run_lib._warn_if_unfinished(str(tmp_path), 40)
  assert "did not finish" not in caplog.text
  run_lib._warn_if_unfinished(str(tmp_path), 20)
  assert "step 20 of 40" in caplog.text
  assert "did not finish" in caplog.text


@pytest.mark.parametrize("mode", ["train", "evaluate"])
def test_other_widths_rejected(cli_workdir, data_dir, tmp_path, mode):
  workdir = _copy_workdir(cli_workdir, tmp_path, "workdir")
  before = _snapshot(workdir)
  config = _config(data_dir, **{"model.widths": (8, 16, 32)})

  with pytest.raises(ValueError, match="model.widths") as error:
    run_lib.run(config, str(workdir), mode)

  assert "[8, 16, 16]" in str(error.value)
  assert _snapshot(workdir) == before


def test_results_table_mean_row():
  metrics = {
      "brick": BRICK_METRICS,
      "grass": {"image_auroc": 0.7, "pixel_auroc": 0.75, "aupro": 0.375,
                "f1_max": 0.25, "train_seconds": 20.0},
  }
  lines = run_lib.format_results_table(metrics).splitlines()
  assert len(lines) == 5
  assert lines[0].startswith("| Category | Image AUROC | Pixel AUROC |")
  assert lines[2].startswith("| brick | 0.5000 |")
  assert lines[3].startswith("| grass | 0.7000 |")
  assert lines[4] == (
      "| **mean** | **0.6000** | **0.5000** | **0.2500** | **0.5000** "
      "| 30 (total) |")


def test_results_table_single_row():
  table = run_lib.format_results_table({"brick": BRICK_METRICS})
  assert "**mean**" not in table


def test_resolve_categories_all(data_dir):
  config = _config(data_dir)
  config.data.category = "all"
  assert run_lib.resolve_categories(config.data) == [
      "brick", "grass", "gravel"]


def test_resolve_categories_unknown(data_dir):
  config = _config(data_dir)
  config.data.category = "wood"
  with pytest.raises(ValueError, match="'wood'"):
    run_lib.resolve_categories(config.data)


@pytest.mark.parametrize("field, value", [
    ("model.widths", ("8", "x")),
    ("model.widths", (12, 16)),
    ("eval.noise_levels", ()),
    ("eval.noise_levels", (0.0,)),
    ("training.t_max", 2.0),
    ("training.num_epochs", 0),
    ("training.learning_rate", -1.0),
    ("training.warmup_steps", -1),
    ("model.dtype", "float16"),
])
def test_validate_config_names_field(field, value, tmp_path):
  config = _config(tmp_path)
  config.update_from_flattened_dict({field: value})

  with pytest.raises(ValueError, match="Invalid config") as error:
    run_lib.run(config, str(tmp_path / "workdir"), "train")

  assert field in str(error.value)
  assert not (tmp_path / "workdir").exists()


def test_cli_unknown_config_field(tmp_path):
  completed = subprocess.run(
      [sys.executable, "run.py", "--config=configs/demo.py",
       "--config.training.nmu_epochs=3", f"--workdir={tmp_path / 'w'}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)

  assert completed.returncode == 1
  assert "Traceback" not in completed.stderr
  assert "error: invalid --config override" in completed.stderr
  assert 'Did you mean "num_epochs"' in completed.stderr


def test_metrics_entry_without_numbers_named(cli_workdir, data_dir, tmp_path):
  workdir = _copy_workdir(cli_workdir, tmp_path, "workdir")
  (workdir / "metrics.json").write_text('{"brick": {"image_auroc": 0.5}}')
  before = _snapshot(workdir)

  with pytest.raises(ValueError, match="'brick' lacks the numbers pixel_auroc"):
    run_lib.run(_config(data_dir), str(workdir), "evaluate")
  assert _snapshot(workdir) == before


def test_finished_training_keeps_config_file(cli_workdir, data_dir, tmp_path):
  workdir = _copy_workdir(cli_workdir, tmp_path, "workdir")
  before = _snapshot(workdir)

  run_lib.run(_config(data_dir, seed=3), str(workdir), "train")

  assert _snapshot(workdir) == before
