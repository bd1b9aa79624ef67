"""Tests of the BTAD builder, its config file and its non-square product.

`test_folder_layouts.py` covers the folder cases that BTAD shares with the
other builders in the MVTec AD layout.
"""

import dataclasses

import ml_collections
import numpy as np
import pytest

import anomaly_trees
from configs import btad as btad_config
from sprs_jax import input_pipeline
from sprs_jax import run_lib
from tfds_builders import layout
from tfds_builders.btad import btad_dataset_builder as btad

# Product -> (image suffix, mask name, (width, height)). Formats and sizes
# vary between products as in BTAD, in combinations chosen for the test.
PRODUCTS = {
    "01": (".bmp", "{stem}.png", (8, 8)),
    "02": (".png", "{stem}.png", (6, 6)),
    "03": (".bmp", "{stem}.bmp", (8, 6)),
}


def _write_products(root):
  """Writes the three products under `root` and returns {product: Tree}."""
  trees = {}
  for product, (image_suffix, mask_name, size) in PRODUCTS.items():
    spec = dataclasses.replace(
        anomaly_trees.SPECS["btad"], category=product,
        image_suffix=image_suffix, mask_name_format=mask_name,
    )
    trees[product] = anomaly_trees.write_category(root, spec, size=size)
  return trees


@pytest.fixture
def btad_trees(tmp_path):
  return _write_products(tmp_path / "btad")


def _data_config(manual_dir, data_dir, category):
  config = ml_collections.ConfigDict()
  config.name = "btad"
  config.category = category
  config.manual_dir = str(manual_dir)
  config.data_dir = str(data_dir)
  return config


def test_configs_are_products():
  names = [config.name for config in btad.Btad.BUILDER_CONFIGS]
  assert names == ["01", "02", "03"]


@pytest.mark.parametrize("product", list(PRODUCTS))
def test_build_product_keeps_size_and_format(btad_trees, tmp_path, product):
  tree = btad_trees[product]
  image_suffix, _, (width, height) = PRODUCTS[product]
  builder = anomaly_trees.build(tree, tmp_path / "data")
  train = anomaly_trees.read_split(builder, "train")
  test = anomaly_trees.read_split(builder, "test")

  assert set(train) == {f"train/ok/{i:03d}{image_suffix}" for i in range(3)}
  assert set(test) == {
      f"test/{folder}/{i:03d}{image_suffix}"
      for folder in ("ok", "ko") for i in range(2)
  }
  for file_name, example in {**train, **test}.items():
    source = anomaly_trees.read_pixels(tree.category_dir / file_name)
    np.testing.assert_array_equal(example["image"], source)
    assert example["image"].shape == (height, width, 3)

    is_anomalous = file_name.startswith("test/ko/")
    assert example["label"] == int(is_anomalous)
    assert example["defect_type"].decode() == (
        "ko" if is_anomalous else "good"
    )
    expected_mask = anomaly_trees.expected_mask((width, height))
    if not is_anomalous:
      expected_mask = np.zeros_like(expected_mask)
    np.testing.assert_array_equal(example["mask"], expected_mask)


def test_non_square_product_resized_to_square(btad_trees, tmp_path):
  data_config = _data_config(
      btad_trees["03"].manual_dir, tmp_path / "data", category="03"
  )
  source = input_pipeline.load_split(data_config, "test")
  batch = next(input_pipeline.eval_batches(
      source, image_size=4, heatmap_size=4, batch_size=4
  ))

  assert source[0]["image"].shape == (6, 8, 3)
  assert batch["image"].shape == (4, 4, 4, 3)
  assert batch["mask"].shape == (4, 4, 4)
  assert batch["display"].shape == (4, 4, 4, 3)

  # MASK_BOX covers rows 1-3 of 6 and columns 2-5 of 8. Output pixel i takes
  # source row (i + 0.5) * 1.5 and source column (i + 0.5) * 2, rounded down.
  expected = np.zeros((4, 4), np.uint8)
  expected[1:3, 1:3] = 1
  anomalous = batch["label"] == 1
  assert anomalous.sum() == 2
  for mask in batch["mask"][anomalous]:
    np.testing.assert_array_equal(mask, expected)


def test_config_file_selects_product():
  config = btad_config.get_config("03")

  assert config.data.name == "btad"
  assert config.data.category == "03"
  assert btad_config.get_config().data.category == "01"
  assert run_lib.resolve_categories(config.data) == ["03"]


def test_config_file_all_runs_every_product():
  config = btad_config.get_config("all")

  assert run_lib.resolve_categories(config.data) == ["01", "02", "03"]


def test_get_builder_returns_btad(tmp_path):
  data_config = _data_config("", tmp_path, category="02")
  builder = input_pipeline.get_builder(data_config)

  assert isinstance(builder, btad.Btad)
  assert builder.builder_config.name == "02"


def test_unknown_product_lists_valid_ones(btad_trees):
  with pytest.raises(layout.DatasetLayoutError, match="'04'") as info:
    btad.index_category(btad_trees["01"].manual_dir, "04")
  assert "Valid categories: 01, 02, 03." in str(info.value)


def test_manual_download_instructions_name_download():
  instructions = btad.Btad.MANUAL_DOWNLOAD_INSTRUCTIONS
  assert btad.DOWNLOAD_URL in instructions
  assert "ground_truth/ko/<name>.png" in instructions
