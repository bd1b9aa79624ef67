"""Heat-map overlays and PNG panels for inspecting anomaly detection results.

A panel is one PNG with three tiles side by side, separated by gray bars:
input image | ground-truth mask (white on black) | heat-map overlay. Heat maps
are mapped to colors with the jet colormap after linear scaling of
[vmin, vmax] to [0, 1]. Pass the same vmin and vmax for every image of a
category, for example the minimum and maximum over its whole test split, so
that equal colors mean equal scores across panels.
"""

from collections.abc import Sequence
import os
import pathlib
import uuid

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Width in pixels of the vertical bar between two tiles, and its gray level.
SEPARATOR_WIDTH = 4
SEPARATOR_GRAY = 128

# Height in pixels of the strip above the tiles where a title is drawn. Pillow's
# default font is about 11 pixels high, so one line fits with a margin.
TITLE_HEIGHT = 20
_TITLE_MARGIN = 4


def jet_colormap(values: np.ndarray) -> np.ndarray:
  """Map values in [0, 1] to uint8 RGB colors of the jet colormap.

  Jet runs dark blue (0, 0, 128) at 0, through blue, cyan, yellow and red, to
  dark red (128, 0, 0) at 1. Each channel is the piecewise-linear ramp
  clip(1.5 - |4 * value - c|, 0, 1) with c = 3, 2, 1 for red, green and blue.
  Values outside [0, 1] are clipped.

  Args:
    values: float array of any shape [...]. NaN is invalid.

  Returns:
    uint8 array of shape [..., 3].
  """
  values = np.asarray(values, dtype=np.float32)
  if np.isnan(values).any():
    raise ValueError(
        f"values contain {int(np.count_nonzero(np.isnan(values)))} NaN "
        "entries, which have no color."
    )

  scaled = 4.0 * np.clip(values, 0.0, 1.0)[..., None]
  centers = np.array([3.0, 2.0, 1.0], dtype=np.float32)
  channels = np.clip(1.5 - np.abs(scaled - centers), 0.0, 1.0)
  return np.round(channels * 255.0).astype(np.uint8)


def _as_rgb(image: np.ndarray) -> np.ndarray:
  """Return a uint8 [H, W] or [H, W, 1] or [H, W, 3] image as [H, W, 3]."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"image must have dtype uint8, got {image.dtype}.")

  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[2] not in (1, 3):
    raise ValueError(
        f"image must have shape [H, W, 3] or [H, W], got {image.shape}."
    )
  return np.broadcast_to(image, image.shape[:2] + (3,))


def heatmap_overlay(
    image: np.ndarray,
    heatmap: np.ndarray,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
) -> np.ndarray:
  """Blend the jet-colored heat map over the image.

  Args:
    image: uint8 [H, W, 3] RGB image, or [H, W] grayscale.
    heatmap: float [H, W] anomaly scores at the image's resolution.
    vmin: score shown as the lowest color. Lower scores are clipped.
    vmax: score shown as the highest color, greater than vmin.
    alpha: weight of the colored heat map in [0, 1], where 0 returns the image.

  Returns:
    uint8 [H, W, 3] equal to round((1 - alpha) * image + alpha * color).
  """
  image = _as_rgb(image)
  heatmap = np.asarray(heatmap)
  if heatmap.shape != image.shape[:2]:
    raise ValueError(
        f"heatmap shape {heatmap.shape} does not match image shape "
        f"{image.shape[:2]}. Resize the heat map to the image first."
    )
  if heatmap.dtype.kind == "f" and np.isnan(heatmap).any():
    raise ValueError(
        f"heatmap contains {int(np.count_nonzero(np.isnan(heatmap)))} NaN "
        "values, which have no color."
    )
  if not vmax > vmin:
    raise ValueError(f"vmax must be greater than vmin, got {vmin=}, {vmax=}.")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}.")

  normalized = (heatmap.astype(np.float32) - vmin) / (vmax - vmin)
  colors = jet_colormap(normalized).astype(np.float32)
  blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colors
  return np.round(blended).astype(np.uint8)


def _mask_tile(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Render a 0/1 mask as a uint8 [H, W, 3] tile, white where mask is 1."""
  mask = np.asarray(mask)
  if mask.shape != shape:
    raise ValueError(
        f"mask shape {mask.shape} does not match image shape {shape}."
    )

  is_binary = (mask == 0) | (mask == 1)
  if not is_binary.all():
    raise ValueError(
        f"mask must contain only 0 and 1, but {int((~is_binary).sum())} "
        "values differ. Masks stored as 0/255 must be divided by 255 first."
    )

  tile = np.where(mask.astype(bool), np.uint8(255), np.uint8(0))
  return np.repeat(tile[..., None], 3, axis=2)


def _draw_title(panel: Image.Image, title: str) -> None:
  """Draw one line of text in the title strip at the top of the panel."""
  draw = ImageDraw.Draw(panel)
  font = ImageFont.load_default()
  try:
    draw.text((_TITLE_MARGIN, _TITLE_MARGIN), title, fill="white", font=font)
  except UnicodeEncodeError:
    # The bitmap fallback font, used when Pillow has no FreeType support,
    # covers Latin-1 only, so other characters become "?".
    latin1_title = title.encode("latin-1", "replace").decode("latin-1")
    draw.text(
        (_TITLE_MARGIN, _TITLE_MARGIN), latin1_title, fill="white", font=font
    )


def _write_png_atomically(image: Image.Image, path: pathlib.Path) -> None:
  """Write a PNG to a temporary file in the same folder, then rename it.

  os.replace is atomic on POSIX and Windows when both names are in the same
  folder, so `path` contains either its old content or the complete new PNG.
  """
  path.parent.mkdir(parents=True, exist_ok=True)

  # A random suffix keeps concurrent writers of the same panel apart. Unlike
  # tempfile.mkstemp, a plain open keeps the umask's file permissions.
  temp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  try:
    image.save(temp_path, format="PNG")
    os.replace(temp_path, path)
  except BaseException:
    temp_path.unlink(missing_ok=True)
    raise


def save_panel(
    path: str | os.PathLike,
    image: np.ndarray,
    mask: np.ndarray,
    heatmap: np.ndarray,
    vmin: float,
    vmax: float,
    title: str | None = None,
) -> pathlib.Path:
  """Write one panel PNG: input | ground truth | heat-map overlay.

  The panel is 3 * W + 2 * SEPARATOR_WIDTH pixels wide and H pixels high, plus
  TITLE_HEIGHT pixels on top when a title is given. The ground-truth tile is
  white where the mask is 1 and black elsewhere. Parent folders are created,
  and an existing file is replaced only once the new PNG is complete.

  Args:
    path: output file, conventionally ending in ".png".
    image: uint8 [H, W, 3] RGB image, or [H, W] grayscale.
    mask: [H, W] ground truth, 0/1 or bool.
    heatmap: float [H, W] anomaly scores at the image's resolution.
    vmin: score mapped to the lowest color, shared across a category.
    vmax: score mapped to the highest color, shared across a category.
    title: optional single line drawn with Pillow's default font. Text wider
      than the panel is cut off.

  Returns:
    The path written.
  """
  rgb_image = _as_rgb(image)
  height, width = rgb_image.shape[:2]
  tiles = [
      rgb_image,
      _mask_tile(mask, (height, width)),
      heatmap_overlay(rgb_image, heatmap, vmin, vmax),
  ]

  separator = np.full((height, SEPARATOR_WIDTH, 3), SEPARATOR_GRAY, np.uint8)
  row = np.concatenate(
      [tiles[0], separator, tiles[1], separator, tiles[2]], axis=1
  )

  if title is None:
    panel = Image.fromarray(row)
  else:
    panel = Image.new("RGB", (row.shape[1], TITLE_HEIGHT + height), "black")
    panel.paste(Image.fromarray(row), (0, TITLE_HEIGHT))
    _draw_title(panel, title)

  path = pathlib.Path(path)
  _write_png_atomically(panel, path)
  return path


def resize_heatmap(heatmap: np.ndarray, width: int, height: int) -> np.ndarray:
  """Resize a float [h, w] heat map to float32 [height, width], bilinear.

  Pillow's bilinear filter on 32-bit float pixels is used, which averages
  over more pixels when shrinking, as the image resize of the input pipeline
  does. Non-square targets stretch the heat map, which undoes the square
  resize of a non-square input.
  """
  heatmap = np.asarray(heatmap, dtype=np.float32)
  if heatmap.ndim != 2:
    raise ValueError(f"heatmap must have shape [H, W], got {heatmap.shape}.")
  if width < 1 or height < 1:
    raise ValueError(f"width and height must be >= 1, got {width}x{height}.")
  if heatmap.shape == (height, width):
    return heatmap

  resized = Image.fromarray(heatmap, "F").resize(
      (width, height), Image.Resampling.BILINEAR
  )
  return np.asarray(resized, dtype=np.float32)


def save_overlay(
    path: str | os.PathLike,
    image: np.ndarray,
    heatmap: np.ndarray,
    vmin: float,
    vmax: float,
) -> pathlib.Path:
  """Write the heat-map overlay of an image as a PNG of the image's size.

  The heat map is resized to the image with `resize_heatmap`, then blended
  with `heatmap_overlay`. Parent folders are created, and an existing file is
  replaced only once the new PNG is complete.

  Args:
    path: output file, conventionally ending in ".png".
    image: uint8 [H, W, 3] RGB image, or [H, W] grayscale, at its own size.
    heatmap: float [h, w] anomaly scores at any resolution.
    vmin: score mapped to the lowest color.
    vmax: score mapped to the highest color, greater than vmin.

  Returns:
    The path written.
  """
  rgb_image = _as_rgb(image)
  height, width = rgb_image.shape[:2]
  overlay = heatmap_overlay(
      rgb_image, resize_heatmap(heatmap, width, height), vmin, vmax
  )
  path = pathlib.Path(path)
  _write_png_atomically(Image.fromarray(overlay), path)
  return path


def panel_file_name(file_name: str) -> str:
  """Turn a data-set file name into a flat panel name.

  Folders are joined with "_" and the extension is replaced by ".png", so
  "test/crack/000.png" becomes "test_crack_000.png". Empty, "." and ".."
  parts are dropped, and "\\" counts as a folder separator.
  """
  parts = [
      part
      for part in file_name.replace("\\", "/").split("/")
      if part not in ("", ".", "..")
  ]
  if not parts:
    raise ValueError(f"file name {file_name!r} contains no usable part.")

  parts[-1] = pathlib.PurePosixPath(parts[-1]).stem or parts[-1]
  return "_".join(parts) + ".png"


def distinct_png_names(stems: Sequence[str]) -> list[str]:
  """Returns "<stem>.png" per stem, then "<stem>_2.png", ... for repeats.

  Names are compared in lower case, so they stay distinct on file systems
  that ignore letter case.
  """
  names, used_names = [], set()
  for stem in stems:
    name, number = f"{stem}.png", 1
    while name.lower() in used_names:
      number += 1
      name = f"{stem}_{number}.png"
    used_names.add(name.lower())
    names.append(name)
  return names


def save_panels(
    output_dir: str | os.PathLike,
    images: np.ndarray | Sequence[np.ndarray],
    masks: np.ndarray | Sequence[np.ndarray],
    heatmaps: np.ndarray | Sequence[np.ndarray],
    file_names: Sequence[str],
    scores: np.ndarray | Sequence[float] | None,
    vmin: float,
    vmax: float,
    threshold: float | None = None,
) -> list[pathlib.Path]:
  """Write one panel per test image into `output_dir`.

  Each panel is titled with its file name and, when `scores` is given, its
  image score, followed by "anomalous" (score >= `threshold`) or "normal"
  when `threshold` is given too. Panel names come from `panel_file_name`;
  file names that map to the same panel name get "_2", "_3", ... (see
  `distinct_png_names`).

  Args:
    output_dir: folder for the PNGs, created if missing.
    images: N uint8 [H, W, 3] images.
    masks: N [H, W] 0/1 ground-truth masks.
    heatmaps: N float [H, W] heat maps.
    file_names: N data-set file names such as "test/crack/000.png".
    scores: N image anomaly scores, or None to leave them out of the titles.
    vmin: score mapped to the lowest color, shared by all panels.
    vmax: score mapped to the highest color, shared by all panels.
    threshold: image score from which an image counts as anomalous, or None
      to leave the verdict out of the titles.

  Returns:
    The N paths written, in input order.
  """
  count = len(file_names)
  lengths = {
      "images": len(images),
      "masks": len(masks),
      "heatmaps": len(heatmaps),
      "file_names": count,
  }
  if scores is not None:
    lengths["scores"] = len(scores)
  if len(set(lengths.values())) != 1:
    raise ValueError(f"all inputs must have the same length, got {lengths}.")

  names = distinct_png_names(
      [panel_file_name(file_name)[:-len(".png")] for file_name in file_names])

  output_dir = pathlib.Path(output_dir)
  paths = []
  for index in range(count):
    title = file_names[index]
    if scores is not None:
      score = float(scores[index])
      title = f"{title}  score {score:.4g}"
      if threshold is not None:
        verdict = "anomalous" if score >= threshold else "normal"
        title = f"{title}  {verdict}"

    paths.append(
        save_panel(
            output_dir / names[index],
            images[index],
            masks[index],
            heatmaps[index],
            vmin,
            vmax,
            title=title,
        )
    )
  return paths
