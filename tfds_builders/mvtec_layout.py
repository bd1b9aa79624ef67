"""Reads data sets stored in the folder layout of MVTec AD.

MVTec AD, MPDD and BTAD store each category in one tree::

  <category>/train/<normal>/         normal training images
  <category>/test/<normal>/          normal test images
  <category>/test/<defect>/          anomalous test images, one folder per defect
  <category>/ground_truth/<defect>/  one mask per anomalous test image

The data sets differ in the name of the normal folders ("good" in MVTec AD
and MPDD, "ok" in BTAD), in file formats and in mask names. `CategoryLayout`
holds these names, and the rules below cover the rest for every data set:

* Images are .png, .bmp, .jpg or .jpeg files, and masks are .png or .bmp
  files. Extensions match in any letter case.
* The mask of test/<defect>/<stem>.<ext> is ground_truth/<defect>/<stem>_mask
  or ground_truth/<defect>/<stem>, with a mask extension. Exactly one of these
  files must exist, so two candidates are an error that names both.
* Any non-zero mask pixel is anomalous (see `layout.load_binary_mask`).
  A mask without a non-zero pixel is an error. A mask without a zero pixel is
  logged as a warning, because a defect may cover the whole image but a mask
  with a white or transparent background looks the same.
* Every image folder must contain images. An empty defect folder is an error,
  because it usually comes from an interrupted download or unpacking. Delete
  the folder to leave that defect type out.
* Images directly in the category, train/, test/ or ground_truth/ folder are
  errors, since no label can be given to them. Other files there, such as a
  license or a readme, are ignored. So is anything next to the category
  folders in manual_dir.
* Masks that match no image, and unknown folders in a category folder, are
  logged as warnings and otherwise ignored.
* Hidden files and folders, `__MACOSX/` included, are skipped as in `layout`.
  Hidden folders that contain image files are logged as warnings.

The examples have the features of `tfds_builders.features`. Their
`defect_type` is `features.NORMAL_DEFECT_TYPE` for normal images whatever the
normal folder is named.
"""

from collections.abc import Iterable
import dataclasses

from absl import logging
from etils import epath
import numpy as np
from PIL import Image

from tfds_builders import features
from tfds_builders import layout

# Subfolders of a category folder.
TRAIN_DIR = "train"
TEST_DIR = "test"
GROUND_TRUTH_DIR = "ground_truth"

# Mask names for test/<defect>/<stem>.<ext>, before the mask extension.
MASK_STEM_FORMATS = ("{stem}_mask", "{stem}")

# Number of unused masks named in a warning before the rest are counted.
_MAX_NAMED_MASKS = 5


@dataclasses.dataclass(frozen=True)
class CategoryLayout:
  """The names that one data set uses in the MVTec AD folder layout.

  Attributes:
    guide: the help text of the data set's errors.
    categories: the category folder names, which are also the BuilderConfig
      names.
    normal_dir: the name of the folders of normal images in train/ and test/.
    mask_name_format: the mask name that the data set ships, with "{stem}" for
      the image stem, such as "{stem}_mask.png". Error messages name it first
      among the accepted mask names.
  """

  guide: layout.LayoutGuide
  categories: tuple[str, ...]
  normal_dir: str
  mask_name_format: str


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """One image of a category folder, checked but not yet decoded.

  Attributes:
    image_path: the image file.
    mask_path: its ground-truth mask, None for normal images.
    defect_type: the defect folder name, `features.NORMAL_DEFECT_TYPE` for
      normal images.
    file_name: `image_path` relative to the category folder, with "/".
  """

  image_path: epath.Path
  mask_path: epath.Path | None
  defect_type: str
  file_name: str

  @property
  def is_normal(self) -> bool:
    return self.mask_path is None


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


def index_category(
    manual_dir: epath.PathLike, category: str, category_layout: CategoryLayout
) -> CategoryIndex:
  """Checks the folder of `category` under `manual_dir` and lists its images.

  Reads file lists and image headers only. Pixel data is decoded later, by
  `load_example`, while the examples are generated.

  Raises:
    DatasetLayoutError: if `category` is unknown or the folder breaks a rule
      of this module. The message names the path or value at fault.
  """
  guide = category_layout.guide
  if category not in category_layout.categories:
    raise guide.error(
        f"Unknown {guide.dataset_name} category {category!r}. Valid "
        f"categories: {layout.format_choices(category_layout.categories)}."
    )

  root = layout.require_manual_dir(manual_dir, guide)
  category_dir = _require_category_dir(root, category, guide)
  _check_category_dir(category_dir, category_layout)

  train = _index_train(category_dir, category_layout)
  test = _index_test(category_dir, category_layout)
  return CategoryIndex(
      manual_dir=layout.normalize_dir(root), train=train, test=test
  )


def load_example(
    record: ImageRecord, guide: layout.LayoutGuide
) -> dict[str, object]:
  """Decodes one record into the features of `tfds_builders.features`.

  Logs a warning naming the mask if every mask pixel is anomalous.

  Raises:
    DatasetLayoutError: naming the file if the image or mask cannot be
      decoded, if their sizes differ or if the mask has no non-zero pixel.
  """
  image = layout.load_rgb_image(record.image_path, guide)

  if record.mask_path is None:
    mask = Image.new("L", image.size, 0)
  else:
    mask = layout.load_binary_mask(record.mask_path, guide)
    layout.check_mask_size(
        record.image_path, image.size, record.mask_path, mask.size, guide
    )
    anomalous = np.asarray(mask) != 0
    if not anomalous.any():
      raise guide.error(
          f"Mask {record.mask_path} of anomalous image {record.image_path} "
          "has no non-zero pixel. Fix the mask or move the image to the "
          "folder of normal test images.")
    if anomalous.all():
      logging.warning(
          "Mask %s of anomalous image %s marks every pixel as anomalous. If "
          "the mask has a white or transparent background, save it with a "
          "black one, because any non-zero color is anomalous and alpha is "
          "ignored.", record.mask_path, record.image_path,
      )

  label = features.LABEL_NAMES[0 if record.is_normal else 1]
  return {
      "image": image,
      "mask": mask,
      "label": label,
      "defect_type": record.defect_type,
      "file_name": record.file_name,
  }


def _require_category_dir(
    root: epath.Path, category: str, guide: layout.LayoutGuide
) -> epath.Path:
  """Returns root/category, or raises with a hint about where it may be."""
  category_dir = root / category
  if category_dir.is_dir():
    return category_dir

  problem = f"Category folder {category_dir} is missing."
  if (root / TRAIN_DIR).is_dir() and (root / TEST_DIR).is_dir():
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
  raise guide.error(problem)


def _check_category_dir(
    category_dir: epath.Path, category_layout: CategoryLayout
) -> None:
  """Rejects loose images and logs unknown folders in the category folder."""
  normal_dir = category_layout.normal_dir
  layout.reject_loose_images(
      category_dir, category_layout.guide,
      f"{TRAIN_DIR}/{normal_dir}/, {TEST_DIR}/{normal_dir}/ or "
      f"{TEST_DIR}/<defect>/",
  )

  known = (TRAIN_DIR, TEST_DIR, GROUND_TRUTH_DIR)
  for subdir in layout.list_subdirs(category_dir):
    if subdir.name not in known:
      logging.warning(
          "Ignoring folder %s: a category folder is read from %s only.",
          subdir, layout.format_choices([f"{name}/" for name in known]),
      )


def _index_train(
    category_dir: epath.Path, category_layout: CategoryLayout
) -> list[ImageRecord]:
  """Lists train/<normal> and rejects other folders in train/."""
  guide = category_layout.guide
  normal_dir = category_layout.normal_dir
  train_dir = layout.require_dir(category_dir / TRAIN_DIR, guide)
  layout.reject_loose_images(
      train_dir, guide, f"{TRAIN_DIR}/{normal_dir}/"
  )
  for subdir in layout.list_subdirs(train_dir):
    if subdir.name != normal_dir:
      raise guide.error(
          f"Unexpected folder {subdir}: {guide.dataset_name} trains on normal "
          f"images only, so {TRAIN_DIR}/ must contain {normal_dir}/ only."
      )

  records = []
  for image_path in layout.list_image_files(train_dir / normal_dir, guide):
    layout.read_image_size(image_path, guide)
    records.append(_make_record(category_dir, image_path, None))
  return records


def _index_test(
    category_dir: epath.Path, category_layout: CategoryLayout
) -> list[ImageRecord]:
  """Lists test/<defect>/ and pairs each anomalous image with its mask."""
  guide = category_layout.guide
  normal_dir = category_layout.normal_dir
  test_dir = layout.require_dir(category_dir / TEST_DIR, guide)
  layout.reject_loose_images(
      test_dir, guide, f"{TEST_DIR}/{normal_dir}/ or {TEST_DIR}/<defect>/"
  )
  defect_dirs = layout.list_subdirs(test_dir)
  if not defect_dirs:
    raise guide.error(f"Folder {test_dir} contains no defect folders.")

  names = [defect_dir.name for defect_dir in defect_dirs]
  if normal_dir not in names:
    raise guide.error(
        f"Folder {test_dir} has no {normal_dir}/ folder of normal test "
        "images; image-level metrics need normal and anomalous test images.")
  if names == [normal_dir]:
    raise guide.error(
        f"Folder {test_dir} has only normal test images; add at least one "
        f"defect folder with its masks under {GROUND_TRUTH_DIR}/.")

  defect_types = [name for name in names if name != normal_dir]
  ground_truth_dir = category_dir / GROUND_TRUTH_DIR
  if not ground_truth_dir.is_dir():
    raise guide.error(
        f"Folder {ground_truth_dir} is missing. It must contain the masks of "
        f"the anomalous test images in {TEST_DIR}/ "
        f"({layout.format_choices(defect_types)}).")
  layout.reject_loose_images(
      ground_truth_dir, guide, f"{GROUND_TRUTH_DIR}/<defect>/"
  )

  records = []
  mask_owners = {}
  for defect_dir in defect_dirs:
    if defect_dir.name == normal_dir:
      for image_path in layout.list_image_files(defect_dir, guide):
        layout.read_image_size(image_path, guide)
        records.append(_make_record(category_dir, image_path, None))
      continue

    records += _index_defect_dir(
        category_dir, defect_dir, mask_owners, category_layout
    )

  _warn_about_unused_masks(ground_truth_dir, defect_types, mask_owners)
  return records


def _index_defect_dir(
    category_dir: epath.Path,
    defect_dir: epath.Path,
    mask_owners: dict[epath.Path, epath.Path],
    category_layout: CategoryLayout,
) -> list[ImageRecord]:
  """Lists the anomalous images of `defect_dir` with their masks.

  `mask_owners` maps each mask used so far to its image, so that one mask
  claimed by two images is an error. New pairs are added to it.
  """
  guide = category_layout.guide
  image_paths = layout.list_image_files(defect_dir, guide)
  mask_dir = category_dir / GROUND_TRUTH_DIR / defect_dir.name
  if not mask_dir.is_dir():
    raise guide.error(
        f"Anomalous images in {defect_dir} have no masks: folder {mask_dir} "
        "is missing.")
  masks_by_stem = _group_by_stem(layout.list_image_files(mask_dir, guide))

  records = []
  for image_path in image_paths:
    image_size = layout.read_image_size(image_path, guide)
    mask_path = _find_mask(
        image_path, mask_dir, masks_by_stem, category_layout
    )

    if mask_path in mask_owners:
      raise guide.error(
          f"Mask {mask_path} matches two images, {mask_owners[mask_path]} and "
          f"{image_path}. Rename or delete one of them, since every anomalous "
          "image needs a mask of its own.")
    mask_owners[mask_path] = image_path

    mask_size = layout.read_mask_size(mask_path, guide)
    layout.check_mask_size(image_path, image_size, mask_path, mask_size, guide)
    records.append(_make_record(category_dir, image_path, mask_path))
  return records


def _group_by_stem(
    paths: Iterable[epath.Path],
) -> dict[str, list[epath.Path]]:
  """Returns {stem: files with that stem}, for files with a mask extension."""
  groups = {}
  for path in paths:
    if layout.has_extension(path, layout.MASK_EXTENSIONS):
      groups.setdefault(path.stem, []).append(path)
  return groups


def _find_mask(
    image_path: epath.Path,
    mask_dir: epath.Path,
    masks_by_stem: dict[str, list[epath.Path]],
    category_layout: CategoryLayout,
) -> epath.Path:
  """Returns the one mask of `image_path` in `mask_dir`.

  Raises:
    DatasetLayoutError: if no file or more than one file has a mask name of
      the image (`MASK_STEM_FORMATS` with a mask extension).
  """
  guide = category_layout.guide
  stems = [
      stem_format.format(stem=image_path.stem)
      for stem_format in MASK_STEM_FORMATS
  ]
  candidates = [path for stem in stems for path in masks_by_stem.get(stem, [])]
  if len(candidates) == 1:
    return candidates[0]

  if candidates:
    names = layout.format_choices([str(path) for path in candidates])
    raise guide.error(
        f"Anomalous image {image_path} has {len(candidates)} masks: {names}. "
        "Keep one of them and delete the others.")

  shipped_name = category_layout.mask_name_format.format(stem=image_path.stem)
  other_names = [
      f"{stem}{extension}"
      for stem in stems for extension in layout.MASK_EXTENSIONS
      if f"{stem}{extension}" != shipped_name
  ]
  raise guide.error(
      f"Anomalous image {image_path} has no mask: {mask_dir / shipped_name} "
      f"is missing, and so are {layout.format_choices(other_names)} in any "
      "letter case of the extension.")


def _warn_about_unused_masks(
    ground_truth_dir: epath.Path,
    defect_types: list[str],
    mask_owners: dict[epath.Path, epath.Path],
) -> None:
  """Logs a warning for each mask folder or mask that no test image uses."""
  for mask_dir in layout.list_subdirs(ground_truth_dir):
    if mask_dir.name not in defect_types:
      logging.warning(
          "Ignoring folder %s: masks are read only for the defect folders of "
          "%s/ (%s).", mask_dir, TEST_DIR, layout.format_choices(defect_types),
      )
      continue

    unused = [
        path for path in sorted(mask_dir.iterdir(), key=lambda p: p.name)
        if not layout.is_hidden(path) and path not in mask_owners
    ]
    if unused:
      named = ", ".join(path.name for path in unused[:_MAX_NAMED_MASKS])
      more = len(unused) - _MAX_NAMED_MASKS
      if more > 0:
        named += f" and {more} more"
      logging.warning(
          "Ignoring %d files in %s that are the mask of no image in %s/%s: "
          "%s.", len(unused), mask_dir, TEST_DIR, mask_dir.name, named,
      )


def _make_record(
    category_dir: epath.Path,
    image_path: epath.Path,
    mask_path: epath.Path | None,
) -> ImageRecord:
  is_normal = mask_path is None
  return ImageRecord(
      image_path=image_path,
      mask_path=mask_path,
      defect_type=(
          features.NORMAL_DEFECT_TYPE if is_normal else image_path.parent.name
      ),
      file_name=image_path.relative_to(category_dir).as_posix(),
  )
