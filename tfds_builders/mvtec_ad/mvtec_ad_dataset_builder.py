"""MVTec AD as a TFDS data set, built from a manually downloaded copy.

One BuilderConfig per category. The `train` split contains the normal training
images and the `test` split contains normal and anomalous test images with their
ground-truth masks, in the features of `tfds_builders.features`.

The whole category folder is checked (file lists and image headers) before
TFDS writes anything, so a broken copy fails fast with a `DatasetLayoutError`.
"""

import dataclasses
from typing import Iterator

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from tfds_builders import features
from tfds_builders import layout

CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)

HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"

# Defect folder name of normal images, in train/ and test/.
NORMAL_DEFECT_TYPE = "good"

LAYOUT = f"""\
<manual_dir>/
  <category>/                      one of {layout.format_choices(CATEGORIES)}
    train/good/*.png               normal training images
    test/good/*.png                normal test images
    test/<defect>/*.png            anomalous test images, one folder per defect
    ground_truth/<defect>/<name>_mask.png
                                   mask of test/<defect>/<name>.png, non-zero
                                   pixels are anomalous
"""

GUIDE = layout.LayoutGuide(
    dataset_name="MVTec AD", layout=LAYOUT, download_url=HOMEPAGE
)

_CITATION = """\
@inproceedings{bergmann2019mvtec,
  title={{MVTec AD} -- A Comprehensive Real-World Dataset for Unsupervised
         Anomaly Detection},
  author={Bergmann, Paul and Fauser, Michael and Sattlegger, David and
          Steger, Carsten},
  booktitle={IEEE/CVF Conference on Computer Vision and Pattern Recognition
             (CVPR)},
  year={2019}
}
"""


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """One image of a category folder, checked but not yet decoded.

  Attributes:
    image_path: the image file.
    mask_path: its ground-truth mask, None for normal images.
    defect_type: the defect folder name, "good" for normal images.
    file_name: `image_path` relative to the category folder, with "/".
  """

  image_path: epath.Path
  mask_path: epath.Path | None
  defect_type: str
  file_name: str


@dataclasses.dataclass(frozen=True)
class CategoryIndex:
  """The checked contents of one category folder.

  Attributes:
    manual_dir: the manual_dir it was read from, as `layout.normalize_dir`
      writes it.
    train: the training images, sorted by file name.
    test: the test images, sorted by file name.
  """

  manual_dir: str
  train: list[ImageRecord]
  test: list[ImageRecord]


def index_category(manual_dir: epath.PathLike, category: str) -> CategoryIndex:
  """Checks the folder of `category` under `manual_dir` and lists its images.

  Reads file lists and image headers only. Pixel data is decoded later, while
  the examples are generated.

  Raises:
    DatasetLayoutError: if `category` is unknown or the folder does not match
      `LAYOUT`. The message names the path or value at fault.
  """
  if category not in CATEGORIES:
    raise GUIDE.error(
        f"Unknown MVTec AD category {category!r}. Valid categories: "
        f"{layout.format_choices(CATEGORIES)}."
    )

  root = layout.require_manual_dir(manual_dir, GUIDE)
  category_dir = _require_category_dir(root, category)

  train = _index_train(category_dir)
  test = _index_test(category_dir)
  return CategoryIndex(
      manual_dir=layout.normalize_dir(root), train=train, test=test
  )


class MvtecAd(tfds.core.GeneratorBasedBuilder):
  """MVTec AD, one BuilderConfig per category, splits `train` and `test`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(
          name=category, description=f"Category {category}."
      )
      for category in CATEGORIES
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download MVTec AD from {HOMEPAGE} (free registration, license
CC BY-NC-SA 4.0), unpack the archive and pass the unpacked folder as
manual_dir. It must have this layout:

{LAYOUT}"""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._category_index: CategoryIndex | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    # `dataset_info_from_configs` needs the builder to sit in a TFDS package
    # folder, so the DatasetInfo is built directly.
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "MVTec AD: industrial products with pixel-level annotations of "
            "surface defects. Training images are normal only."
        ),
        features=features.anomaly_features(),
        homepage=HOMEPAGE,
        citation=_CITATION,
        license="CC BY-NC-SA 4.0",
        # Stores "manual_dir", the folder the prepared copy was built from.
        metadata=tfds.core.MetadataDict(),
    )

  def download_and_prepare(
      self,
      *,
      download_dir: epath.PathLike | None = None,
      download_config: tfds.download.DownloadConfig | None = None,
      **kwargs,
  ) -> None:
    """Checks the category folder, then builds the data set with TFDS.

    The check runs only when something will be generated, and before TFDS
    writes to data_dir. Without `download_config.manual_dir`, TFDS's default
    <download_dir>/manual is read.

    Raises:
      DatasetLayoutError: if the folder does not match `LAYOUT`.
    """
    download_config = download_config or tfds.download.DownloadConfig()
    mode = tfds.download.GenerateMode(download_config.download_mode)
    if not self.is_prepared() or mode.overwrite_dataset:
      manual_dir = download_config.manual_dir or (
          epath.Path(download_dir or self.data_dir_root / "downloads")
          / "manual"
      )
      self._category_index = index_category(
          manual_dir, self.builder_config.name
      )

    super().download_and_prepare(
        download_dir=download_dir, download_config=download_config, **kwargs
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = dl_manager.manual_dir
    index = self._category_index
    if index is None or index.manual_dir != layout.normalize_dir(manual_dir):
      index = index_category(manual_dir, self.builder_config.name)

    self.info.metadata["manual_dir"] = index.manual_dir
    return {
        "train": self._generate_examples(index.train),
        "test": self._generate_examples(index.test),
    }

  def _generate_examples(
      self, records: list[ImageRecord]
  ) -> Iterator[tuple[str, dict[str, object]]]:
    for record in records:
      yield record.file_name, _load_example(record)


def _require_category_dir(root: epath.Path, category: str) -> epath.Path:
  """Returns root/category, or raises with a hint about where it may be."""
  category_dir = root / category
  if category_dir.is_dir():
    return category_dir

  problem = f"Category folder {category_dir} is missing."
  if (root / "train").is_dir() and (root / "test").is_dir():
    problem += (
        f" {root} looks like a category folder itself, so set manual_dir to "
        "its parent."
    )
  else:
    nested = [
        subdir for subdir in layout.list_subdirs(root)
        if (subdir / category).is_dir()
    ]
    if nested:
      problem += f" Found it one level down, so set manual_dir to {nested[0]}."
    else:
      names = [subdir.name for subdir in layout.list_subdirs(root)]
      found = layout.format_choices(names) if names else "no folders"
      problem += f" {root} contains {found}."
  raise GUIDE.error(problem)


def _index_train(category_dir: epath.Path) -> list[ImageRecord]:
  """Lists train/good and rejects other folders in train/."""
  train_dir = layout.require_dir(category_dir / "train", GUIDE)
  for subdir in layout.list_subdirs(train_dir):
    if subdir.name != NORMAL_DEFECT_TYPE:
      raise GUIDE.error(
          f"Unexpected folder {subdir}: MVTec AD trains on normal images only, "
          f"so train/ must contain {NORMAL_DEFECT_TYPE}/ only."
      )

  records = []
  for image_path in layout.list_image_files(
      train_dir / NORMAL_DEFECT_TYPE, GUIDE
  ):
    layout.read_image_size(image_path, GUIDE)
    records.append(_make_record(category_dir, image_path, None))
  return records


def _index_test(category_dir: epath.Path) -> list[ImageRecord]:
  """Lists test/<defect>/ and pairs each anomalous image with its mask."""
  test_dir = layout.require_dir(category_dir / "test", GUIDE)
  defect_dirs = layout.list_subdirs(test_dir)
  if not defect_dirs:
    raise GUIDE.error(f"Folder {test_dir} contains no defect folders.")

  names = [defect_dir.name for defect_dir in defect_dirs]
  if NORMAL_DEFECT_TYPE not in names:
    raise GUIDE.error(
        f"Folder {test_dir} has no {NORMAL_DEFECT_TYPE}/ folder of normal test "
        "images; image-level metrics need normal and anomalous test images.")
  if names == [NORMAL_DEFECT_TYPE]:
    raise GUIDE.error(
        f"Folder {test_dir} has only normal test images; add at least one "
        "defect folder with its masks under ground_truth/.")

  records = []
  for defect_dir in defect_dirs:
    for image_path in layout.list_image_files(defect_dir, GUIDE):
      image_size = layout.read_image_size(image_path, GUIDE)
      if defect_dir.name == NORMAL_DEFECT_TYPE:
        records.append(_make_record(category_dir, image_path, None))
        continue

      mask_path = _mask_path(category_dir, image_path)
      if not mask_path.is_file():
        raise GUIDE.error(
            f"Anomalous image {image_path} has no mask: {mask_path} is "
            "missing."
        )
      mask_size = layout.read_image_size(mask_path, GUIDE)
      layout.check_mask_size(
          image_path, image_size, mask_path, mask_size, GUIDE
      )
      records.append(_make_record(category_dir, image_path, mask_path))
  return records


def _mask_path(category_dir: epath.Path, image_path: epath.Path) -> epath.Path:
  """Returns the mask path of test/<defect>/<stem>.<ext>.

  It is ground_truth/<defect>/<stem>_mask.png in the category folder.
  """
  defect_type = image_path.parent.name
  mask_name = f"{image_path.stem}_mask.png"
  return category_dir / "ground_truth" / defect_type / mask_name


def _make_record(
    category_dir: epath.Path,
    image_path: epath.Path,
    mask_path: epath.Path | None,
) -> ImageRecord:
  return ImageRecord(
      image_path=image_path,
      mask_path=mask_path,
      defect_type=image_path.parent.name,
      file_name=image_path.relative_to(category_dir).as_posix(),
  )


def _load_example(record: ImageRecord) -> dict[str, object]:
  """Decodes one record into the features of `tfds_builders.features`."""
  image = layout.load_rgb_image(record.image_path, GUIDE)

  if record.mask_path is None:
    mask = Image.new("L", image.size, 0)
  else:
    mask = layout.load_binary_mask(record.mask_path, GUIDE)
    layout.check_mask_size(
        record.image_path, image.size, record.mask_path, mask.size, GUIDE
    )
    if not np.asarray(mask).any():
      raise GUIDE.error(
          f"Mask {record.mask_path} of anomalous image {record.image_path} "
          "has no non-zero pixel. Fix the mask or move the image to "
          "test/good/.")

  is_normal = record.defect_type == NORMAL_DEFECT_TYPE
  return {
      "image": image,
      "mask": mask,
      "label": features.LABEL_NAMES[0 if is_normal else 1],
      "defect_type": record.defect_type,
      "file_name": record.file_name,
  }
