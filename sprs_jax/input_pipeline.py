"""Reads the prepared TFDS data sets into NumPy batches for training and eval.

Examples come from `tfds.data_source` (array_record files, random access) and
are resized with Pillow, so neither TensorFlow nor Grain is needed. Images enter the model as
float32 in [-1, 1], x / 127.5 - 1.

Builders store images at their original size, which need not be square (BTAD
product 03 is 800 x 600 pixels). Every image is resized to a square of
`image_size` pixels and every mask to a square of `heatmap_size` pixels, with
no crop, so the whole image is scored and non-square images change their
aspect ratio.

Builders are looked up by `config.data.name` in `BUILDERS`, as "module:Class"
strings imported on first use, so a builder module only has to exist when it
is selected.
"""

from collections.abc import Iterator, Mapping, Sequence
import importlib
import math
import os
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from tfds_builders import layout

# Builder name (config.data.name) -> "module:Class" of its TFDS builder.
BUILDERS = {
    "btad": "tfds_builders.btad.btad_dataset_builder:Btad",
    "mpdd": "tfds_builders.mpdd.mpdd_dataset_builder:Mpdd",
    "mvtec_ad": "tfds_builders.mvtec_ad.mvtec_ad_dataset_builder:MvtecAd",
    "spr_textures": (
        "tfds_builders.spr_textures.spr_textures_dataset_builder:SprTextures"
    ),
}

FILE_FORMAT = "array_record"

# Key under which builders record, in DatasetInfo.metadata, the manual_dir
# that a prepared copy was built from.
MANUAL_DIR_METADATA_KEY = "manual_dir"

# Random-access source of examples: len() and [index] -> feature dict.
DataSource = Sequence[Mapping[str, Any]]


def get_builder(
    data_config: ml_collections.ConfigDict,
) -> tfds.core.DatasetBuilder:
  """Creates the builder for `data_config.name` and `data_config.category`.

  Nothing is read or written: the builder points at `data_config.data_dir`
  (TFDS's default folder when empty) and stores array_record files.

  Raises:
    ValueError: listing the choices if the name or the category is unknown,
      or naming the module if the builder's module cannot be imported.
  """
  builder_class = import_builder_class(data_config.name)

  categories = [config.name for config in builder_class.BUILDER_CONFIGS]
  if data_config.category not in categories:
    raise ValueError(
        f"Unknown category {data_config.category!r} for data set "
        f"{data_config.name!r}. Set config.data.category to one of: "
        f"{', '.join(categories)}."
    )

  data_dir = os.path.expanduser(data_config.data_dir) or None
  return builder_class(
      data_dir=data_dir,
      config=data_config.category,
      file_format=FILE_FORMAT,
  )


def prepare(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Builds the data set if no prepared copy exists and returns its builder.

  The copy is built from `data_config.manual_dir`, or from TFDS's default
  <data_dir>/downloads/manual when that is empty. An existing copy is reused
  as it is. When it was built from a folder other than `data_config.manual_dir`,
  a warning names both folders. The copy is not rebuilt, because the same data
  may have moved, and deleting the copy would break other runs that read it.
  Delete `builder.data_dir` to rebuild.

  Raises:
    ValueError: from `get_builder`, or a `DatasetLayoutError` (a ValueError)
      from the builder when manual_dir does not match the expected layout.
  """
  builder = get_builder(data_config)
  manual_dir = data_config.manual_dir or None

  if builder.is_prepared():
    _warn_if_built_elsewhere(builder, manual_dir)
    return builder

  needs_manual_dir = bool(getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None))
  if needs_manual_dir and manual_dir is None:
    raise ValueError(
        f"config.data.manual_dir is not set and {builder.info.full_name} is "
        f"not prepared in {builder.data_dir}. Pass "
        "--config.data.manual_dir=<folder with the unpacked data set>.\n"
        f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")

  # Every process that calls this on an unprepared data set builds it, so
  # run_lib.run lets process 0 build it before the other processes call it.
  logging.info(
      "Building %s from manual_dir %s into %s.",
      builder.info.full_name, manual_dir or "(TFDS default)", builder.data_dir,
  )
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
  )
  return builder


def load_split(
    data_config: ml_collections.ConfigDict, split: str
) -> DataSource:
  """Returns a random-access source of one split, preparing the data set first.

  Each item is a dict of NumPy arrays (image, mask, label) and bytes
  (defect_type, file_name), as `tfds_builders.features` describes.

  Raises:
    ValueError: listing the splits if `split` is unknown, and as in `prepare`.
  """
  builder = prepare(data_config)
  splits = list(builder.info.splits.keys())
  if split not in splits:
    raise ValueError(
        f"Unknown split {split!r} of {builder.info.full_name}. Valid splits: "
        f"{', '.join(splits)}."
    )
  return builder.as_data_source(split=split)


def preprocess_image(image_uint8: np.ndarray, image_size: int) -> np.ndarray:
  """Resizes an image and scales it to the model's input range.

  Args:
    image_uint8: uint8 [H, W, 3].
    image_size: side S of the output in pixels.

  Returns:
    float32 [S, S, 3] in [-1, 1]. The resize is Pillow's bilinear filter
    (which smooths over more pixels when shrinking), then x / 127.5 - 1.
  """
  return to_model_range(resize_image(image_uint8, image_size))


def resize_image(image_uint8: np.ndarray, size: int) -> np.ndarray:
  """Resizes uint8 [H, W, 3] to uint8 [size, size, 3], Pillow bilinear.

  Non-square images are resized, not cropped, so their aspect ratio changes.
  """
  image_uint8 = np.asarray(image_uint8)
  is_rgb = image_uint8.ndim == 3 and image_uint8.shape[-1] == 3
  if image_uint8.dtype != np.uint8 or not is_rgb:
    raise ValueError(
        "Expected a uint8 image shaped [H, W, 3], got "
        f"{image_uint8.dtype} {list(image_uint8.shape)}."
    )
  if image_uint8.shape[:2] == (size, size):
    return image_uint8

  resized = Image.fromarray(image_uint8, "RGB").resize(
      (size, size), Image.Resampling.BILINEAR
  )
  return np.asarray(resized)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """Resizes a mask [H, W] or [H, W, 1] to uint8 {0, 1} [size, size].

  Any non-zero input pixel counts as anomalous. Each axis is resized on its
  own, so non-square masks are resized like their images, with no crop:

  * An axis that shrinks is cut into `size` blocks, output pixel i covering
    input pixels [floor(i * n / size), floor((i + 1) * n / size)) of the n
    input pixels. An output pixel is anomalous if any input pixel of its
    block is, so a defect thinner than a block, such as a 1-pixel scratch,
    still marks at least one output pixel. Marked regions grow to whole
    blocks, so by less than one block on each side.
  * An axis that grows or keeps its length uses Pillow's nearest-neighbour
    resize, which repeats pixels and does not dilate the mask.
  """
  mask = np.asarray(mask)
  if mask.ndim == 3:
    mask = mask[..., 0]
  binary = (mask != 0).astype(np.uint8)

  for axis in (0, 1):
    length = binary.shape[axis]
    if length > size:
      block_starts = np.arange(size) * length // size
      binary = np.maximum.reduceat(binary, block_starts, axis=axis)

  if binary.shape == (size, size):
    return binary
  resized = Image.fromarray(binary, "L").resize(
      (size, size), Image.Resampling.NEAREST
  )
  return np.asarray(resized)


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
  """Maps uint8 pixels of any shape to float32 in [-1, 1] (x / 127.5 - 1)."""
  return images_uint8.astype(np.float32) / 127.5 - 1.0


class TrainLoader:
  """Shuffled, full-size training batches for one process, held in memory.

  Batch order depends only on (seed, epoch): epoch e visits the permutation
  drawn by `np.random.default_rng([seed, e])`, and its last batch is
  completed by wrapping around to the start of that permutation. So every
  batch has `global_batch_size` images, and a resumed run gets the same
  batches, whatever the process count.

  Each global batch is cut into `process_count` contiguous slices, and the
  slice of this process is split over its local devices. A process reads an
  example from the source when one of its slices first contains it, and
  keeps it resized as uint8, so it reads each example at most once and never
  reads those that only other processes' slices contain.

  Attributes:
    images: uint8 [N, S, S, 3], the cache of resized training images in
      source order. Rows this process has not read yet are zero.
    steps_per_epoch: ceil(N / global_batch_size).
    per_device_batch_size: images per device per step.
  """

  def __init__(
      self,
      source: DataSource,
      image_size: int,
      global_batch_size: int,
      seed: int,
      process_index: int | None = None,
      process_count: int | None = None,
      local_device_count: int | None = None,
  ):
    """Prepares the cache of `source`. Counts default to JAX's topology.

    Raises:
      ValueError: if the source is empty, the seed is negative, or
        global_batch_size is not divisible by process_count *
        local_device_count.
    """
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
    if local_device_count is None:
      local_device_count = jax.local_device_count()

    _check_positive(image_size=image_size, global_batch_size=global_batch_size,
                    process_count=process_count,
                    local_device_count=local_device_count)
    if not 0 <= process_index < process_count:
      raise ValueError(
          f"Invalid process_index {process_index}: expected 0 <= "
          f"process_index < process_count = {process_count}."
      )
    if seed < 0:
      raise ValueError(f"seed must be non-negative, got {seed}.")
    device_count = process_count * local_device_count
    if global_batch_size % device_count:
      raise ValueError(
          f"Global batch size {global_batch_size} is not divisible by "
          f"process_count * local_device_count = {process_count} * "
          f"{local_device_count} = {device_count}. Choose a multiple of "
          f"{device_count}."
      )
    if len(source) == 0:
      raise ValueError("The training source contains no examples.")

    self.image_size = image_size
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.local_device_count = local_device_count
    self.local_batch_size = global_batch_size // process_count
    self.per_device_batch_size = global_batch_size // device_count

    self._source = source
    self.images = np.zeros((len(source), image_size, image_size, 3), np.uint8)
    self._is_decoded = np.zeros(len(source), bool)
    self.steps_per_epoch = math.ceil(len(self.images) / global_batch_size)

  @property
  def num_examples(self) -> int:
    return len(self.images)

  @property
  def num_decoded(self) -> int:
    """The number of examples this process has read from the source."""
    return int(self._is_decoded.sum())

  def epoch_indices(self, epoch: int) -> np.ndarray:
    """Returns the source indices of every global batch of `epoch`.

    The result is int [steps_per_epoch, global_batch_size] and is the same in
    every process.
    """
    if epoch < 0:
      raise ValueError(f"epoch must be non-negative, got {epoch}.")
    permutation = np.random.default_rng([self.seed, epoch]).permutation(
        self.num_examples
    )

    # Wrap around to the start of the permutation to fill the last batch.
    total = self.steps_per_epoch * self.global_batch_size
    order = permutation[np.arange(total) % self.num_examples]
    return order.reshape(self.steps_per_epoch, self.global_batch_size)

  def epoch_batches(
      self, epoch: int, start_step: int = 0
  ) -> Iterator[np.ndarray]:
    """Yields this process's batches of one epoch, from step `start_step` on.

    Yields:
      float32 [local_device_count, per_device_batch_size, S, S, 3] in [-1, 1].
    """
    indices = self.epoch_indices(epoch)
    begin = self.process_index * self.local_batch_size
    end = begin + self.local_batch_size

    for step in range(start_step, self.steps_per_epoch):
      local_indices = indices[step, begin:end]
      self._decode(local_indices)
      batch = to_model_range(self.images[local_indices])
      yield batch.reshape(
          self.local_device_count, self.per_device_batch_size,
          *batch.shape[1:],
      )


  def _decode(self, indices: np.ndarray) -> None:
    """Reads and resizes the examples of `indices` not read before."""
    for index in np.unique(indices[~self._is_decoded[indices]]):
      self.images[index] = resize_image(
          self._source[int(index)]["image"], self.image_size)
      self._is_decoded[index] = True


def eval_batches(
    source: DataSource, image_size: int, heatmap_size: int, batch_size: int
) -> Iterator[dict[str, Any]]:
  """Yields the examples of `source` in order, as fixed-size batches.

  The last batch is padded to `batch_size` by repeating its last example
  with valid=False, so every batch has the same shapes.

  Yields:
    Dicts with b = batch_size and H = heatmap_size:
      image: float32 [b, S, S, 3] in [-1, 1], S = image_size.
      mask: uint8 [b, H, H], 1 where anomalous, resized by `resize_mask`.
      label: int32 [b], 0 normal and 1 anomalous.
      display: uint8 [b, H, H, 3], the photo resized for pictures.
      original_size: int32 [b, 2], the photo's (height, width) before resizing.
      defect_type, file_name: lists of b str.
      valid: bool [b], False for padding.
  """
  _check_positive(image_size=image_size, heatmap_size=heatmap_size,
                  batch_size=batch_size)
  num_examples = len(source)
  for begin in range(0, num_examples, batch_size):
    end = min(begin + batch_size, num_examples)
    examples = [
        _eval_example(source[index], image_size, heatmap_size)
        for index in range(begin, end)
    ]
    valid = [True] * len(examples)

    padding = batch_size - len(examples)
    examples += [examples[-1]] * padding
    valid += [False] * padding

    yield {
        "image": np.stack([example["image"] for example in examples]),
        "mask": np.stack([example["mask"] for example in examples]),
        "label": np.array([example["label"] for example in examples], np.int32),
        "display": np.stack([example["display"] for example in examples]),
        "original_size": np.array(
            [example["original_size"] for example in examples], np.int32),
        "defect_type": [example["defect_type"] for example in examples],
        "file_name": [example["file_name"] for example in examples],
        "valid": np.array(valid, bool),
    }


def import_builder_class(name: str) -> type[tfds.core.DatasetBuilder]:
  """Imports the builder class registered in `BUILDERS` under `name`."""
  if name not in BUILDERS:
    raise ValueError(
        f"Unknown data set {name!r}. Set config.data.name to one of: "
        f"{', '.join(BUILDERS)}."
    )

  module_name, class_name = BUILDERS[name].split(":")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as error:
    missing = error.name or ""
    if module_name != missing and not module_name.startswith(missing + "."):
      raise
    raise ValueError(
        f"Module {module_name} of data set {name!r} is not found. Check "
        f"the entry {name!r} of input_pipeline.BUILDERS."
    ) from error
  return getattr(module, class_name)


def _warn_if_built_elsewhere(
    builder: tfds.core.DatasetBuilder, manual_dir: str | None
) -> None:
  """Logs a warning if the prepared copy was built from another manual_dir."""
  if manual_dir is None:
    return
  metadata = builder.info.metadata or {}
  built_from = metadata.get(MANUAL_DIR_METADATA_KEY)
  if built_from is None:
    logging.info(
        "Reusing %s at %s. Its source folder is not recorded.",
        builder.info.full_name, builder.data_dir,
    )
    return

  # NOTE: only the folder paths are compared, so files changed inside the same
  # folder after the build go unnoticed.
  requested = layout.normalize_dir(manual_dir)
  if built_from != requested:
    logging.warning(
        "Reusing %s at %s, built from %s, although manual_dir is %s. The data "
        "is not rebuilt. Delete %s to rebuild it from %s.",
        builder.info.full_name, builder.data_dir, built_from, requested,
        builder.data_dir, requested,
    )


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value}.")


def _eval_example(
    example: Mapping[str, Any], image_size: int, heatmap_size: int
) -> dict[str, Any]:
  image = np.asarray(example["image"])
  return {
      "image": preprocess_image(image, image_size),
      "mask": resize_mask(example["mask"], heatmap_size),
      "label": int(example["label"]),
      "display": resize_image(image, heatmap_size),
      "original_size": image.shape[:2],
      "defect_type": _to_str(example["defect_type"]),
      "file_name": _to_str(example["file_name"]),
  }


def _to_str(value: str | bytes) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
