"""Tests for the benchmark scripts, run as a user runs them, on a tiny model."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_TINY = [
    "--config.data.image_size=16",
    "--config.model.widths=(8, 16, 16)",
    "--config.model.num_groups=4",
    "--config.model.embed_dim=16",
    "--config.training.batch_size=4",
    "--config.eval.batch_size=4",
    "--config.eval.heatmap_size=32",
    "--config.eval.filter_size=5",
]


def test_throughput_prints_figures_of_both_parts():
  completed = subprocess.run(
      [sys.executable, str(_ROOT / "benchmarks" / "throughput.py"),
       "--steps=2", "--warmup=0"] + _TINY,
      capture_output=True, text=True, check=False, timeout=600)
  assert completed.returncode == 0, completed.stderr[-3000:]
  lines = completed.stdout.strip().splitlines()
  result = json.loads(lines[-1])
  assert result["image_size"] == 16
  assert result["widths"] == [8, 16, 16]
  assert result["backend"] == "cpu"
  for key in ("train_images_per_second", "score_images_per_second",
              "train_peak_rss_mib", "score_peak_rss_mib",
              "train_gflops_per_step"):
    assert result[key] > 0, key
  assert result["train_compile_seconds"] >= 0
  assert any(line.startswith("train images/s") for line in lines)


def test_throughput_rejects_batch_not_divisible_by_devices():
  # The tests run with two host devices (conftest.py), as the subprocess
  # inherits XLA_FLAGS.
  completed = subprocess.run(
      [sys.executable, str(_ROOT / "benchmarks" / "throughput.py"),
       "--part=score", "--steps=1", "--warmup=0"] + _TINY + [
           "--config.eval.batch_size=3"],
      capture_output=True, text=True, check=False, timeout=600)
  assert completed.returncode != 0
  assert "--config.eval.batch_size=3 must be divisible" in completed.stderr


def test_eval_memory_prints_figures_of_each_phase(tmp_path):
  # Temporary folders go under tmp_path, to check that the script removes
  # its own.
  temp_dir = tmp_path / "tmp"
  temp_dir.mkdir()
  completed = subprocess.run(
      [sys.executable, str(_ROOT / "benchmarks" / "eval_memory.py"),
       "--num_images=12", "--config.eval.num_panels=2"] + _TINY,
      capture_output=True, text=True, check=False, timeout=600,
      env={**os.environ, "TMPDIR": str(temp_dir)})
  assert completed.returncode == 0, completed.stderr[-3000:]
  lines = completed.stdout.strip().splitlines()
  result = json.loads(lines[-1])

  assert result["num_test_images"] == 12
  assert result["image_size"] == 16
  assert result["heatmap_size"] == 32
  assert result["num_panels"] == 2
  assert result["phase_peak_method"] == "VmHWM reset per phase"
  for phase in ("setup", "scoring", "metrics", "threshold", "panels"):
    assert 0 < result[f"{phase}_peak_rss_mib"] <= result["peak_rss_mib"], phase
    assert result[f"{phase}_seconds"] > 0, phase
  assert result["images_per_second"] > 0
  # 12 heat maps of 32 x 32 float32 pixels, and the display images (32 x 32
  # x 3 bytes) of the first 2 images of each of the 4 test folders.
  assert result["kept_mib_by_array"]["heatmaps"] == 12 * 32 * 32 * 4 / 2**20
  assert result["kept_mib_by_array"]["display"] == 8 * 32 * 32 * 3 / 2**20
  assert 0 <= result["metrics"]["pixel_auroc"] <= 1
  assert any(line.startswith("scoring ") for line in lines)
  # TFDS may leave temporary folders of its own there.
  assert not [path.name for path in temp_dir.iterdir()
              if path.name.startswith("eval_memory_")]


def test_eval_memory_rejects_single_image():
  completed = subprocess.run(
      [sys.executable, str(_ROOT / "benchmarks" / "eval_memory.py"),
       "--num_images=1"],
      capture_output=True, text=True, check=False, timeout=120)
  assert completed.returncode != 0
  assert "--num_images=1 must be >= 2" in completed.stderr


def test_compare_reference_rejects_folder_without_unet(tmp_path):
  completed = subprocess.run(
      [sys.executable, str(_ROOT / "benchmarks" / "compare_reference.py"),
       f"--reference-repo={tmp_path}"],
      capture_output=True, text=True, check=False, timeout=120)
  assert completed.returncode != 0
  assert "unet_model.py does not exist" in completed.stderr


@pytest.mark.parametrize("flag", ["--image-size=0", "--steps=0"])
def test_compare_reference_rejects_invalid_sizes(flag):
  completed = subprocess.run(
      [sys.executable, str(_ROOT / "benchmarks" / "compare_reference.py"),
       "--reference-repo=.", flag],
      capture_output=True, text=True, check=False, timeout=120)
  assert completed.returncode == 2
  assert "must be >= 1" in completed.stderr


def test_compare_layers_times_every_conv_of_the_unet():
  pytest.importorskip("torch")
  completed = subprocess.run(
      [sys.executable, str(_ROOT / "benchmarks" / "compare_layers.py"),
       "--image-size=8", "--widths=8,16", "--num-groups=4", "--batch-size=2",
       "--steps=1", "--warmup=0", "--rounds=1"],
      capture_output=True, text=True, check=False, timeout=600)
  assert completed.returncode == 0, completed.stderr[-3000:]
  lines = completed.stdout.strip().splitlines()
  result = json.loads(lines[-1])
  names = [layer["name"] for layer in result["layers"]]
  assert names == ["inc.conv0", "inc.conv1", "down1.conv0", "down1.conv1",
                   "up1.conv0", "up1.conv1"]
  assert result["layers"][4]["in_channels"] == 24
  assert result["layers"][4]["out_channels"] == 12
  for key in ("conv_ratio", "norm_ratio", "total_ratio", "jax_conv_ms",
              "torch_norm_ms"):
    assert result[key] > 0, key
  assert lines[-2].startswith("sum")


@pytest.mark.parametrize("flags, message", [
    (["--image-size=10", "--widths=8,16,16"], "must be divisible by 4"),
    (["--widths=8,12", "--num-groups=8"], "does not divide the 12 channels"),
    (["--widths=8,x"], "not a comma-separated list"),
])
def test_compare_layers_rejects_invalid_shapes(flags, message):
  completed = subprocess.run(
      [sys.executable, str(_ROOT / "benchmarks" / "compare_layers.py")] + flags,
      capture_output=True, text=True, check=False, timeout=120)
  assert completed.returncode == 2
  assert message in completed.stderr
