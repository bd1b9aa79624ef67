"""Tiny category folders of MVTec AD, MPDD and BTAD in their real layouts.

`write_category` writes one category of RGB images, 8 x 6 (width x height)
pixels by default: 3 in train/<normal>/, 2 in test/<normal>/ and 2 in
test/<defect>/, each anomalous image with a mask that is non-zero on
`MASK_BOX`.
"""

import dataclasses
import pathlib

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from tfds_builders.btad import btad_dataset_builder as btad
from tfds_builders.mpdd import mpdd_dataset_builder as mpdd
from tfds_builders.mvtec_ad import mvtec_ad_dataset_builder as mvtec

WIDTH, HEIGHT = 8, 6

# Rows and columns of the anomalous region of every mask.
MASK_BOX = (slice(1, 4), slice(2, 6))

NUM_TRAIN = 3
NUM_TEST_NORMAL = 2
NUM_TEST_ANOMALOUS = 2


@dataclasses.dataclass(frozen=True)
class TreeSpec:
  """How one data set lays out a category, as the tree writer needs it.

  Attributes:
    builder_class: the TFDS builder of the data set.
    dataset_name: the name in error messages, such as "MVTec AD".
    homepage: the address that every error message contains.
    category: the category written, a BuilderConfig name.
    normal_dir: the folder name of normal images.
    defect_dir: the folder name of the anomalous test images written.
    image_suffix: the extension of the images written.
    mask_name_format: the mask name of an image, with "{stem}".
  """

  builder_class: type
  dataset_name: str
  homepage: str
  category: str
  normal_dir: str
  defect_dir: str
  image_suffix: str
  mask_name_format: str


# The real layouts: MVTec AD and MPDD ship PNG images and <stem>_mask.png
# masks. BTAD names masks <stem>.<ext> and has BMP images in some products.
SPECS = {
    "mvtec_ad": TreeSpec(
        builder_class=mvtec.MvtecAd,
        dataset_name="MVTec AD",
        homepage=mvtec.HOMEPAGE,
        category="bottle",
        normal_dir="good",
        defect_dir="crack",
        image_suffix=".png",
        mask_name_format="{stem}_mask.png",
    ),
    "mpdd": TreeSpec(
        builder_class=mpdd.Mpdd,
        dataset_name="MPDD",
        homepage=mpdd.HOMEPAGE,
        category="connector",
        normal_dir="good",
        defect_dir="parts_mismatch",
        image_suffix=".png",
        mask_name_format="{stem}_mask.png",
    ),
    "btad": TreeSpec(
        builder_class=btad.Btad,
        dataset_name="BTAD",
        homepage=btad.DOWNLOAD_URL,
        category="03",
        normal_dir="ok",
        defect_dir="ko",
        image_suffix=".bmp",
        mask_name_format="{stem}.png",
    ),
}


@dataclasses.dataclass(frozen=True)
class Tree:
  """A category folder written by `write_category`.

  Attributes:
    spec: the layout it follows.
    manual_dir: the folder to build from.
    category_dir: manual_dir / spec.category.
  """

  spec: TreeSpec
  manual_dir: pathlib.Path
  category_dir: pathlib.Path

  def image_path(self, split: str, folder: str, index: int) -> pathlib.Path:
    """Returns <category>/<split>/<folder>/<index>.<image suffix>."""
    name = f"{index:03d}{self.spec.image_suffix}"
    return self.category_dir / split / folder / name

  def anomalous_image_path(self, index: int) -> pathlib.Path:
    return self.image_path("test", self.spec.defect_dir, index)

  def mask_dir(self) -> pathlib.Path:
    return self.category_dir / "ground_truth" / self.spec.defect_dir

  def mask_path(self, index: int) -> pathlib.Path:
    """Returns the mask of anomalous image `index`, as written."""
    stem = f"{index:03d}"
    return self.mask_dir() / self.spec.mask_name_format.format(stem=stem)

  def file_name(self, path: pathlib.Path) -> str:
    """Returns `path` relative to the category folder, as in file_name."""
    return path.relative_to(self.category_dir).as_posix()


def write_image(path: pathlib.Path, pixels: np.ndarray) -> None:
  """Writes `pixels` in the format of the extension of `path`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels).save(path)


def random_image(
    rng: np.random.Generator, size: tuple[int, int] = (WIDTH, HEIGHT)
) -> np.ndarray:
  """Returns uint8 [height, width, 3] noise for `size` = (width, height)."""
  width, height = size
  return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def box_mask(
    value: int = 255, size: tuple[int, int] = (WIDTH, HEIGHT)
) -> np.ndarray:
  """Returns a uint8 [height, width] mask that is `value` on MASK_BOX."""
  width, height = size
  mask = np.zeros((height, width), np.uint8)
  mask[MASK_BOX] = value
  return mask


def expected_mask(size: tuple[int, int] = (WIDTH, HEIGHT)) -> np.ndarray:
  """Returns the mask feature of an anomalous image: uint8 [H, W, 1]."""
  return box_mask(255, size)[..., None]


def write_category(
    root: pathlib.Path,
    spec: TreeSpec,
    mask_name_format: str | None = None,
    size: tuple[int, int] = (WIDTH, HEIGHT),
) -> Tree:
  """Writes one category of `spec` under the manual_dir `root`.

  `mask_name_format` replaces `spec.mask_name_format` when given. Images and
  masks have `size` = (width, height) pixels.
  """
  if mask_name_format is not None:
    spec = dataclasses.replace(spec, mask_name_format=mask_name_format)
  tree = Tree(spec=spec, manual_dir=root, category_dir=root / spec.category)
  rng = np.random.default_rng(0)

  for index in range(NUM_TRAIN):
    write_image(tree.image_path("train", spec.normal_dir, index),
                random_image(rng, size))
  for index in range(NUM_TEST_NORMAL):
    write_image(tree.image_path("test", spec.normal_dir, index),
                random_image(rng, size))
  for index in range(NUM_TEST_ANOMALOUS):
    write_image(tree.anomalous_image_path(index), random_image(rng, size))
    write_image(tree.mask_path(index), box_mask(255, size))
  return tree


def build(tree: Tree, data_dir: pathlib.Path) -> tfds.core.DatasetBuilder:
  """Builds the category of `tree` into `data_dir` and returns the builder."""
  builder = tree.spec.builder_class(
      data_dir=str(data_dir), config=tree.spec.category,
      file_format="array_record",
  )
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=str(tree.manual_dir)
      )
  )
  return builder


def read_split(
    builder: tfds.core.DatasetBuilder, split: str
) -> dict[str, dict[str, object]]:
  """Returns {file_name: example} of one split."""
  source = builder.as_data_source(split=split)
  examples = [source[index] for index in range(len(source))]
  return {example["file_name"].decode(): example for example in examples}


def read_pixels(path: pathlib.Path) -> np.ndarray:
  return np.asarray(Image.open(path).convert("RGB"))
