"""Anomaly data made from scikit-image's texture photographs.

Each category is one 512 x 512 grayscale photograph. Training images and
normal test images are crops from disjoint horizontal bands of it, so no test
pixel was ever seen in training. Anomalous test images are crops from the test
band with one painted defect, and the mask marks exactly the painted pixels.

Defect kinds:
* ``scratch``: a thin curved stroke, much darker or brighter than its
  surroundings.
* ``hole``: a blob where the material is missing, dark with faint texture.
* ``stain``: a blob tinted with a colour (rust, oil, paint) at partial opacity.
* ``contamination``: a blob of foreign material, filled with a patch of a
  colour photograph (a coffee cup, a cat's fur).
"""

import numpy as np
from scipy import ndimage
from skimage import data as skimage_data

# category -> (scikit-image texture photograph, colour photograph that
# contamination patches come from)
PHOTOGRAPHS = {
    "brick": ("brick", "coffee"),
    "gravel": ("gravel", "chelsea"),
    "grass": ("grass", "coffee"),
}
DEFECT_TYPES = ("scratch", "hole", "stain", "contamination")

CROP_SIZE = 128
TRAIN_ROWS = (0, 320)  # Rows of the photograph that training crops come from.
TEST_ROWS = (320, 512)  # Rows that test crops come from.
NUM_TRAIN = 160
NUM_TEST_GOOD = 40
NUM_TEST_PER_DEFECT = 15

_STAIN_COLOURS = np.array(
    [[150, 70, 20], [30, 30, 20], [200, 40, 40], [40, 90, 200]], np.float32)


def load_photograph(name: str) -> np.ndarray:
  """Returns a scikit-image photograph, uint8 [H, W] or [H, W, 3].

  Texture photographs are grayscale 512 x 512; the colour ones are larger
  than CROP_SIZE on both sides.
  """
  photograph = getattr(skimage_data, name)()
  if (photograph.dtype != np.uint8 or min(photograph.shape[:2]) < CROP_SIZE
      or photograph.ndim not in (2, 3)):
    raise ValueError(
        f"scikit-image's {name!r} photograph is {photograph.shape} "
        f"{photograph.dtype}, expected uint8 with sides >= {CROP_SIZE}.")
  return photograph


def _random_crop(photograph, rows, rng):
  """Returns a float32 [CROP_SIZE, CROP_SIZE, 3] crop whose top is in rows."""
  top = rng.integers(rows[0], rows[1] - CROP_SIZE + 1)
  left = rng.integers(0, photograph.shape[1] - CROP_SIZE + 1)
  crop = photograph[top:top + CROP_SIZE, left:left + CROP_SIZE]
  if crop.ndim == 2:
    crop = np.repeat(crop[..., None], 3, axis=-1)
  return crop.astype(np.float32)


def _blob_mask(rng, min_radius=9.0, max_radius=20.0):
  """Returns a random smooth blob, bool [CROP_SIZE, CROP_SIZE]."""
  radius = rng.uniform(min_radius, max_radius)
  margin = int(max_radius) + 4
  center = rng.uniform(margin, CROP_SIZE - margin, size=2)
  ys, xs = np.mgrid[:CROP_SIZE, :CROP_SIZE].astype(np.float32)
  angle = np.arctan2(ys - center[0], xs - center[1])
  distance = np.hypot(ys - center[0], xs - center[1])
  # A radius that wobbles with the angle gives irregular outlines.
  wobble = np.zeros_like(angle)
  for harmonic in (2, 3, 5):
    wobble += rng.uniform(-0.15, 0.15) * np.cos(
        harmonic * angle + rng.uniform(0, 2 * np.pi))
  stretch = rng.uniform(0.6, 1.0)
  direction = rng.uniform(0, np.pi)
  along = np.cos(angle - direction) ** 2 + (np.sin(angle - direction) / stretch) ** 2
  return distance * np.sqrt(along) < radius * (1.0 + wobble)


def _scratch_mask(rng):
  """Returns a thin curved stroke, bool [CROP_SIZE, CROP_SIZE]."""
  length = rng.uniform(30, 60)
  start = rng.uniform(20, CROP_SIZE - 20, size=2)
  heading = rng.uniform(0, 2 * np.pi)
  curvature = rng.uniform(-0.04, 0.04)
  mask = np.zeros((CROP_SIZE, CROP_SIZE), bool)
  position = start.copy()
  for _ in range(int(length * 2)):
    position += 0.5 * np.array([np.sin(heading), np.cos(heading)])
    heading += curvature
    row, col = np.round(position).astype(int)
    if 0 <= row < CROP_SIZE and 0 <= col < CROP_SIZE:
      mask[row, col] = True
  width = int(rng.integers(1, 3))
  return ndimage.binary_dilation(mask, iterations=width)


def paint_defect(image, defect_type, other_photograph, rng):
  """Paints one defect on a float32 [H, W, 3] crop in [0, 255].

  Returns (uint8 image, bool mask) with the mask set exactly where the
  defect was painted.
  """
  image = image.copy()
  if defect_type == "scratch":
    mask = _scratch_mask(rng)
    level = rng.choice([rng.uniform(0, 30), rng.uniform(225, 255)])
    image[mask] = level
  elif defect_type == "hole":
    mask = _blob_mask(rng)
    residual_texture = 0.15 * (image[mask] - image[mask].mean())
    image[mask] = rng.uniform(5, 25) + residual_texture
  elif defect_type == "stain":
    mask = _blob_mask(rng)
    colour = _STAIN_COLOURS[rng.integers(len(_STAIN_COLOURS))]
    opacity = rng.uniform(0.55, 0.8)
    image[mask] = (1 - opacity) * image[mask] + opacity * colour
  elif defect_type == "contamination":
    mask = _blob_mask(rng)
    patch = _random_crop(other_photograph, (0, other_photograph.shape[0]), rng)
    image[mask] = patch[mask]
  else:
    raise ValueError(
        f"Unknown defect type {defect_type!r}; expected one of {DEFECT_TYPES}.")
  return np.clip(np.round(image), 0, 255).astype(np.uint8), mask


def generate_category(category: str, seed: int = 0):
  """Returns an iterator of (split, defect_type, index, image, mask).

  Images are uint8 [128, 128, 3] and masks bool [128, 128]. The output depends
  only on the category and the seed. An unknown category raises ValueError
  here, before iteration starts.
  """
  if category not in PHOTOGRAPHS:
    raise ValueError(
        f"Unknown category {category!r}; expected one of {sorted(PHOTOGRAPHS)}.")
  return _generate(category, seed)


def _generate(category: str, seed: int):
  photo_name, other_name = PHOTOGRAPHS[category]
  photograph = load_photograph(photo_name)
  other_photograph = load_photograph(other_name)
  rng = np.random.default_rng([seed, sorted(PHOTOGRAPHS).index(category)])
  empty = np.zeros((CROP_SIZE, CROP_SIZE), bool)

  for index in range(NUM_TRAIN):
    crop = _random_crop(photograph, TRAIN_ROWS, rng).astype(np.uint8)
    yield "train", "good", index, crop, empty
  for index in range(NUM_TEST_GOOD):
    crop = _random_crop(photograph, TEST_ROWS, rng).astype(np.uint8)
    yield "test", "good", index, crop, empty
  for defect_type in DEFECT_TYPES:
    for index in range(NUM_TEST_PER_DEFECT):
      crop = _random_crop(photograph, TEST_ROWS, rng)
      image, mask = paint_defect(crop, defect_type, other_photograph, rng)
      yield "test", defect_type, index, image, mask
