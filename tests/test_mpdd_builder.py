"""Tests of the MPDD builder and its config file.

`test_folder_layouts.py` covers the folder cases that MPDD shares with the
other builders in the MVTec AD layout.
"""

import ml_collections
import numpy as np
import pytest

import anomaly_trees
from configs import mpdd as mpdd_config
from sprs_jax import input_pipeline
from sprs_jax import run_lib
from tfds_builders import layout
from tfds_builders.mpdd import mpdd_dataset_builder as mpdd

CATEGORIES = [
    "bracket_black",
    "bracket_brown",
    "bracket_white",
    "connector",
    "metal_plate",
    "tubes",
]


@pytest.fixture
def mpdd_tree(tmp_path):
  return anomaly_trees.write_category(
      tmp_path / "mpdd", anomaly_trees.SPECS["mpdd"]
  )


def test_configs_cover_all_categories():
  names = [config.name for config in mpdd.Mpdd.BUILDER_CONFIGS]
  assert names == CATEGORIES


def test_build_reads_back(mpdd_tree, tmp_path):
  builder = anomaly_trees.build(mpdd_tree, tmp_path / "data")
  test = anomaly_trees.read_split(builder, "test")

  assert builder.info.name == "mpdd"
  assert builder.info.metadata["manual_dir"] == layout.normalize_dir(
      mpdd_tree.manual_dir
  )
  assert set(test) == {
      f"test/{folder}/{i:03d}.png"
      for folder in ("good", "parts_mismatch") for i in range(2)
  }
  anomalous = test["test/parts_mismatch/001.png"]
  assert anomalous["label"] == 1
  assert anomalous["defect_type"].decode() == "parts_mismatch"
  np.testing.assert_array_equal(
      anomalous["mask"], anomaly_trees.expected_mask()
  )


def test_config_file_selects_category():
  config = mpdd_config.get_config("tubes")

  assert config.data.name == "mpdd"
  assert config.data.category == "tubes"
  assert mpdd_config.get_config().data.category == "bracket_black"
  assert run_lib.resolve_categories(config.data) == ["tubes"]


def test_config_file_all_runs_every_category():
  config = mpdd_config.get_config("all")

  assert run_lib.resolve_categories(config.data) == CATEGORIES


def test_get_builder_returns_mpdd(tmp_path):
  data_config = ml_collections.ConfigDict({
      "name": "mpdd", "category": "metal_plate", "data_dir": str(tmp_path),
  })
  builder = input_pipeline.get_builder(data_config)

  assert isinstance(builder, mpdd.Mpdd)
  assert builder.builder_config.name == "metal_plate"


def test_unknown_category_lists_valid_ones(mpdd_tree):
  with pytest.raises(layout.DatasetLayoutError, match="'bracket'") as info:
    mpdd.index_category(mpdd_tree.manual_dir, "bracket")
  assert "bracket_black, bracket_brown" in str(info.value)


def test_manual_download_instructions_name_homepage():
  instructions = mpdd.Mpdd.MANUAL_DOWNLOAD_INSTRUCTIONS
  assert mpdd.HOMEPAGE in instructions
  assert "ground_truth/<defect>/<name>_mask.png" in instructions
