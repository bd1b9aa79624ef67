"""Tests of the embedded spr_textures demo data set and its synthesis."""

import collections

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
import pytest

from tfds_builders.spr_textures import (
    spr_textures_dataset_builder as builder_lib)
from tfds_builders.spr_textures import synthesis

CATEGORY = "gravel"
CROP = synthesis.CROP_SIZE
DEFECT_TYPES = ("scratch", "hole", "stain", "contamination")


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
  """Builds the gravel category once and returns {file name: example}."""
  builder = builder_lib.SprTextures(
      data_dir=str(tmp_path_factory.mktemp("data")),
      config=CATEGORY,
      file_format="array_record",
  )
  builder.download_and_prepare()
  by_name = {}
  for split in ("train", "test"):
    source = builder.as_data_source(split=split)
    for index in range(len(source)):
      example = dict(source[index])
      example["split"] = split
      example["defect_type"] = example["defect_type"].decode()
      example["file_name"] = example["file_name"].decode()
      by_name[example["file_name"]] = example
  return by_name


@pytest.fixture(scope="module")
def photograph():
  return synthesis.load_photograph(synthesis.PHOTOGRAPHS[CATEGORY][0])


def _select(examples, split, defect_type):
  return [example for _, example in sorted(examples.items())
          if example["split"] == split
          and example["defect_type"] == defect_type]


def _locate(photograph, crop, unchanged):
  """Returns every (top, left) where the photograph matches the crop.

  Only the pixels where `unchanged` is True have to match. The candidates
  come from one fully unchanged row of the crop, compared with every
  128-pixel window of every photograph row.
  """
  row = int(np.flatnonzero(unchanged.all(axis=1))[0])
  windows = sliding_window_view(photograph, CROP, axis=1)
  ys, lefts = np.nonzero((windows == crop[row]).all(axis=-1))
  found = []
  for y, left in zip(ys, lefts):
    top = int(y) - row
    if not 0 <= top <= photograph.shape[0] - CROP:
      continue
    original = photograph[top:top + CROP, left:left + CROP]
    if np.array_equal(original[unchanged], crop[unchanged]):
      found.append((top, int(left)))
  return found


def test_split_sizes(examples):
  counts = collections.Counter(
      (example["split"], example["defect_type"])
      for example in examples.values())
  assert counts == {
      ("train", "good"): 160,
      ("test", "good"): 40,
      ("test", "scratch"): 15,
      ("test", "hole"): 15,
      ("test", "stain"): 15,
      ("test", "contamination"): 15,
  }


def test_labels_match_defect_type(examples):
  for name, example in examples.items():
    expected = int(example["defect_type"] != "good")
    assert example["label"] == expected, name


def test_masks_mark_anomalous_images_only(examples):
  for name, example in examples.items():
    mask = example["mask"]
    assert mask.shape == (CROP, CROP, 1), name
    assert set(np.unique(mask)) <= {0, 255}, name
    if example["defect_type"] == "good":
      assert not mask.any(), name
    else:
      assert mask.any(), name


def test_images_are_rgb_uint8(examples):
  for name, example in examples.items():
    assert example["image"].dtype == np.uint8, name
    assert example["image"].shape == (CROP, CROP, 3), name


def test_file_names_unique(examples):
  # The fixture keys examples by file name, so a duplicate would shrink it.
  assert len(examples) == 260
  for name, example in examples.items():
    prefix = f"{example['split']}/{example['defect_type']}/"
    assert name.startswith(prefix), name


def test_builder_stores_generator_output(examples):
  generated = list(synthesis.generate_category(CATEGORY, seed=0))
  assert len(generated) == len(examples)
  for split, defect_type, index, image, mask in generated:
    name = f"{split}/{defect_type}/{index:03d}.png"
    np.testing.assert_array_equal(examples[name]["image"], image)
    np.testing.assert_array_equal(examples[name]["mask"][..., 0] > 0, mask)


@pytest.mark.parametrize("split, rows", [("train", (0, 320)),
                                         ("test", (320, 512))])
def test_normal_crops_lie_in_band(examples, photograph, split, rows):
  normal = _select(examples, split, "good")
  for example in normal[::len(normal) // 8]:
    image = example["image"]
    gray = image[..., 0]
    np.testing.assert_array_equal(image[..., 1], gray)
    np.testing.assert_array_equal(image[..., 2], gray)

    locations = _locate(photograph, gray, np.ones_like(gray, bool))
    assert len(locations) == 1, example["file_name"]
    top, _ = locations[0]
    assert top >= rows[0], example["file_name"]
    assert top + CROP <= rows[1], example["file_name"]


@pytest.mark.parametrize("defect_type", DEFECT_TYPES)
def test_anomalous_crops_change_masked_pixels(examples, photograph,
                                              defect_type):
  for example in _select(examples, "test", defect_type)[:3]:
    name = example["file_name"]
    image = example["image"]
    mask = example["mask"][..., 0] > 0

    locations = _locate(photograph, image[..., 0], ~mask)
    assert len(locations) == 1, name
    top, left = locations[0]
    assert top >= 320, name

    original = photograph[top:top + CROP, left:left + CROP]
    changed = (image != original[..., None]).any(axis=-1)
    assert not changed[~mask].any(), name
    # A painted pixel can equal the photograph by chance, so not all of them
    # have to differ.
    assert changed[mask].mean() > 0.9, name


def test_categories_use_three_photographs():
  assert builder_lib.CATEGORIES == ("brick", "grass", "gravel")
  names = [synthesis.PHOTOGRAPHS[category][0]
           for category in builder_lib.CATEGORIES]
  assert len(set(names)) == 3
  # gravel and grass are irregular textures, brick a regular one.
  assert {"gravel", "grass"} & set(names)

  photographs = [synthesis.load_photograph(name) for name in names]
  for first in range(3):
    for second in range(first + 1, 3):
      assert not np.array_equal(photographs[first], photographs[second])


def test_builder_configs_match_categories():
  names = [config.name for config in builder_lib.SprTextures.BUILDER_CONFIGS]
  assert names == list(builder_lib.CATEGORIES)


def test_generate_category_deterministic():
  first = list(synthesis.generate_category(CATEGORY, seed=3))
  second = list(synthesis.generate_category(CATEGORY, seed=3))
  other_seed = list(synthesis.generate_category(CATEGORY, seed=4))
  assert len(first) == len(second)
  for first_item, second_item in zip(first, second):
    assert first_item[:3] == second_item[:3]
    np.testing.assert_array_equal(first_item[3], second_item[3])
    np.testing.assert_array_equal(first_item[4], second_item[4])
  assert not np.array_equal(first[0][3], other_seed[0][3])


def test_generate_category_rejects_unknown():
  with pytest.raises(ValueError, match="'wood'") as error:
    next(synthesis.generate_category("wood"))
  for category in ("brick", "grass", "gravel"):
    assert category in str(error.value)


@pytest.mark.parametrize("defect_type", DEFECT_TYPES)
@pytest.mark.parametrize("seed", range(4))
def test_paint_defect_changes_masked_pixels(photograph, defect_type, seed):
  crop = photograph[352:352 + CROP, 200:200 + CROP]
  crop = np.repeat(crop[..., None], 3, axis=-1)
  other = synthesis.load_photograph(synthesis.PHOTOGRAPHS[CATEGORY][1])
  rng = np.random.default_rng(seed)

  image, mask = synthesis.paint_defect(
      crop.astype(np.float32), defect_type, other, rng)

  assert image.dtype == np.uint8
  assert mask.shape == (CROP, CROP)
  assert mask.any()
  changed = (image != crop).any(axis=-1)
  np.testing.assert_array_equal(image[~mask], crop[~mask])
  assert changed[mask].mean() > 0.9


def test_paint_defect_rejects_unknown_kind(photograph):
  crop = np.zeros((CROP, CROP, 3), np.float32)
  with pytest.raises(ValueError, match="'dent'"):
    synthesis.paint_defect(crop, "dent", photograph,
                           np.random.default_rng(0))
