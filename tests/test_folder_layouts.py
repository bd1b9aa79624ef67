"""Folders as users have them, for the MVTec AD, MPDD and BTAD builders.

Every test runs once per builder on a tiny category folder written by
`anomaly_trees.write_category` in that data set's real layout.
"""

import logging
import pathlib
import re
import struct
import zlib

from etils import epath
import numpy as np
from PIL import Image
import pytest

import anomaly_trees
from anomaly_trees import HEIGHT, WIDTH
from tfds_builders import layout

BUILDER_NAMES = list(anomaly_trees.SPECS)


@pytest.fixture(params=BUILDER_NAMES)
def tree(request, tmp_path):
  """Returns a fresh category folder of each data set in turn."""
  spec = anomaly_trees.SPECS[request.param]
  return anomaly_trees.write_category(tmp_path / "manual", spec)


def _data_dir(tree):
  return tree.manual_dir.parent / "data"


def _build(tree):
  return anomaly_trees.build(tree, _data_dir(tree))


def _assert_split_sizes(builder):
  assert builder.info.splits["train"].num_examples == anomaly_trees.NUM_TRAIN
  num_test = anomaly_trees.NUM_TEST_NORMAL + anomaly_trees.NUM_TEST_ANOMALOUS
  assert builder.info.splits["test"].num_examples == num_test


def _test_example(builder, tree, image_path):
  test = anomaly_trees.read_split(builder, "test")
  return test[tree.file_name(image_path)]


def _raises_layout_error(pattern):
  """Expects a DatasetLayoutError whose message matches `pattern`."""
  return pytest.raises(layout.DatasetLayoutError, match=pattern)


def _check_nothing_written(tree):
  data_dir = _data_dir(tree)
  assert not data_dir.exists() or not any(data_dir.rglob("*"))


def _write_png_16bit(path, values, color_type):
  """Writes uint16 `values` as a PNG with 16 bits per channel.

  Pillow (13.0) cannot write 16-bit color PNGs, so the file is assembled
  here. color_type follows the PNG specification: 0 gray, 2 RGB, 6 RGBA.
  """
  height, width = values.shape[:2]
  rows = values.reshape(height, -1).astype(">u2")
  raw = b"".join(b"\0" + row.tobytes() for row in rows)

  def chunk(kind, data):
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

  header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(
      b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
      + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
  )


def _replace_file(old_path, new_path, pixels):
  """Deletes `old_path` and writes `pixels` to `new_path`."""
  old_path.unlink()
  anomaly_trees.write_image(new_path, pixels)


def test_hidden_files_skipped(tree):
  folders = [
      tree.manual_dir,
      tree.category_dir,
      tree.category_dir / "train" / tree.spec.normal_dir,
      tree.anomalous_image_path(0).parent,
      tree.mask_dir(),
  ]
  for folder in folders:
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
  (tree.mask_dir() / "._000.png").write_bytes(b"\0\5\x16\7")

  _assert_split_sizes(_build(tree))


def test_os_metadata_names_any_case(tree):
  folders = [
      tree.category_dir,
      tree.category_dir / "train" / tree.spec.normal_dir,
      tree.anomalous_image_path(0).parent,
      tree.mask_dir(),
  ]
  for folder in folders:
    for name in ("THUMBS.DB", "thumbs.db", "Desktop.ini", "DESKTOP.INI"):
      (folder / name).write_bytes(b"\xd0\xcf\x11\xe0")

  _assert_split_sizes(_build(tree))


def test_macosx_tree_skipped(tree):
  # The macOS archiver stores AppleDouble files (not images) in __MACOSX/.
  for parent in (tree.manual_dir, tree.category_dir / "test"):
    resource_dir = (parent / "__MACOSX" / tree.spec.category / "test"
                    / tree.spec.normal_dir)
    resource_dir.mkdir(parents=True)
    (resource_dir / "._000.png").write_bytes(b"\0\5\x16\7")

  _assert_split_sizes(_build(tree))


def test_upper_case_extensions(tree):
  image_path = tree.anomalous_image_path(0)
  upper_image = image_path.with_suffix(image_path.suffix.upper())
  image_path.rename(upper_image)
  mask_path = tree.mask_path(0)
  upper_mask = mask_path.with_suffix(mask_path.suffix.upper())
  mask_path.rename(upper_mask)
  train_path = tree.image_path("train", tree.spec.normal_dir, 0)
  upper_train = train_path.with_suffix(train_path.suffix.upper())
  train_path.rename(upper_train)

  builder = _build(tree)
  example = _test_example(builder, tree, upper_image)
  train = anomaly_trees.read_split(builder, "train")

  assert example["label"] == 1
  np.testing.assert_array_equal(
      example["image"], anomaly_trees.read_pixels(upper_image)
  )
  np.testing.assert_array_equal(example["mask"], anomaly_trees.expected_mask())
  assert tree.file_name(upper_train) in train


@pytest.mark.parametrize("mask_name_format", [
    "{stem}_mask.png", "{stem}.png", "{stem}_mask.bmp", "{stem}.bmp",
])
@pytest.mark.parametrize("builder_name", BUILDER_NAMES)
def test_mask_name_variants(tmp_path, builder_name, mask_name_format):
  spec = anomaly_trees.SPECS[builder_name]
  tree = anomaly_trees.write_category(
      tmp_path / "manual", spec, mask_name_format
  )
  test = anomaly_trees.read_split(_build(tree), "test")

  for index in range(anomaly_trees.NUM_TEST_ANOMALOUS):
    example = test[tree.file_name(tree.anomalous_image_path(index))]
    assert example["label"] == 1
    assert example["defect_type"].decode() == spec.defect_dir
    np.testing.assert_array_equal(
        example["mask"], anomaly_trees.expected_mask()
    )


def test_two_masks_for_one_image_raise(tree):
  first = tree.mask_path(0)
  image_path = re.escape(str(tree.anomalous_image_path(0)))
  pattern = f"Anomalous image {image_path} has 2 masks"
  mask_names = ["{stem}_mask.png", "{stem}.png", "{stem}_mask.bmp",
                "{stem}.bmp"]
  for mask_name in mask_names:
    second = tree.mask_dir() / mask_name.format(stem="000")
    if second == first:
      continue
    anomaly_trees.write_image(second, anomaly_trees.box_mask())

    with _raises_layout_error(pattern) as info:
      _build(tree)

    message = str(info.value)
    assert str(first) in message
    assert str(second) in message
    _check_nothing_written(tree)
    second.unlink()


def test_one_mask_for_two_images_raises(tree):
  # 000.png and 000.bmp would both take the mask of stem 000.
  image_path = tree.anomalous_image_path(0)
  other_suffix = ".png" if image_path.suffix == ".bmp" else ".bmp"
  twin = image_path.with_suffix(other_suffix)
  anomaly_trees.write_image(twin, anomaly_trees.random_image(
      np.random.default_rng(1)))

  with _raises_layout_error("matches two images") as info:
    _build(tree)

  message = str(info.value)
  assert str(tree.mask_path(0)) in message
  assert str(image_path) in message
  assert str(twin) in message


def test_16bit_gray_image_and_mask(tree):
  image_path = tree.anomalous_image_path(0)
  png_image = image_path.with_suffix(".png")
  gray = np.arange(HEIGHT * WIDTH, dtype=np.uint16).reshape(HEIGHT, WIDTH)
  image_path.unlink()
  _write_png_16bit(png_image, gray * 1000, color_type=0)

  mask_path = tree.mask_path(0)
  mask_path.unlink()
  png_mask = mask_path.with_suffix(".png")
  # Value 1 of 65535 is non-zero only when compared at full depth.
  _write_png_16bit(png_mask, anomaly_trees.box_mask(1).astype(np.uint16),
                   color_type=0)
  assert Image.open(png_image).mode == "I;16"

  example = _test_example(_build(tree), tree, png_image)

  expected_gray = ((gray * 1000) >> 8).astype(np.uint8)
  for channel in range(3):
    np.testing.assert_array_equal(example["image"][..., channel],
                                  expected_gray)
  np.testing.assert_array_equal(example["mask"], anomaly_trees.expected_mask())


def test_16bit_rgb_image_keeps_high_byte(tree):
  image_path = tree.anomalous_image_path(0)
  png_image = image_path.with_suffix(".png")
  values = np.zeros((HEIGHT, WIDTH, 3), np.uint16)
  values[..., 0] = 0xAB12
  values[..., 1] = 0x00FF
  values[..., 2] = 0xFFFF
  image_path.unlink()
  _write_png_16bit(png_image, values, color_type=2)

  example = _test_example(_build(tree), tree, png_image)

  np.testing.assert_array_equal(example["image"][0, 0], [0xAB, 0x00, 0xFF])


def test_16bit_rgb_mask_raises(tree):
  mask_path = tree.mask_path(0)
  png_mask = mask_path.with_suffix(".png")
  mask_path.unlink()
  values = np.repeat(anomaly_trees.box_mask(1)[..., None], 3, axis=-1)
  _write_png_16bit(png_mask, values.astype(np.uint16), color_type=2)

  pattern = f"Mask {re.escape(str(png_mask))} is a PNG with 16 bits"
  with _raises_layout_error(pattern):
    _build(tree)
  _check_nothing_written(tree)


def _write_tiff(path, values):
  """Writes `values` as a TIFF, whatever the extension of `path`.

  The builders list .png, .bmp and .jpg files, but Pillow detects the format
  from the content, so a TIFF saved under such a name is decoded as a TIFF.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(values).save(path, format="TIFF")


@pytest.mark.parametrize("values, detail", [
    (np.full((HEIGHT, WIDTH), 70_000, np.int32), "32-bit integers"),
    (np.full((HEIGHT, WIDTH), -1, np.int32), "32-bit integers"),
    (np.full((HEIGHT, WIDTH), 0.5, np.float32), "floating-point"),
])
def test_wide_gray_image_raises(tree, values, detail):
  image_path = tree.anomalous_image_path(0)
  _write_tiff(image_path, values)
  assert Image.open(image_path).mode in ("I", "F")

  with _raises_layout_error(f"Unsupported image {re.escape(str(image_path))}"
                            ) as info:
    _build(tree)

  message = str(info.value)
  assert detail in message
  assert "Save it as an 8-bit or 16-bit image" in message


def test_32bit_image_within_16_bits(tree):
  image_path = tree.anomalous_image_path(0)
  gray = np.arange(HEIGHT * WIDTH, dtype=np.int32).reshape(HEIGHT, WIDTH)
  _write_tiff(image_path, gray * 1000)
  assert Image.open(image_path).mode == "I"

  example = _test_example(_build(tree), tree, image_path)

  expected_gray = ((gray * 1000) >> 8).astype(np.uint8)
  for channel in range(3):
    np.testing.assert_array_equal(example["image"][..., channel],
                                  expected_gray)


@pytest.mark.parametrize("mode, values", [
    ("I", np.array([[0, 70_000], [-5, 0]], np.int32)),
    ("F", np.array([[0.0, 0.25], [-1e-3, 0.0]], np.float32)),
])
def test_convert_to_rgb_rejects_wide_gray(mode, values):
  image = Image.fromarray(values)
  assert image.mode == mode

  with pytest.raises(layout.UnsupportedImageError,
                     match="Save it as an 8-bit or 16-bit image"):
    layout.convert_to_rgb(image)
  # predict.load_image catches ValueError and adds the path.
  assert issubclass(layout.UnsupportedImageError, ValueError)


@pytest.mark.parametrize("values", [
    np.array([[0, 70_000], [-5, 0]], np.int32),
    np.array([[0.0, 0.25], [-1e-3, 0.0]], np.float32),
])
def test_wide_gray_mask_full_depth(tmp_path, values):
  mask_path = tmp_path / "000_mask.png"
  _write_tiff(mask_path, values)
  guide = anomaly_trees.SPECS["mvtec_ad"].builder_class.CATEGORY_LAYOUT.guide

  mask = layout.load_binary_mask(epath.Path(mask_path), guide)

  np.testing.assert_array_equal(np.asarray(mask), [[0, 255], [255, 0]])


def test_palette_image_and_mask(tree):
  image_path = tree.anomalous_image_path(0)
  palette_image = Image.new("P", (WIDTH, HEIGHT), 0)
  palette_image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
  palette_image.paste(1, (0, 0, 4, HEIGHT))
  palette_image.save(image_path)

  mask_path = tree.mask_path(0)
  palette_mask = Image.new("P", (WIDTH, HEIGHT), 0)
  palette_mask.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
  palette_mask.paste(1, (2, 1, 6, 4))  # MASK_BOX as (left, top, right, bottom)
  palette_mask.save(mask_path)
  assert Image.open(image_path).mode == "P"
  assert Image.open(mask_path).mode == "P"

  example = _test_example(_build(tree), tree, image_path)

  np.testing.assert_array_equal(example["image"][:, :4],
                                np.broadcast_to([200, 100, 50], (HEIGHT, 4, 3)))
  np.testing.assert_array_equal(example["image"][:, 4:],
                                np.broadcast_to([10, 20, 30], (HEIGHT, 4, 3)))
  np.testing.assert_array_equal(example["mask"], anomaly_trees.expected_mask())


def test_rgba_image_and_mask(tree):
  image_path = tree.anomalous_image_path(0)
  rgba = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
  rgba[..., :3] = anomaly_trees.random_image(np.random.default_rng(2))
  rgba[..., 3] = 7  # Alpha is dropped, not multiplied in.
  png_image = image_path.with_suffix(".png")
  _replace_file(image_path, png_image, rgba)

  mask_path = tree.mask_path(0)
  png_mask = mask_path.with_suffix(".png")
  mask = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
  mask[anomaly_trees.MASK_BOX] = [0, 255, 0, 255]
  mask[..., 3] = 255
  _replace_file(mask_path, png_mask, mask)

  example = _test_example(_build(tree), tree, png_image)

  np.testing.assert_array_equal(example["image"], rgba[..., :3])
  np.testing.assert_array_equal(example["mask"], anomaly_trees.expected_mask())


def _mask_values(style):
  """Returns a uint8 mask of one storage style, non-zero exactly on MASK_BOX."""
  mask = np.zeros((HEIGHT, WIDTH), np.uint8)
  if style == "zero_one":
    mask[anomaly_trees.MASK_BOX] = 1
  elif style == "zero_255":
    mask[anomaly_trees.MASK_BOX] = 255
  elif style == "anti_aliased":
    mask[anomaly_trees.MASK_BOX] = 255
    mask[1, 2:6] = [3, 60, 128, 254]  # Soft top edge.
  elif style == "class_codes":
    mask[1:4, 2:4] = 1
    mask[1:4, 4:6] = 7
  return mask


@pytest.mark.parametrize(
    "style", ["zero_one", "zero_255", "anti_aliased", "class_codes"]
)
def test_any_nonzero_mask_value_is_anomalous(tree, style):
  anomaly_trees.write_image(tree.mask_path(0), _mask_values(style))

  example = _test_example(_build(tree), tree, tree.anomalous_image_path(0))

  np.testing.assert_array_equal(example["mask"], anomaly_trees.expected_mask())


def test_extra_files_in_roots_ignored(tree):
  for folder in (tree.manual_dir, tree.category_dir):
    (folder / "license.txt").write_text("License text.\n")
    (folder / "readme.txt").write_text("Read me.\n")
  (tree.category_dir / "test" / "notes.md").write_text("Notes.\n")

  _assert_split_sizes(_build(tree))


def test_empty_defect_folder_raises(tree):
  defect_dir = tree.anomalous_image_path(0).parent
  for path in defect_dir.iterdir():
    path.unlink()
  (defect_dir / ".DS_Store").write_bytes(b"\0")

  pattern = f"Folder {re.escape(str(defect_dir))} contains no images"
  with _raises_layout_error(pattern):
    _build(tree)
  _check_nothing_written(tree)


def test_empty_mask_folder_raises(tree):
  for path in tree.mask_dir().iterdir():
    path.unlink()

  pattern = f"Folder {re.escape(str(tree.mask_dir()))} contains no images"
  with _raises_layout_error(pattern):
    _build(tree)


def test_missing_ground_truth_folder_raises(tree):
  ground_truth_dir = tree.category_dir / "ground_truth"
  ground_truth_dir.rename(tree.category_dir / "masks")

  pattern = f"Folder {re.escape(str(ground_truth_dir))} is missing"
  with _raises_layout_error(pattern) as info:
    _build(tree)
  assert f"test/ ({tree.spec.defect_dir})" in str(info.value)


def test_corrupt_image_names_path(tree):
  image_path = tree.anomalous_image_path(1)
  image_path.write_bytes(b"not an image")

  pattern = f"Failed to read image {re.escape(str(image_path))}"
  with _raises_layout_error(pattern):
    _build(tree)
  _check_nothing_written(tree)


def test_corrupt_mask_names_path(tree):
  tree.mask_path(1).write_bytes(b"not an image")

  pattern = f"Failed to read image {re.escape(str(tree.mask_path(1)))}"
  with _raises_layout_error(pattern):
    _build(tree)


def test_truncated_image_names_path(tree):
  # The header is intact, so the early check passes and decoding fails.
  image_path = tree.image_path("train", tree.spec.normal_dir, 2)
  data = image_path.read_bytes()
  image_path.write_bytes(data[: len(data) // 2])

  pattern = f"Failed to decode image {re.escape(str(image_path))}"
  with _raises_layout_error(pattern):
    _build(tree)


def test_all_zero_mask_raises(tree):
  anomaly_trees.write_image(tree.mask_path(0), np.zeros((HEIGHT, WIDTH),
                                                         np.uint8))

  pattern = f"Mask {re.escape(str(tree.mask_path(0)))} .* no non-zero pixel"
  with _raises_layout_error(pattern):
    _build(tree)


def test_missing_mask_names_shipped_name(tree):
  tree.mask_path(1).unlink()

  pattern = (
      f"Anomalous image {re.escape(str(tree.anomalous_image_path(1)))} has no "
      f"mask: {re.escape(str(tree.mask_path(1)))} is missing"
  )
  with _raises_layout_error(pattern):
    _build(tree)


def test_loose_images_raise(tree):
  for folder in ("", "train", "test", "ground_truth"):
    loose = tree.category_dir / folder / "extra.png"
    anomaly_trees.write_image(loose, anomaly_trees.box_mask())

    pattern = f"Unexpected image file {re.escape(str(loose))}"
    with _raises_layout_error(pattern):
      _build(tree)
    loose.unlink()


def test_non_image_file_in_image_folder_raises(tree):
  notes = tree.anomalous_image_path(0).parent / "notes.txt"
  notes.write_text("Scratch on the left.\n")

  pattern = f"Unexpected file {re.escape(str(notes))}: image folders"
  with _raises_layout_error(pattern):
    _build(tree)


def test_error_names_data_set_and_download(tree):
  tree.mask_path(0).unlink()

  with _raises_layout_error("has no mask") as info:
    _build(tree)

  message = str(info.value)
  assert f"Expected layout of {tree.spec.dataset_name}" in message
  assert tree.spec.homepage in message


def _warnings(caplog):
  return [
      record.getMessage() for record in caplog.records
      if record.levelno == logging.WARNING
  ]


def test_unused_mask_and_folders_logged(tree, caplog):
  anomaly_trees.write_image(
      tree.mask_dir() / tree.spec.mask_name_format.format(stem="099"),
      anomaly_trees.box_mask(),
  )
  (tree.category_dir / "ground_truth" / "retired_defect").mkdir()
  (tree.category_dir / "validation").mkdir()

  with caplog.at_level(logging.WARNING):
    _assert_split_sizes(_build(tree))

  warnings = "\n".join(_warnings(caplog))
  assert "mask of no image" in warnings
  assert "099" in warnings
  assert str(tree.category_dir / "ground_truth" / "retired_defect") in warnings
  assert str(tree.category_dir / "validation") in warnings


def _count_warnings_naming(caplog, path):
  return sum(str(path) in message for message in _warnings(caplog))


def test_hidden_folders_with_images_logged(tree, caplog):
  test_dir = tree.category_dir / "test"
  checkpoints = tree.anomalous_image_path(0).parent / ".ipynb_checkpoints"
  old_defects = test_dir / f".{tree.spec.defect_dir}_old"
  old_masks = tree.category_dir / "ground_truth" / ".old_masks"
  backup = tree.category_dir / ".backup"
  rng = np.random.default_rng(3)
  for image_path in (
      checkpoints / "000-checkpoint.png",
      old_defects / "000.png",
      old_masks / "000_mask.png",
      backup / "test" / tree.spec.defect_dir / "000.png",  # Two levels down.
  ):
    anomaly_trees.write_image(image_path, anomaly_trees.random_image(rng))
  with_images = [checkpoints, old_defects, old_masks, backup]

  cache = tree.image_path("train", tree.spec.normal_dir, 0).parent / ".cache"
  (cache / "notes").mkdir(parents=True)
  (cache / "notes" / "readme.txt").write_text("Cache.\n")
  # AppleDouble files have image extensions but hidden names.
  macos_archive = test_dir / "__MACOSX"
  macos_archive.mkdir()
  (macos_archive / "._000.png").write_bytes(b"\0\5\x16\7")
  without_images = [cache, macos_archive]

  with caplog.at_level(logging.WARNING):
    _assert_split_sizes(_build(tree))

  for folder in with_images:
    assert _count_warnings_naming(caplog, folder) == 1, folder
  for folder in without_images:
    assert _count_warnings_naming(caplog, folder) == 0, folder


def _transparent_white_mask():
  """Returns an RGBA mask: opaque red on MASK_BOX, transparent white around."""
  mask = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
  mask[...] = [255, 255, 255, 0]
  mask[anomaly_trees.MASK_BOX] = [255, 0, 0, 255]
  return mask


def _white_palette_mask():
  """Returns a palette mask whose index 0, the background, is white."""
  mask = Image.new("P", (WIDTH, HEIGHT), 0)
  mask.putpalette([255, 255, 255, 255, 0, 0] + [0] * 762)
  mask.paste(1, (2, 1, 6, 4))  # MASK_BOX as (left, top, right, bottom)
  return mask


@pytest.mark.parametrize("style", ["transparent_white", "white_palette"])
def test_full_mask_logged(tree, caplog, style):
  mask_path = tree.mask_path(0)
  if style == "transparent_white":
    mask_path = mask_path.with_suffix(".png")
    _replace_file(tree.mask_path(0), mask_path, _transparent_white_mask())
  else:
    _white_palette_mask().save(mask_path)

  with caplog.at_level(logging.WARNING):
    builder = _build(tree)

  example = _test_example(builder, tree, tree.anomalous_image_path(0))
  assert np.all(example["mask"] == 255)
  full_mask_warnings = [
      message for message in _warnings(caplog)
      if "marks every pixel as anomalous" in message
  ]
  assert len(full_mask_warnings) == 1
  assert str(mask_path) in full_mask_warnings[0]


def test_partial_mask_not_logged(tree, caplog):
  with caplog.at_level(logging.WARNING):
    _build(tree)

  assert not [
      message for message in _warnings(caplog)
      if "marks every pixel as anomalous" in message
  ]


def test_reads_back_every_example(tree):
  builder = _build(tree)
  train = anomaly_trees.read_split(builder, "train")
  test = anomaly_trees.read_split(builder, "test")

  assert len(train) == anomaly_trees.NUM_TRAIN
  for file_name, example in {**train, **test}.items():
    path = tree.category_dir / pathlib.PurePosixPath(file_name)
    np.testing.assert_array_equal(example["image"],
                                  anomaly_trees.read_pixels(path))
    assert example["mask"].shape == (HEIGHT, WIDTH, 1)

    folder = file_name.split("/")[1]
    if folder == tree.spec.normal_dir:
      assert example["label"] == 0
      assert example["defect_type"].decode() == "good"
      assert not example["mask"].any()
    else:
      assert example["label"] == 1
      assert example["defect_type"].decode() == tree.spec.defect_dir
      np.testing.assert_array_equal(example["mask"],
                                    anomaly_trees.expected_mask())
