"""Tests of the MVTec AD builder on the tiny fake copy of conftest.mvtec_dir."""

import pathlib
import re

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from tfds_builders import layout
from tfds_builders.mvtec_ad import mvtec_ad_dataset_builder as mvtec

TEST_FILE_NAMES = {
    "test/good/000.png",
    "test/good/001.png",
    "test/crack/000.png",
    "test/crack/001.png",
    "test/scratch/000.png",
}


def _build(manual_dir, data_dir, category="bottle"):
  builder = mvtec.MvtecAd(
      data_dir=str(data_dir), config=category, file_format="array_record"
  )
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
  )
  return builder


def _read_split(builder, split):
  source = builder.as_data_source(split=split)
  examples = [source[index] for index in range(len(source))]
  return {example["file_name"].decode(): example for example in examples}


def _read_png(path):
  return np.asarray(Image.open(path))


def test_build_rgb_category_reads_back(mvtec_dir, tmp_path):
  builder = _build(mvtec_dir, tmp_path / "data")
  train = _read_split(builder, "train")
  test = _read_split(builder, "test")

  assert set(train) == {f"train/good/{index:03d}.png" for index in range(5)}
  assert set(test) == TEST_FILE_NAMES
  assert builder.info.metadata["manual_dir"] == layout.normalize_dir(mvtec_dir)

  for file_name, example in {**train, **test}.items():
    source_pixels = _read_png(mvtec_dir / "bottle" / file_name)
    assert example["image"].dtype == np.uint8
    np.testing.assert_array_equal(example["image"], source_pixels)
    assert example["mask"].shape == (24, 24, 1)
    assert example["mask"].dtype == np.uint8

    defect_type = file_name.split("/")[1]
    assert example["defect_type"].decode() == defect_type
    if defect_type == "good":
      assert example["label"] == 0
      assert not example["mask"].any()
    else:
      assert example["label"] == 1
      expected_mask = np.zeros((24, 24, 1), np.uint8)
      expected_mask[2:8, 3:10] = 255
      np.testing.assert_array_equal(example["mask"], expected_mask)


def test_build_grayscale_category_gives_3_channels(mvtec_dir, tmp_path):
  builder = _build(mvtec_dir, tmp_path / "data", category="grid")
  test = _read_split(builder, "test")

  assert set(test) == TEST_FILE_NAMES
  for file_name, example in test.items():
    gray = _read_png(mvtec_dir / "grid" / file_name)
    assert example["image"].shape == (20, 28, 3)
    for channel in range(3):
      np.testing.assert_array_equal(example["image"][..., channel], gray)
    assert example["mask"].shape == (20, 28, 1)
    assert set(np.unique(example["mask"])) <= {0, 255}

  # The scratch mask is stored as 1 on disk and must come back as 255.
  scratch_mask = test["test/scratch/000.png"]["mask"]
  assert scratch_mask[2:8, 3:10].min() == 255
  assert scratch_mask.sum() == 255 * 6 * 7


def test_build_skips_hidden_non_images(mvtec_dir, tmp_path):
  (mvtec_dir / "bottle" / "train" / "good" / ".DS_Store").write_bytes(b"\0\1")
  (mvtec_dir / "bottle" / "test" / "crack" / "._000.png").write_bytes(b"\0\1")
  builder = _build(mvtec_dir, tmp_path / "data")

  assert builder.info.splits["train"].num_examples == 5
  assert builder.info.splits["test"].num_examples == 5


def test_manual_download_instructions_name_homepage():
  assert mvtec.HOMEPAGE in mvtec.MvtecAd.MANUAL_DOWNLOAD_INSTRUCTIONS
  assert "ground_truth/<defect>/<name>_mask.png" in (
      mvtec.MvtecAd.MANUAL_DOWNLOAD_INSTRUCTIONS
  )


def test_configs_cover_all_categories():
  names = [config.name for config in mvtec.MvtecAd.BUILDER_CONFIGS]
  assert names == list(mvtec.CATEGORIES)
  assert len(names) == 15


def test_unknown_category_lists_valid_ones(mvtec_dir):
  with pytest.raises(layout.DatasetLayoutError, match="'bottel'") as info:
    mvtec.index_category(mvtec_dir, "bottel")
  assert "bottle, cable, capsule" in str(info.value)
  assert "zipper" in str(info.value)


# Each function below breaks the fake copy at `root` in one way and returns
# the manual_dir to build from.


def _missing_manual_dir(root):
  return root.parent / "missing"


def _empty_manual_dir(root):
  empty = root.parent / "empty"
  empty.mkdir()
  return empty


def _category_dir_as_manual_dir(root):
  return root / "grid"


def _parent_as_manual_dir(root):
  return root.parent


def _missing_mask(root):
  (root / "bottle" / "ground_truth" / "crack" / "001_mask.png").unlink()
  return root


def _corrupt_image(root):
  (root / "bottle" / "test" / "good" / "001.png").write_bytes(b"not a png")
  return root


def _corrupt_mask(root):
  path = root / "bottle" / "ground_truth" / "scratch" / "000_mask.png"
  path.write_bytes(b"not a png")
  return root


def _small_mask(root):
  path = root / "bottle" / "ground_truth" / "crack" / "000_mask.png"
  Image.open(path).resize((12, 10)).save(path)
  return root


def _hidden_image(root):
  Image.new("RGB", (4, 4)).save(root / "bottle" / "train" / "good" / ".x.png")
  return root


def _train_defect_folder(root):
  (root / "bottle" / "train" / "crack").mkdir()
  return root


def _nested_folder(root):
  (root / "bottle" / "test" / "crack" / "more").mkdir()
  return root


def _empty_defect_folder(root):
  (root / "bottle" / "test" / "hole").mkdir()
  return root


def _missing_test_folder(root):
  (root / "bottle" / "test").rename(root / "bottle" / "tst")
  return root


# (function that breaks the copy, regex that the error message must match).
BAD_INPUTS = {
    "manual_dir_missing": (
        _missing_manual_dir,
        r"manual_dir \S*/missing does not exist",
    ),
    "manual_dir_empty": (
        _empty_manual_dir,
        r"manual_dir \S*/empty is empty",
    ),
    "category_folder_missing": (
        _category_dir_as_manual_dir,
        r"Category folder \S*/mvtec/grid/bottle is missing.*looks like a "
        "category folder itself",
    ),
    "category_folder_one_level_down": (
        _parent_as_manual_dir,
        r"Category folder \S*/bottle is missing.*set manual_dir to \S*/mvtec",
    ),
    "mask_missing": (
        _missing_mask,
        r"Anomalous image \S*/bottle/test/crack/001.png has no mask: "
        r"\S*/bottle/ground_truth/crack/001_mask.png is missing",
    ),
    "corrupt_image": (
        _corrupt_image,
        r"Failed to read image \S*/bottle/test/good/001.png",
    ),
    "corrupt_mask": (
        _corrupt_mask,
        r"Failed to read image \S*/bottle/ground_truth/scratch/000_mask.png",
    ),
    "mask_size_differs": (
        _small_mask,
        r"Mask \S*/ground_truth/crack/000_mask.png is 12x10 .* but its image "
        r"\S*/test/crack/000.png is 24x24",
    ),
    "hidden_image": (
        _hidden_image,
        r"Hidden image file \S*/train/good/.x.png",
    ),
    "train_folder_not_good": (
        _train_defect_folder,
        r"Unexpected folder \S*/bottle/train/crack",
    ),
    "nested_folder": (
        _nested_folder,
        r"Unexpected folder \S*/test/crack/more",
    ),
    "defect_folder_empty": (
        _empty_defect_folder,
        r"Folder \S*/test/hole contains no images",
    ),
    "test_folder_missing": (
        _missing_test_folder,
        r"Folder \S*/bottle/test is missing",
    ),
}


@pytest.mark.parametrize(
    "break_copy, pattern",
    list(BAD_INPUTS.values()),
    ids=list(BAD_INPUTS),
)
def test_bad_input_raises_before_writing(
    mvtec_dir, tmp_path, break_copy, pattern
):
  manual_dir = break_copy(mvtec_dir)
  data_dir = tmp_path / "data"

  with pytest.raises(layout.DatasetLayoutError, match=pattern) as info:
    _build(manual_dir, data_dir)

  message = str(info.value)
  assert mvtec.HOMEPAGE in message
  assert "Expected layout of MVTec AD" in message
  assert not data_dir.exists() or not any(data_dir.rglob("*"))


def test_truncated_image_fails_with_path(mvtec_dir, tmp_path):
  # The header is intact, so the early check passes and decoding fails.
  path = mvtec_dir / "bottle" / "test" / "good" / "000.png"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])

  with pytest.raises(
      layout.DatasetLayoutError,
      match=re.escape(f"Failed to decode image {path}"),
  ):
    _build(mvtec_dir, tmp_path / "data")


def test_prepared_copy_is_reused_without_manual_dir(mvtec_dir, tmp_path):
  data_dir = tmp_path / "data"
  _build(mvtec_dir, data_dir)
  builder = _build(pathlib.Path(tmp_path / "gone"), data_dir)

  assert builder.info.splits["test"].num_examples == 5
