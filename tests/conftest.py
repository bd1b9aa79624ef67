"""Shared pytest fixtures."""

import atexit
import os
import pathlib
import shutil
import sys
import tempfile

# Two host devices let the tests check pmap against a single device. This
# must be set before JAX initializes its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the whole session, shared with the
# subprocesses that tests start: many tests build the same tiny model, and
# compiling its initialization alone takes about 15 s on 2 CPU cores.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="sprs-jax-test-xla-cache-")
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import numpy as np
from PIL import Image
import pytest

# Lets tests import the repository's packages when pytest runs from any folder.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _write_png(path: pathlib.Path, pixels: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels).save(path)


def _write_mvtec_category(
    category_dir: pathlib.Path,
    rng: np.random.Generator,
    shape: tuple[int, ...],
) -> None:
  """Writes train/good (5), test/good (2), test/crack (2), test/scratch (1).

  Crack masks are 255 on rows 2..7 and columns 3..9. The scratch mask is 1 on
  the same rectangle, to test that any non-zero value counts as anomalous.
  """
  for index in range(5):
    _write_png(
        category_dir / "train" / "good" / f"{index:03d}.png",
        rng.integers(0, 256, shape, dtype=np.uint8),
    )

  test_images = {"good": 2, "crack": 2, "scratch": 1}
  mask_values = {"crack": 255, "scratch": 1}
  for defect_type, count in test_images.items():
    for index in range(count):
      _write_png(
          category_dir / "test" / defect_type / f"{index:03d}.png",
          rng.integers(0, 256, shape, dtype=np.uint8),
      )
      if defect_type == "good":
        continue
      mask = np.zeros(shape[:2], np.uint8)
      mask[2:8, 3:10] = mask_values[defect_type]
      _write_png(
          category_dir / "ground_truth" / defect_type / f"{index:03d}_mask.png",
          mask,
      )


@pytest.fixture
def mvtec_dir(tmp_path: pathlib.Path) -> pathlib.Path:
  """Returns a fake MVTec AD folder in the real layout.

  It has two categories: "bottle" with RGB images of 24x24 pixels, and "grid"
  with grayscale images of 28 (width) x 20 (height) pixels. Each has 5 train
  images and 5 test images: 2 good, 2 crack and 1 scratch.
  """
  root = tmp_path / "mvtec"
  rng = np.random.default_rng(0)
  _write_mvtec_category(root / "bottle", rng, (24, 24, 3))
  _write_mvtec_category(root / "grid", rng, (20, 28))
  return root
