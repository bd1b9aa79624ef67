"""Checks shared by builders that read a manually downloaded image folder.

A builder describes its data set with a `LayoutGuide` and walks the folder
with these helpers before generating anything. Every problem raises
`DatasetLayoutError` with the path at fault, the expected layout and the
download address, so the user can fix the folder without reading the builder.

Hidden entries (names that start with ".", the OS files in
`OS_METADATA_FILES` and `__MACOSX/` folders) are skipped. A hidden file that is
a readable image is an error instead, because skipping it would drop an image
without a trace. A skipped hidden folder that contains image files is logged
as a warning that names it.

File extensions and OS file names are compared in any letter case, so
"000.PNG" is an image and "THUMBS.DB" is skipped.
"""

from collections.abc import Sequence
import dataclasses
import os

from absl import logging
from etils import epath
import numpy as np
from PIL import Image

# Files that operating systems write into folders they display, in lower case.
# `is_hidden` compares names in any letter case.
OS_METADATA_FILES = frozenset({"thumbs.db", "desktop.ini"})

# Folder that the macOS archiver adds next to the packed files.
MACOS_ARCHIVE_DIR = "__MACOSX"

# Extensions of image files, lower case. JPEG is lossy, so masks are PNG or BMP.
IMAGE_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg")
MASK_EXTENSIONS = (".png", ".bmp")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG color types with more than one channel: RGB, gray + alpha, RGBA.
_PNG_MULTICHANNEL_COLOR_TYPES = (2, 4, 6)

# Errors Pillow raises on files that are missing, unreadable or not images.
PIL_READ_ERRORS = (
    OSError, SyntaxError, ValueError, Image.DecompressionBombError
)


class DatasetLayoutError(ValueError):
  """Raised when a data set folder does not match the layout a builder reads."""


class UnsupportedImageError(ValueError):
  """Raised for a decoded image with float pixels or integers beyond 16 bits."""


@dataclasses.dataclass(frozen=True)
class LayoutGuide:
  """The help text that every `DatasetLayoutError` of one data set ends with.

  Attributes:
    dataset_name: the data set as users know it, for example "MVTec AD".
    layout: the expected folder tree, one entry per line.
    download_url: the page where the data set is downloaded from.
  """

  dataset_name: str
  layout: str
  download_url: str

  def error(self, problem: str) -> DatasetLayoutError:
    """Returns an error stating `problem`, the layout and the download page."""
    return DatasetLayoutError(
        f"{problem}\n\n"
        f"Expected layout of {self.dataset_name}:\n{self.layout.rstrip()}\n\n"
        f"Download {self.dataset_name} from {self.download_url}, unpack it and "
        "set config.data.manual_dir to the unpacked folder.\n"
        f"Problem: {problem}"
    )


def is_hidden(path: epath.Path) -> bool:
  """Returns whether `path` is a dot file or folder or an OS metadata file.

  OS metadata file names match in any letter case.
  """
  return (path.name.startswith(".") or path.name.lower() in OS_METADATA_FILES
          or path.name == MACOS_ARCHIVE_DIR)


def has_extension(path: epath.Path, extensions: Sequence[str]) -> bool:
  """Returns whether the suffix of `path`, in lower case, is in `extensions`."""
  return path.suffix.lower() in extensions


def normalize_dir(path: epath.PathLike) -> str:
  """Returns `path` as an absolute path without symlinks (URLs unchanged)."""
  text = os.fspath(path)
  if "://" in text:
    return text
  return os.path.realpath(os.path.expanduser(text))


def require_manual_dir(
    manual_dir: epath.PathLike, guide: LayoutGuide
) -> epath.Path:
  """Checks that `manual_dir` is a folder with visible entries and returns it.

  Raises:
    DatasetLayoutError: if the folder is missing, is a file or is empty.
  """
  path = epath.Path(os.path.expanduser(os.fspath(manual_dir)))
  if not path.exists():
    raise guide.error(f"manual_dir {path} does not exist.")
  if not path.is_dir():
    raise guide.error(f"manual_dir {path} is a file, not a folder.")
  if not any(not is_hidden(entry) for entry in path.iterdir()):
    raise guide.error(f"manual_dir {path} is empty.")
  return path


def require_dir(path: epath.Path, guide: LayoutGuide) -> epath.Path:
  """Checks that the folder `path` exists and returns it.

  Raises:
    DatasetLayoutError: naming `path` if it is missing or is a file.
  """
  if not path.is_dir():
    problem = "is a file" if path.exists() else "is missing"
    raise guide.error(f"Folder {path} {problem}.")
  return path


def list_subdirs(folder: epath.Path) -> list[epath.Path]:
  """Returns the visible subfolders of `folder`, sorted by name."""
  return sorted(
      (entry for entry in folder.iterdir()
       if entry.is_dir() and not is_hidden(entry)),
      key=lambda entry: entry.name,
  )


def list_image_files(
    folder: epath.Path, guide: LayoutGuide
) -> list[epath.Path]:
  """Returns the visible files of an image folder, sorted by name.

  The files are not opened here, except hidden files: `read_image_size`
  checks the returned ones. An empty folder counts as a broken copy, because
  it usually comes from an interrupted download or unpacking. Hidden
  subfolders are skipped, with a warning if they contain image files (see
  `warn_if_hidden_dir_has_images`).

  Raises:
    DatasetLayoutError: if `folder` is missing, contains no visible file, has a
      visible subfolder (its images would be skipped), a visible file whose
      extension is not in `IMAGE_EXTENSIONS` or a hidden file that is an image.
  """
  require_dir(folder, guide)
  files = []
  for entry in sorted(folder.iterdir(), key=lambda entry: entry.name):
    if entry.is_dir():
      if not is_hidden(entry):
        raise guide.error(
            f"Unexpected folder {entry}: image folders contain files only."
        )
      warn_if_hidden_dir_has_images(entry)
      continue

    if not is_hidden(entry):
      if not has_extension(entry, IMAGE_EXTENSIONS):
        raise guide.error(
            f"Unexpected file {entry}: image folders contain only "
            f"{format_choices(IMAGE_EXTENSIONS)} images. Move or delete it."
        )
      files.append(entry)
    elif _opens_as_image(entry):
      raise guide.error(
          f"Hidden image file {entry}. Hidden files are skipped, so rename it "
          "or delete it."
      )

  if not files:
    raise guide.error(f"Folder {folder} contains no images.")
  return files


def reject_loose_images(
    folder: epath.Path, guide: LayoutGuide, expected_place: str
) -> None:
  """Checks that the visible files directly in `folder` are not images.

  Use it on folders that contain image folders, where a loose image would be
  skipped. Other files, such as a license or a readme, are allowed. Hidden
  subfolders of `folder` that contain image files are logged as warnings
  (see `warn_if_hidden_dir_has_images`).

  Raises:
    DatasetLayoutError: naming the first image file, with `expected_place`
      as the folder where images belong.
  """
  for entry in sorted(folder.iterdir(), key=lambda entry: entry.name):
    if entry.is_dir():
      if is_hidden(entry):
        warn_if_hidden_dir_has_images(entry)
      continue
    if is_hidden(entry):
      continue
    if has_extension(entry, IMAGE_EXTENSIONS):
      raise guide.error(
          f"Unexpected image file {entry}: images belong in {expected_place}. "
          "Move it there or delete it."
      )


def warn_if_hidden_dir_has_images(folder: epath.Path) -> None:
  """Logs a warning naming the skipped hidden `folder` if it has image files.

  Image files are visible files with an extension in `IMAGE_EXTENSIONS`, at
  any depth below `folder`. The AppleDouble files of `__MACOSX/` start with
  "._", so they are hidden and do not count.
  """
  num_images = 0
  for _, _, file_names in folder.walk():
    num_images += sum(
        1 for name in file_names
        if not is_hidden(epath.Path(name))
        and has_extension(epath.Path(name), IMAGE_EXTENSIONS)
    )
  if num_images:
    logging.warning(
        "Ignoring hidden folder %s, which contains image files (%d). Hidden "
        "folders are skipped, so rename the folder if its images belong to "
        "the data set.", folder, num_images,
    )


def read_image_size(path: epath.Path, guide: LayoutGuide) -> tuple[int, int]:
  """Reads the header of the image at `path` and returns (width, height).

  Only the header is read, so a file whose pixel data is cut off passes here
  and fails later in `load_rgb_image` or `load_binary_mask`.

  Raises:
    DatasetLayoutError: naming `path` if it cannot be opened as an image.
  """
  try:
    with path.open("rb") as file, Image.open(file) as image:
      return image.size
  except PIL_READ_ERRORS as error:
    raise guide.error(
        f"Failed to read image {path}: {error}. Replace the file with an "
        "intact copy or delete it."
    ) from error


def read_mask_size(path: epath.Path, guide: LayoutGuide) -> tuple[int, int]:
  """Reads the header of the mask at `path` and returns (width, height).

  Raises:
    DatasetLayoutError: naming `path` if it cannot be opened as an image or is
      a PNG with 16 bits per channel and more than one channel.
  """
  size = read_image_size(path, guide)
  _check_mask_depth(path, guide)
  return size


def load_rgb_image(path: epath.Path, guide: LayoutGuide) -> Image.Image:
  """Decodes the image at `path` as 8-bit RGB (gray is repeated, alpha dropped).

  Of 16-bit channels the 8 most significant bits are kept. Palette images are
  mapped to their colors.

  Raises:
    DatasetLayoutError: naming `path` if the file cannot be decoded, or if its
      pixels do not fit 16 bits (see `convert_to_rgb`).
  """
  image = _load_image(path, guide)
  try:
    return convert_to_rgb(image)
  except UnsupportedImageError as error:
    raise guide.error(f"Unsupported image {path}: {error}") from error


def convert_to_rgb(image: Image.Image) -> Image.Image:
  """Converts a decoded image to 8-bit RGB as `load_rgb_image` describes.

  32-bit integer gray (Pillow mode "I") is read like 16-bit gray when every
  value is in [0, 65535].

  Raises:
    UnsupportedImageError: for 32-bit integer gray with values outside
      [0, 65535] and for floating-point gray (mode "F"), which have no
      fixed range to map to 8 bits. The message does not name the file, so
      callers add its path.
  """
  if image.mode == "F":
    raise UnsupportedImageError(
        "its pixels are 32-bit floating-point numbers (Pillow mode F), which "
        "have no fixed range to map to 8 bits. Save it as an 8-bit or 16-bit "
        "image."
    )

  if image.mode in ("I", "I;16", "I;16B", "I;16L"):
    values = np.asarray(image)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 0xFFFF:
      raise UnsupportedImageError(
          f"its pixels are 32-bit integers (Pillow mode I) from {low} to "
          f"{high}, outside the 16-bit range 0 to 65535. Save it as an 8-bit "
          "or 16-bit image."
      )
    # 16-bit gray: keep the 8 most significant bits, since convert("RGB")
    # would clip every value above 255.
    image = Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8),
                            "L")
  return image.convert("RGB")


def load_binary_mask(path: epath.Path, guide: LayoutGuide) -> Image.Image:
  """Decodes the mask at `path` as an 8-bit image with values 0 and 255.

  A pixel is anomalous (255) when any of its color channels is non-zero, so
  masks stored as 0/1, 0/255, with anti-aliased edges or with class codes all
  work. Alpha is ignored, palette images are mapped to their colors first and
  16-bit, 32-bit integer and floating-point gray values are compared at full
  depth.

  Raises:
    DatasetLayoutError: naming `path` if the file cannot be decoded, or if it is
      a PNG with 16 bits per channel and more than one channel.
  """
  _check_mask_depth(path, guide)
  image = _load_image(path, guide)
  if image.mode == "P":
    image = image.convert("RGBA")

  values = np.asarray(image)
  if values.ndim == 3:
    color_channels = 1 if image.mode == "LA" else 3
    anomalous = np.any(values[..., :color_channels] != 0, axis=-1)
  else:
    anomalous = values != 0
  return Image.fromarray(np.where(anomalous, 255, 0).astype(np.uint8), "L")


def check_mask_size(
    image_path: epath.Path,
    image_size: tuple[int, int],
    mask_path: epath.Path,
    mask_size: tuple[int, int],
    guide: LayoutGuide,
) -> None:
  """Checks that a mask has the (width, height) of its image.

  Raises:
    DatasetLayoutError: naming both files and both sizes if they differ.
  """
  if tuple(image_size) != tuple(mask_size):
    raise guide.error(
        f"Mask {mask_path} is {_format_size(mask_size)} pixels but its image "
        f"{image_path} is {_format_size(image_size)} pixels. A mask must have "
        "the size of its image."
    )


def format_choices(choices: Sequence[str]) -> str:
  """Returns `choices` as a comma-separated list for messages."""
  return ", ".join(choices)


def _format_size(size: tuple[int, int]) -> str:
  width, height = size
  return f"{width}x{height} (width x height)"


def _check_mask_depth(path: epath.Path, guide: LayoutGuide) -> None:
  """Raises for PNG masks with 16 bits per channel and 2 to 4 channels.

  Pillow (checked with 13.0) decodes these to 8 bits per channel by dropping
  the low byte, so a mask stored with small values such as 1 would read as
  all zero. 16-bit grayscale masks keep their full depth and are accepted.
  """
  try:
    with path.open("rb") as file:
      header = file.read(26)
  except OSError:
    return  # `_load_image` or `read_image_size` reports the unreadable file.
  if not header.startswith(_PNG_SIGNATURE) or len(header) < 26:
    return

  # IHDR is always the first chunk: bit depth at byte 24, color type at 25.
  bit_depth, color_type = header[24], header[25]
  if bit_depth == 16 and color_type in _PNG_MULTICHANNEL_COLOR_TYPES:
    raise guide.error(
        f"Mask {path} is a PNG with 16 bits per color channel, which cannot be "
        "read without losing values. Save it as 8-bit or as 16-bit grayscale."
    )


def _opens_as_image(path: epath.Path) -> bool:
  try:
    with path.open("rb") as file, Image.open(file):
      return True
  except PIL_READ_ERRORS:
    return False


def _load_image(path: epath.Path, guide: LayoutGuide) -> Image.Image:
  """Decodes all pixels of the image at `path`, raising with the path."""
  try:
    with path.open("rb") as file, Image.open(file) as image:
      image.load()
      return image.copy()
  except PIL_READ_ERRORS as error:
    raise guide.error(
        f"Failed to decode image {path}: {error}. Replace the file with an "
        "intact copy or delete it."
    ) from error
