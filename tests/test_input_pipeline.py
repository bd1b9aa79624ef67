"""Tests of the NumPy input pipeline.

Loader and batching tests use in-memory lists of examples. The tests of
`prepare` and `load_split` build the fake MVTec AD copy of conftest.mvtec_dir.
"""

import logging
import math

import jax
import ml_collections
import numpy as np
import pytest

from sprs_jax import input_pipeline
from tfds_builders import layout


def _data_config(manual_dir, data_dir, category="bottle", name="mvtec_ad"):
  config = ml_collections.ConfigDict()
  config.name = name
  config.category = category
  config.manual_dir = str(manual_dir)
  config.data_dir = str(data_dir)
  config.image_size = 16
  return config


def _constant_source(num_examples, size=(6, 10)):
  """Returns examples whose image i is filled with the value 10 * i."""
  return [
      {"image": np.full((*size, 3), 10 * index, np.uint8)}
      for index in range(num_examples)
  ]


def _ids(batch):
  """Returns the source index of every image of a float batch [..., S, S, 3]."""
  images = batch.reshape(-1, *batch.shape[-3:])
  values = (images[:, 0, 0, 0] + 1.0) * 127.5
  return np.rint(values / 10).astype(int).tolist()


def _loader(source, global_batch_size=4, seed=0, **kwargs):
  kwargs.setdefault("process_index", 0)
  kwargs.setdefault("process_count", 1)
  kwargs.setdefault("local_device_count", 1)
  return input_pipeline.TrainLoader(
      source, image_size=8, global_batch_size=global_batch_size, seed=seed,
      **kwargs,
  )


def test_get_builder_unknown_name_lists_choices(tmp_path):
  config = _data_config("", tmp_path, name="mvtec")
  with pytest.raises(ValueError, match="'mvtec'.*mvtec_ad, spr_textures"):
    input_pipeline.get_builder(config)


def test_get_builder_unknown_category_lists_choices(tmp_path):
  config = _data_config("", tmp_path, category="bottel")
  with pytest.raises(ValueError, match="'bottel'.*bottle, cable, .*zipper"):
    input_pipeline.get_builder(config)


def test_get_builder_missing_module_is_named(tmp_path, monkeypatch):
  monkeypatch.setitem(
      input_pipeline.BUILDERS, "fake", "tfds_builders.no_such_module:Fake"
  )
  config = _data_config("", tmp_path, name="fake")
  with pytest.raises(ValueError, match="tfds_builders.no_such_module"):
    input_pipeline.get_builder(config)


def test_get_builder_uses_config(tmp_path):
  builder = input_pipeline.get_builder(_data_config("", tmp_path / "data"))

  assert builder.name == "mvtec_ad"
  assert builder.builder_config.name == "bottle"
  assert str(builder.data_dir).startswith(str(tmp_path / "data"))
  assert not builder.is_prepared()


def test_get_builder_expands_home(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  builder = input_pipeline.get_builder(_data_config("", "~/data"))

  assert str(builder.data_dir).startswith(str(tmp_path / "data"))


def _stale_copy_warnings(caplog):
  """Returns the logged warnings about a copy built from another manual_dir."""
  return [
      record.getMessage()
      for record in caplog.records
      if record.levelno == logging.WARNING
      and "although manual_dir" in record.getMessage()
  ]


def test_prepare_builds_then_reuses(mvtec_dir, tmp_path, caplog):
  data_dir = tmp_path / "data"
  builder = input_pipeline.prepare(_data_config(mvtec_dir, data_dir))
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == 5

  # A copy of the data elsewhere: the prepared copy is reused with a warning.
  moved = tmp_path / "moved"
  mvtec_dir.rename(moved)
  with caplog.at_level(logging.WARNING):
    reused = input_pipeline.prepare(_data_config(moved, data_dir))

  assert reused.is_prepared()
  matching = _stale_copy_warnings(caplog)
  assert len(matching) == 1
  assert layout.normalize_dir(mvtec_dir) in matching[0]
  assert layout.normalize_dir(moved) in matching[0]


def test_prepare_same_manual_dir_does_not_warn(mvtec_dir, tmp_path, caplog):
  config = _data_config(mvtec_dir, tmp_path / "data")
  input_pipeline.prepare(config)
  with caplog.at_level(logging.WARNING):
    input_pipeline.prepare(config)

  assert not _stale_copy_warnings(caplog)


def test_prepare_bad_manual_dir_raises(tmp_path):
  config = _data_config(tmp_path / "missing", tmp_path / "data")
  with pytest.raises(layout.DatasetLayoutError, match="missing does not exist"):
    input_pipeline.prepare(config)


def test_load_split_returns_examples(mvtec_dir, tmp_path):
  config = _data_config(mvtec_dir, tmp_path / "data", category="grid")
  source = input_pipeline.load_split(config, "test")

  assert len(source) == 5
  example = source[0]
  assert example["image"].shape == (20, 28, 3)
  assert example["mask"].shape == (20, 28, 1)


def test_load_split_unknown_split_lists_choices(mvtec_dir, tmp_path):
  config = _data_config(mvtec_dir, tmp_path / "data")
  with pytest.raises(ValueError, match="'validation'.*train, test"):
    input_pipeline.load_split(config, "validation")


def test_preprocess_image_range_and_shape():
  image = np.zeros((10, 6, 3), np.uint8)
  image[:, 3:] = 255
  result = input_pipeline.preprocess_image(image, 4)

  assert result.shape == (4, 4, 3)
  assert result.dtype == np.float32
  assert result.min() == -1.0
  assert result.max() == 1.0
  np.testing.assert_array_equal(result[:, 0], -1.0)
  np.testing.assert_array_equal(result[:, -1], 1.0)


def test_preprocess_image_rejects_non_uint8():
  with pytest.raises(ValueError, match="float32"):
    input_pipeline.preprocess_image(np.zeros((4, 4, 3), np.float32), 4)


def test_resize_image_non_square_not_cropped():
  # A center crop to a square would cut off the bright outer quarter.
  wide = np.zeros((6, 12, 3), np.uint8)
  wide[:, :3] = 255
  tall = np.zeros((12, 6, 3), np.uint8)
  tall[:3] = 255

  wide_resized = input_pipeline.resize_image(wide, 4)
  tall_resized = input_pipeline.resize_image(tall, 4)

  assert wide_resized.shape == (4, 4, 3)
  assert tall_resized.shape == (4, 4, 3)
  assert wide_resized[:, 0].min() > 127
  assert wide_resized[:, 3].max() == 0
  assert tall_resized[0].min() > 127
  assert tall_resized[3].max() == 0


def test_resize_mask_non_square_not_cropped():
  mask = np.zeros((6, 12, 1), np.uint8)
  mask[:, 9:] = 255

  resized = input_pipeline.resize_mask(mask, 4)

  expected = np.zeros((4, 4), np.uint8)
  expected[:, 3] = 1
  np.testing.assert_array_equal(resized, expected)


def test_resize_mask_keeps_thin_lines():
  # Nearest-neighbour at 1024 -> 256 reads only input pixels 4 * i + 2, so it
  # drops both lines.
  mask = np.zeros((1024, 1024), np.uint8)
  mask[:, 513] = 255
  mask[1021, :] = 255

  resized = input_pipeline.resize_mask(mask, 256)

  expected = np.zeros((256, 256), np.uint8)
  expected[:, 128] = 1
  expected[255, :] = 1
  np.testing.assert_array_equal(resized, expected)


def _block_index(pixel, length, size):
  """Returns the output index i whose block contains input index `pixel`.

  Block i covers [floor(i * length / size), floor((i + 1) * length / size)).
  """
  return math.ceil((pixel + 1) * size / length) - 1


def test_resize_mask_blocks_cover_every_pixel():
  height, width, size = 37, 50, 16
  for row in range(height):
    for column in range(width):
      mask = np.zeros((height, width), np.uint8)
      mask[row, column] = 1

      resized = input_pipeline.resize_mask(mask, size)

      expected = np.zeros((size, size), np.uint8)
      expected[_block_index(row, height, size),
               _block_index(column, width, size)] = 1
      np.testing.assert_array_equal(resized, expected,
                                    err_msg=f"pixel ({row}, {column})")


def test_resize_mask_2x_upsampling_repeats():
  mask = np.random.default_rng(0).integers(0, 2, (128, 128), dtype=np.uint8)

  resized = input_pipeline.resize_mask(mask, 256)

  expected = np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1)
  np.testing.assert_array_equal(resized, expected)


def test_resize_mask_shrinks_one_axis_grows_other():
  # Rows grow 8 -> 16, so each row is repeated twice and not dilated. Columns
  # shrink 40 -> 16, so column 5 lands in block 2, columns [5, 7).
  mask = np.zeros((8, 40), np.uint8)
  mask[3, 5] = 1

  resized = input_pipeline.resize_mask(mask, 16)

  expected = np.zeros((16, 16), np.uint8)
  expected[6:8, 2] = 1
  np.testing.assert_array_equal(resized, expected)


def test_train_loader_shapes():
  loader = _loader(
      _constant_source(10), global_batch_size=8, local_device_count=2
  )
  batches = list(loader.epoch_batches(0))

  assert loader.steps_per_epoch == 2
  assert loader.per_device_batch_size == 4
  assert loader.images.shape == (10, 8, 8, 3)
  assert loader.images.dtype == np.uint8
  assert len(batches) == 2
  for batch in batches:
    assert batch.shape == (2, 4, 8, 8, 3)
    assert batch.dtype == np.float32
    assert batch.min() >= -1.0
    assert batch.max() <= 1.0


def test_train_loader_order_depends_on_seed_and_epoch():
  source = _constant_source(10)
  first = [_ids(batch) for batch in _loader(source, seed=3).epoch_batches(5)]
  again = [_ids(batch) for batch in _loader(source, seed=3).epoch_batches(5)]
  next_epoch = [_ids(b) for b in _loader(source, seed=3).epoch_batches(6)]
  other_seed = [_ids(b) for b in _loader(source, seed=4).epoch_batches(5)]

  assert first == again
  assert first != next_epoch
  assert first != other_seed


def test_train_loader_epoch_covers_all_then_fills():
  loader = _loader(_constant_source(10), global_batch_size=4, seed=1)
  ids = [i for batch in loader.epoch_batches(2) for i in _ids(batch)]

  assert len(ids) == 12
  assert sorted(ids[:10]) == list(range(10))
  assert ids[10:] == ids[:2]


def test_train_loader_batch_larger_than_split():
  loader = _loader(_constant_source(3), global_batch_size=8)
  batches = list(loader.epoch_batches(0))

  assert loader.steps_per_epoch == 1
  ids = _ids(batches[0])
  assert sorted(ids[:3]) == [0, 1, 2]
  assert ids == [ids[i % 3] for i in range(8)]


def test_train_loader_processes_split_global_batch():
  source = _constant_source(10)
  single = _loader(source, global_batch_size=8, seed=7)
  halves = [
      _loader(
          source, global_batch_size=8, seed=7,
          process_index=index, process_count=2, local_device_count=2,
      )
      for index in range(2)
  ]

  for step, batches in enumerate(zip(
      single.epoch_batches(1),
      halves[0].epoch_batches(1),
      halves[1].epoch_batches(1),
  )):
    whole, first, second = batches
    assert first.shape == (2, 2, 8, 8, 3)
    assert second.shape == (2, 2, 8, 8, 3)
    assert _ids(first) == _ids(whole)[:4]
    assert _ids(second) == _ids(whole)[4:]
    if step == 0:
      assert not set(_ids(first)) & set(_ids(second))


class _CountingSource:
  """A _constant_source that records every index read from it."""

  def __init__(self, num_examples):
    self.examples = _constant_source(num_examples)
    self.reads = []

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, index):
    self.reads.append(index)
    return self.examples[index]


def test_train_loader_process_reads_only_its_slices():
  source = _CountingSource(10)
  loader = _loader(source, global_batch_size=4, seed=7, process_index=1,
                   process_count=2, local_device_count=1)
  other = _loader(_constant_source(10), global_batch_size=4, seed=7,
                  process_index=0, process_count=2, local_device_count=1)
  assert source.reads == []

  own_ids = [i for batch in loader.epoch_batches(0) for i in _ids(batch)]
  other_ids = [i for batch in other.epoch_batches(0) for i in _ids(batch)]

  assert sorted(source.reads) == sorted(set(own_ids))
  assert loader.num_decoded == len(set(own_ids))
  assert set(other_ids) - set(own_ids)
  assert not set(source.reads) & (set(other_ids) - set(own_ids))

  # A second pass over the epoch reads nothing new.
  reads = len(source.reads)
  again = [i for batch in loader.epoch_batches(0) for i in _ids(batch)]
  assert again == own_ids
  assert len(source.reads) == reads


def test_train_loader_start_step_resumes():
  loader = _loader(_constant_source(10), global_batch_size=2)
  full = [_ids(batch) for batch in loader.epoch_batches(4)]
  resumed = [_ids(batch) for batch in loader.epoch_batches(4, start_step=3)]

  assert resumed == full[3:]


def test_train_loader_indivisible_batch_raises():
  with pytest.raises(ValueError, match="6 is not divisible by .* 2 \\* 2 = 4"):
    _loader(
        _constant_source(10), global_batch_size=6,
        process_count=2, local_device_count=2,
    )


def test_train_loader_defaults_to_jax_topology():
  loader = input_pipeline.TrainLoader(
      _constant_source(4), image_size=8,
      global_batch_size=jax.local_device_count(), seed=0
  )
  batch = next(loader.epoch_batches(0))

  assert loader.process_count == 1
  assert batch.shape == (loader.local_device_count, 1, 8, 8, 3)


def test_train_loader_reads_built_split(mvtec_dir, tmp_path):
  config = _data_config(mvtec_dir, tmp_path / "data")
  loader = _loader(input_pipeline.load_split(config, "train"))

  assert loader.images.shape == (5, 8, 8, 3)
  assert loader.steps_per_epoch == 2


def _eval_source(num_examples):
  """Returns 16x16 examples whose left half of the mask is anomalous."""
  examples = []
  for index in range(num_examples):
    mask = np.zeros((16, 16, 1), np.uint8)
    if index % 2:
      mask[:, :8] = 255
    examples.append({
        "image": np.full((16, 16, 3), index, np.uint8),
        "mask": mask,
        "label": index % 2,
        "defect_type": b"crack" if index % 2 else b"good",
        "file_name": f"test/x/{index:03d}.png".encode(),
    })
  return examples


def test_eval_batches_pad_last_batch():
  batches = list(input_pipeline.eval_batches(
      _eval_source(5), image_size=8, heatmap_size=4, batch_size=2
  ))

  assert len(batches) == 3
  last = batches[-1]
  assert last["valid"].tolist() == [True, False]
  assert last["file_name"] == ["test/x/004.png", "test/x/004.png"]
  np.testing.assert_array_equal(last["image"][1], last["image"][0])
  for batch in batches[:2]:
    assert batch["valid"].tolist() == [True, True]

  file_names = [name for batch in batches for name in batch["file_name"]]
  assert file_names[:5] == [f"test/x/{i:03d}.png" for i in range(5)]


def test_eval_batches_shapes_and_types():
  batch = next(input_pipeline.eval_batches(
      _eval_source(2), image_size=8, heatmap_size=4, batch_size=2
  ))

  assert batch["image"].shape == (2, 8, 8, 3)
  assert batch["image"].dtype == np.float32
  assert batch["display"].shape == (2, 4, 4, 3)
  assert batch["display"].dtype == np.uint8
  assert batch["label"].dtype == np.int32
  assert batch["label"].tolist() == [0, 1]
  assert batch["valid"].dtype == bool
  assert batch["defect_type"] == ["good", "crack"]
  assert batch["original_size"].dtype == np.int32
  assert batch["original_size"].tolist() == [[16, 16], [16, 16]]


def test_eval_batches_resize_mask():
  batch = next(input_pipeline.eval_batches(
      _eval_source(2), image_size=8, heatmap_size=4, batch_size=2
  ))
  masks = batch["mask"]

  assert masks.shape == (2, 4, 4)
  assert masks.dtype == np.uint8
  assert not masks[0].any()
  expected = np.zeros((4, 4), np.uint8)
  expected[:, :2] = 1
  np.testing.assert_array_equal(masks[1], expected)


def test_eval_batches_read_built_split(mvtec_dir, tmp_path):
  config = _data_config(mvtec_dir, tmp_path / "data")
  source = input_pipeline.load_split(config, "test")
  batches = list(input_pipeline.eval_batches(
      source, image_size=8, heatmap_size=12, batch_size=4
  ))

  assert len(batches) == 2
  file_names = {
      name
      for batch in batches
      for name, valid in zip(batch["file_name"], batch["valid"])
      if valid
  }
  assert len(file_names) == 5
  for batch in batches:
    assert set(np.unique(batch["mask"])) <= {0, 1}
    anomalous = batch["label"] == 1
    assert batch["mask"][anomalous].any(axis=(1, 2)).all()
    assert not batch["mask"][~anomalous].any()
