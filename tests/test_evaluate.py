"""Tests of panel selection and of scoring a whole test split."""

import jax
import numpy as np
import pytest

from configs import demo
from sprs_jax import evaluate
from sprs_jax import input_pipeline
from sprs_jax import model as model_lib
from sprs_jax import train

NUM_EXAMPLES = 30
DEFECT_TYPES = ("good", "good", "scratch")


def _tiny_config(seed=0, batch_size=20):
  """Returns the demo recipe shrunk to 16-pixel images and a 3-level U-Net."""
  config = demo.get_config("gravel")
  config.seed = seed
  config.data.image_size = 16
  config.model.widths = (8, 16, 16)
  config.model.num_groups = 4
  config.model.embed_dim = 16
  config.eval.heatmap_size = 32
  config.eval.filter_size = 5
  config.eval.num_draws = 2
  config.eval.batch_size = batch_size
  config.eval.num_panels = 4
  return config


def _fake_source():
  """Returns 30 examples of random 16x16 images, a third of them anomalous."""
  rng = np.random.default_rng(0)
  source = []
  for index in range(NUM_EXAMPLES):
    defect_type = DEFECT_TYPES[index % len(DEFECT_TYPES)]
    mask = np.zeros((16, 16, 1), np.uint8)
    if defect_type != "good":
      mask[4:9, 5:11] = 255
    source.append({
        "image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
        "mask": mask,
        "label": int(defect_type != "good"),
        "defect_type": defect_type.encode(),
        "file_name": f"test/{defect_type}/{index:03d}.png".encode(),
    })
  return source


@pytest.fixture(scope="module")
def params():
  """Returns freshly initialized (untrained) EMA params of the tiny model."""
  config = _tiny_config()
  model = model_lib.create_model(config.model, config.sde.sigma_max)
  optimizer = train.create_optimizer(config.training, 1)
  state = train.create_train_state(
      jax.random.key(0), model, optimizer, config.data.image_size)
  return state.ema_params


@pytest.fixture(scope="module")
def reference(params):
  """Returns score_split's outputs with seed 0 and eval batches of 20."""
  return evaluate.score_split(_tiny_config(), params, _fake_source())


def test_select_panels_round_robin():
  defect_types = ["good", "good", "scratch", "hole", "scratch", "good", "hole"]
  # Sorted types: good [0, 1, 5], hole [3, 6], scratch [2, 4]. The first round
  # takes 0, 3 and 2, and the second round starts with good again.
  assert evaluate.select_panel_indices(defect_types, 4) == [0, 1, 2, 3]


def test_select_panels_one_per_type():
  defect_types = ["crack", "crack", "good", "good", "hole", "crack"]
  chosen = evaluate.select_panel_indices(defect_types, 3)
  assert sorted(defect_types[index] for index in chosen) == [
      "crack", "good", "hole"]


def test_select_panels_more_than_available():
  defect_types = ["hole", "good", "hole"]
  assert evaluate.select_panel_indices(defect_types, 10) == [0, 1, 2]


def test_select_panels_sorted():
  defect_types = ["scratch", "good", "crack", "good"]
  assert evaluate.select_panel_indices(defect_types, 3) == [0, 1, 2]


def test_select_panels_none_requested():
  assert evaluate.select_panel_indices(["good", "hole"], 0) == []


def test_select_panels_empty_split():
  assert evaluate.select_panel_indices([], 4) == []


def test_score_split_shapes_and_order(reference):
  assert reference["heatmaps"].shape == (NUM_EXAMPLES, 32, 32)
  assert reference["heatmaps"].dtype == np.float32
  assert reference["scores"].shape == (NUM_EXAMPLES,)
  assert reference["masks"].shape == (NUM_EXAMPLES, 32, 32)
  assert np.isfinite(reference["heatmaps"]).all()

  expected_names = [example["file_name"].decode()
                    for example in _fake_source()]
  assert reference["file_names"] == expected_names
  expected_labels = [example["label"] for example in _fake_source()]
  np.testing.assert_array_equal(reference["labels"], expected_labels)
  # The image score is the maximum of the heat map.
  np.testing.assert_allclose(reference["scores"],
                             reference["heatmaps"].max(axis=(1, 2)))


def test_score_split_keeps_display_of_panel_candidates(reference):
  # num_panels is 4: the first 4 images of each defect type keep their
  # display image, here indices 0, 1, 3, 4 (good) and 2, 5, 8, 11 (scratch).
  display = reference["display"]
  assert sorted(display) == [0, 1, 2, 3, 4, 5, 8, 11]
  for index, picture in display.items():
    assert picture.shape == (32, 32, 3)
    assert picture.dtype == np.uint8
    expected = input_pipeline.resize_image(
        _fake_source()[index]["image"], 32)
    np.testing.assert_array_equal(picture, expected)

  chosen = evaluate.select_panel_indices(reference["defect_types"], 4)
  assert set(chosen) <= set(display)


def test_score_split_same_seed_same_maps(params, reference):
  again = evaluate.score_split(_tiny_config(), params, _fake_source())
  np.testing.assert_array_equal(again["heatmaps"], reference["heatmaps"])
  np.testing.assert_array_equal(again["scores"], reference["scores"])


def test_score_split_independent_of_batch_size(params, reference):
  # 30 examples fill three batches of 10. Batches of 20 are one full batch
  # and one padded with 10 copies.
  smaller = evaluate.score_split(
      _tiny_config(batch_size=10), params, _fake_source())
  np.testing.assert_allclose(smaller["heatmaps"], reference["heatmaps"],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(smaller["scores"], reference["scores"],
                             rtol=1e-5, atol=1e-6)
  assert smaller["file_names"] == reference["file_names"]


def test_score_split_independent_of_order(params, reference):
  reversed_source = _fake_source()[::-1]

  outputs = evaluate.score_split(_tiny_config(), params, reversed_source)

  np.testing.assert_allclose(outputs["scores"], reference["scores"][::-1],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(outputs["heatmaps"], reference["heatmaps"][::-1],
                             rtol=1e-5, atol=1e-6)


def test_score_split_seed_changes_maps(params, reference):
  other = evaluate.score_split(_tiny_config(seed=1), params, _fake_source())
  assert not np.allclose(other["heatmaps"], reference["heatmaps"])


def test_score_split_rejects_uneven_batch(params):
  assert jax.local_device_count() == 2, "conftest forces 2 host devices"
  with pytest.raises(ValueError, match="eval.batch_size=3"):
    evaluate.score_split(_tiny_config(batch_size=3), params, _fake_source())


def test_device_scorer_matches_score_split(params, reference):
  config = _tiny_config()
  source = _fake_source()[:4]
  pixels = np.stack([
      input_pipeline.resize_image(example["image"], 16) for example in source])
  images = input_pipeline.to_model_range(pixels)
  keys = evaluate.image_noise_keys(config.seed, pixels)

  heatmaps, scores = evaluate.make_device_scorer(config, params)(images, keys)

  assert heatmaps.shape == (4, 32, 32)
  assert scores.shape == (4,)
  np.testing.assert_allclose(heatmaps, reference["heatmaps"][:4],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scores, reference["scores"][:4],
                             rtol=1e-5, atol=1e-6)


def test_panels_restore_aspect_ratio():
  display = np.zeros((32, 32, 3), np.uint8)
  mask = np.zeros((32, 32), np.uint8)
  mask[:, 16:] = 1
  heatmap = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))

  wide = evaluate._restore_aspect_ratio(display, mask, heatmap, (600, 800))

  assert wide[0].shape == (32, 43, 3)
  assert wide[1].shape == (32, 43)
  assert wide[2].shape == (32, 43)
  # The mask's right half stays the right half after stretching.
  assert wide[1][:, :21].max() == 0
  assert wide[1][:, 22:].min() == 1


def test_panels_square_photo_unchanged():
  display = np.zeros((32, 32, 3), np.uint8)
  mask = np.zeros((32, 32), np.uint8)
  heatmap = np.zeros((32, 32), np.float32)

  same = evaluate._restore_aspect_ratio(display, mask, heatmap, (100, 100))

  assert same[0] is display
  assert same[1] is mask
  assert same[2] is heatmap
