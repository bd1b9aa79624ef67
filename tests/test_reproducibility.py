"""Reproducibility of training and evaluation with a fixed seed.

On one machine, with the same package versions and device count, the same
seed must give bit-identical params and metrics. Another seed must give other
scores. The runs train the tiny model of test_run.py for 3 steps on a fake
MVTec AD category and evaluate it, in this process on the 2 host devices
that conftest.py forces, so the three runs share compiled programs.
"""

import json

import jax
import numpy as np
import pytest

import anomaly_trees
import saved_states
from configs import mvtec
from sprs_jax import run_lib
from test_run import METRIC_KEYS
from test_run import OVERRIDES
from test_run import TIME_KEYS

CATEGORY = anomaly_trees.SPECS["mvtec_ad"].category
# Every number of a metrics.json entry that does not measure time.
SCORE_KEYS = METRIC_KEYS + ("f1_threshold", "num_test_images")


def _config(root, seed):
  """Returns the tiny config for 3 training steps (3 images, batch 8)."""
  config = mvtec.get_config(CATEGORY)
  config.update_from_flattened_dict({
      "data.manual_dir": str(root / "manual"),
      "data.data_dir": str(root / "data"),
      **OVERRIDES,
      "training.num_epochs": 3,
      "seed": seed,
  })
  return config


def _read_json(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Returns {name: workdir} of runs "first" and "again" (seed 0), "seed1"."""
  root = tmp_path_factory.mktemp("reproducibility")
  anomaly_trees.write_category(root / "manual",
                               anomaly_trees.SPECS["mvtec_ad"])
  workdirs = {}
  for name, seed in (("first", 0), ("again", 0), ("seed1", 1)):
    workdirs[name] = root / name
    run_lib.run(_config(root, seed), str(workdirs[name]), "train_and_evaluate")
  return workdirs


def test_same_seed_same_metrics(runs):
  first = _read_json(runs["first"] / "metrics.json")
  again = _read_json(runs["again"] / "metrics.json")

  assert sorted(first) == sorted(again) == [CATEGORY]
  for key in SCORE_KEYS:
    assert again[CATEGORY][key] == first[CATEGORY][key], key
  # Only the timings may differ between the two files.
  assert set(first[CATEGORY]) == set(SCORE_KEYS + TIME_KEYS)


def test_same_seed_same_threshold_file(runs):
  first = _read_json(runs["first"] / CATEGORY / "threshold.json")
  again = _read_json(runs["again"] / CATEGORY / "threshold.json")
  assert again == first


def test_same_seed_same_params(runs):
  config = _config(runs["first"].parent, 0)
  first = saved_states.restore_latest(config, runs["first"] / CATEGORY)[0]
  again = saved_states.restore_latest(config, runs["again"] / CATEGORY)[0]

  assert int(first.step) == int(again.step) == 3
  for tree_name in ("params", "ema_params"):
    first_leaves = jax.tree_util.tree_leaves_with_path(
        getattr(first, tree_name))
    again_leaves = jax.tree_util.tree_leaves(getattr(again, tree_name))
    for (path, a), b in zip(first_leaves, again_leaves):
      np.testing.assert_array_equal(
          a, b, err_msg=f"{tree_name}{jax.tree_util.keystr(path)}")


def test_other_seed_other_scores(runs):
  first = _read_json(runs["first"] / CATEGORY / "threshold.json")
  other = _read_json(runs["seed1"] / CATEGORY / "threshold.json")

  # Image scores are continuous, so any change of the model or of the
  # scoring noise moves the score range of the test split.
  for key in ("score_min", "score_max"):
    assert other[key] != first[key], key
  metrics = _read_json(runs["first"] / "metrics.json")[CATEGORY]
  other_metrics = _read_json(runs["seed1"] / "metrics.json")[CATEGORY]
  assert other_metrics["f1_threshold"] != metrics["f1_threshold"]
