"""Tests for sprs_jax.visualize: colormap, overlay and panel PNGs."""

import numpy as np
from PIL import Image, ImageFont
import pytest

from sprs_jax import visualize

# Non-square, so a transposed tile changes the panel size.
HEIGHT, WIDTH = 10, 14


def _sample(seed=0):
  """Return a random image, a mask with one rectangle and a heat map."""
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
  mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
  mask[2:5, 3:9] = 1
  heatmap = rng.random((HEIGHT, WIDTH)).astype(np.float32)
  return image, mask, heatmap


def _read_png(path):
  with Image.open(path) as png:
    return np.asarray(png.convert("RGB"))


# jet_colormap


def test_jet_colormap_endpoints():
  colors = visualize.jet_colormap(np.array([0.0, 0.5, 1.0]))

  assert colors.dtype == np.uint8
  np.testing.assert_array_equal(colors[0], [0, 0, 128])
  np.testing.assert_array_equal(colors[1], [128, 255, 128])
  np.testing.assert_array_equal(colors[2], [128, 0, 0])


def test_jet_colormap_clips_out_of_range():
  colors = visualize.jet_colormap(np.array([-3.0, 7.0, -np.inf, np.inf]))

  np.testing.assert_array_equal(colors[0], [0, 0, 128])
  np.testing.assert_array_equal(colors[1], [128, 0, 0])
  np.testing.assert_array_equal(colors[2], [0, 0, 128])
  np.testing.assert_array_equal(colors[3], [128, 0, 0])


def test_jet_colormap_keeps_shape():
  colors = visualize.jet_colormap(np.zeros((2, 3, 4)))

  assert colors.shape == (2, 3, 4, 3)


def test_jet_colormap_rejects_nan():
  with pytest.raises(ValueError, match="1 NaN"):
    visualize.jet_colormap(np.array([0.2, np.nan]))


# heatmap_overlay


def test_heatmap_overlay_alpha_endpoints():
  image, _, heatmap = _sample()

  image_only = visualize.heatmap_overlay(image, heatmap, 0.0, 1.0, alpha=0.0)
  colors_only = visualize.heatmap_overlay(image, heatmap, 0.0, 1.0, alpha=1.0)

  np.testing.assert_array_equal(image_only, image)
  np.testing.assert_array_equal(colors_only, visualize.jet_colormap(heatmap))


def test_heatmap_overlay_scales_by_vmin_vmax():
  image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
  heatmap = np.full((HEIGHT, WIDTH), 5.0)
  heatmap[0, 0] = 2.0

  overlay = visualize.heatmap_overlay(image, heatmap, 2.0, 5.0, alpha=1.0)

  np.testing.assert_array_equal(overlay[0, 0], [0, 0, 128])
  np.testing.assert_array_equal(overlay[1, 1], [128, 0, 0])


def test_heatmap_overlay_blends_half():
  image = np.full((HEIGHT, WIDTH, 3), 100, dtype=np.uint8)
  heatmap = np.ones((HEIGHT, WIDTH))

  overlay = visualize.heatmap_overlay(image, heatmap, 0.0, 1.0)

  # 0.5 * 100 + 0.5 * (128, 0, 0) = (114, 50, 50).
  np.testing.assert_array_equal(overlay[3, 4], [114, 50, 50])


def test_heatmap_overlay_accepts_grayscale():
  image, _, heatmap = _sample()
  gray = image[..., 0]

  overlay = visualize.heatmap_overlay(gray, heatmap, 0.0, 1.0, alpha=0.0)

  assert overlay.shape == (HEIGHT, WIDTH, 3)
  np.testing.assert_array_equal(overlay[..., 2], gray)


@pytest.mark.parametrize(
    "heatmap_shape, vmin, vmax, alpha, message",
    [
        ((WIDTH, HEIGHT), 0.0, 1.0, 0.5, "does not match image shape"),
        ((HEIGHT, WIDTH), 1.0, 1.0, 0.5, "vmax must be greater than vmin"),
        ((HEIGHT, WIDTH), 0.0, np.nan, 0.5, "vmax must be greater than vmin"),
        ((HEIGHT, WIDTH), 0.0, 1.0, 1.5, "alpha must be in"),
    ],
)
def test_heatmap_overlay_rejects_invalid_input(
    heatmap_shape, vmin, vmax, alpha, message
):
  image, _, _ = _sample()

  with pytest.raises(ValueError, match=message):
    visualize.heatmap_overlay(
        image, np.zeros(heatmap_shape), vmin, vmax, alpha=alpha
    )


def test_heatmap_overlay_rejects_nan_heatmap():
  image, _, heatmap = _sample()
  heatmap[1, 1] = np.nan

  with pytest.raises(ValueError, match="heatmap contains 1 NaN"):
    visualize.heatmap_overlay(image, heatmap, 0.0, 1.0)


def test_heatmap_overlay_rejects_float_image():
  _, _, heatmap = _sample()

  with pytest.raises(ValueError, match="dtype uint8"):
    visualize.heatmap_overlay(np.zeros((HEIGHT, WIDTH, 3)), heatmap, 0.0, 1.0)


# save_panel


def test_save_panel_layout_and_tiles(tmp_path):
  image, mask, heatmap = _sample()
  path = tmp_path / "nested" / "folder" / "panel.png"

  returned = visualize.save_panel(path, image, mask, heatmap, 0.0, 1.0)

  assert returned == path
  assert path.is_file()
  panel = _read_png(path)
  separator = visualize.SEPARATOR_WIDTH
  assert panel.shape == (HEIGHT, 3 * WIDTH + 2 * separator, 3)

  second = WIDTH + separator
  third = 2 * (WIDTH + separator)
  np.testing.assert_array_equal(panel[:, :WIDTH], image)
  np.testing.assert_array_equal(
      panel[:, second:second + WIDTH], 255 * np.repeat(mask[..., None], 3, 2)
  )
  np.testing.assert_array_equal(
      panel[:, third:],
      visualize.heatmap_overlay(image, heatmap, 0.0, 1.0),
  )
  assert (panel[:, WIDTH:second] == visualize.SEPARATOR_GRAY).all()
  assert (panel[:, second + WIDTH:third] == visualize.SEPARATOR_GRAY).all()


def test_save_panel_with_title(tmp_path):
  image, mask, heatmap = _sample()
  path = tmp_path / "titled.png"

  visualize.save_panel(
      path, image, mask, heatmap, 0.0, 1.0, title="crack/000.png  ∆ 0.93"
  )

  panel = _read_png(path)
  separator = visualize.SEPARATOR_WIDTH
  assert panel.shape == (
      visualize.TITLE_HEIGHT + HEIGHT,
      3 * WIDTH + 2 * separator,
      3,
  )
  assert panel[: visualize.TITLE_HEIGHT].max() > 0
  np.testing.assert_array_equal(panel[visualize.TITLE_HEIGHT:, :WIDTH], image)


def test_save_panel_title_with_bitmap_font(tmp_path, monkeypatch):
  # Pillow without FreeType falls back to a Latin-1 bitmap font, which raises
  # UnicodeEncodeError on other characters unless they are replaced.
  image, mask, heatmap = _sample()
  monkeypatch.setattr(
      visualize.ImageFont, "load_default", ImageFont.load_default_imagefont
  )

  visualize.save_panel(
      tmp_path / "panel.png", image, mask, heatmap, 0.0, 1.0, title="∆ 0.93"
  )

  panel = _read_png(tmp_path / "panel.png")
  assert panel[: visualize.TITLE_HEIGHT].max() > 0


def test_save_panel_rejects_nonbinary_mask(tmp_path):
  image, mask, heatmap = _sample()

  with pytest.raises(ValueError, match="divided by 255"):
    visualize.save_panel(
        tmp_path / "panel.png", image, 255 * mask, heatmap, 0.0, 1.0
    )
  assert not list(tmp_path.iterdir())


def test_save_panel_failed_write_keeps_old_file(tmp_path, monkeypatch):
  image, mask, heatmap = _sample()
  path = tmp_path / "panel.png"
  path.write_bytes(b"old panel")

  def save_half_then_fail(self, fp, *args, **kwargs):
    with open(fp, "wb") as file:
      file.write(b"\x89PNG half")
    raise OSError("disk full")

  monkeypatch.setattr(Image.Image, "save", save_half_then_fail)
  with pytest.raises(OSError, match="disk full"):
    visualize.save_panel(path, image, mask, heatmap, 0.0, 1.0)

  assert path.read_bytes() == b"old panel"
  assert [entry.name for entry in tmp_path.iterdir()] == ["panel.png"]


def test_save_panel_replaces_existing_file(tmp_path):
  image, mask, heatmap = _sample()
  path = tmp_path / "panel.png"
  path.write_bytes(b"old panel")

  visualize.save_panel(path, image, mask, heatmap, 0.0, 1.0)

  assert _read_png(path).shape[0] == HEIGHT
  assert [entry.name for entry in tmp_path.iterdir()] == ["panel.png"]


# save_panels


@pytest.mark.parametrize(
    "file_name, expected",
    [
        ("test/crack/000.png", "test_crack_000.png"),
        ("./test/good/001.jpg", "test_good_001.png"),
        ("test\\hole\\002.PNG", "test_hole_002.png"),
        ("/data/../bottle/003", "data_bottle_003.png"),
        (".hidden", ".hidden.png"),
    ],
)
def test_panel_file_name(file_name, expected):
  assert visualize.panel_file_name(file_name) == expected


def test_panel_file_name_rejects_empty():
  with pytest.raises(ValueError, match="no usable part"):
    visualize.panel_file_name("./")


def test_save_panels_writes_named_files(tmp_path):
  samples = [_sample(seed) for seed in range(2)]
  images = np.stack([sample[0] for sample in samples])
  masks = np.stack([sample[1] for sample in samples])
  heatmaps = np.stack([sample[2] for sample in samples])
  file_names = ["test/crack/000.png", "test/good/000.png"]

  paths = visualize.save_panels(
      tmp_path / "panels", images, masks, heatmaps, file_names,
      np.array([0.9, 0.1]), 0.0, 1.0,
  )

  assert [path.name for path in paths] == [
      "test_crack_000.png",
      "test_good_000.png",
  ]
  assert sorted(tmp_path.joinpath("panels").iterdir()) == sorted(paths)
  for index, path in enumerate(paths):
    panel = _read_png(path)
    assert panel.shape[0] == visualize.TITLE_HEIGHT + HEIGHT
    np.testing.assert_array_equal(
        panel[visualize.TITLE_HEIGHT:, :WIDTH], images[index]
    )


def test_save_panels_without_scores(tmp_path):
  image, mask, heatmap = _sample()

  paths = visualize.save_panels(
      tmp_path, [image], [mask], [heatmap], ["a.png"], None, 0.0, 1.0
  )

  assert paths == [tmp_path / "a.png"]
  assert paths[0].is_file()


def test_save_panels_numbers_name_collision(tmp_path):
  image, mask, heatmap = _sample()

  paths = visualize.save_panels(
      tmp_path, [image] * 3, [mask] * 3, [heatmap] * 3,
      ["a_b/c.png", "a/b_c.png", "test/ok/000.bmp"], None, 0.0, 1.0,
  )

  assert [path.name for path in paths] == [
      "a_b_c.png", "a_b_c_2.png", "test_ok_000.png"]
  assert all(path.is_file() for path in paths)


def test_save_panels_rejects_length_mismatch(tmp_path):
  image, mask, heatmap = _sample()

  with pytest.raises(ValueError, match="'scores': 1"):
    visualize.save_panels(
        tmp_path, [image] * 2, [mask] * 2, [heatmap] * 2,
        ["a.png", "b.png"], [0.5], 0.0, 1.0,
    )


def test_save_panels_titles_with_verdict(tmp_path, monkeypatch):
  image, mask, heatmap = _sample()
  titles = []

  def record_title(path, *args, title=None):
    titles.append(title)
    return path

  monkeypatch.setattr(visualize, "save_panel", record_title)
  visualize.save_panels(
      tmp_path, [image] * 3, [mask] * 3, [heatmap] * 3,
      ["a.png", "b.png", "c.png"], [0.25, 0.5, 0.75], 0.0, 1.0,
      threshold=0.5,
  )

  assert titles == [
      "a.png  score 0.25  normal",
      "b.png  score 0.5  anomalous",
      "c.png  score 0.75  anomalous",
  ]


# resize_heatmap and save_overlay


def test_resize_heatmap_to_non_square():
  heatmap = np.arange(64, dtype=np.float32).reshape(8, 8)

  resized = visualize.resize_heatmap(heatmap, width=40, height=24)

  assert resized.shape == (24, 40)
  assert resized.dtype == np.float32
  assert resized.min() >= heatmap.min()
  assert resized.max() <= heatmap.max()
  # Values grow along both axes, as in the input.
  assert (np.diff(resized, axis=1) >= 0).all()
  assert (np.diff(resized, axis=0) >= 0).all()


def test_resize_heatmap_same_size_unchanged():
  heatmap = np.random.default_rng(0).random((6, 9)).astype(np.float32)

  np.testing.assert_array_equal(
      visualize.resize_heatmap(heatmap, width=9, height=6), heatmap
  )


def test_resize_heatmap_rejects_bad_shape():
  with pytest.raises(ValueError, match=r"\[H, W\]"):
    visualize.resize_heatmap(np.zeros((2, 3, 4)), width=3, height=2)


def test_save_overlay_keeps_image_size(tmp_path):
  image, _, _ = _sample()
  heatmap = np.full((32, 32), 0.5, np.float32)

  path = visualize.save_overlay(
      tmp_path / "out" / "overlay.png", image, heatmap, 0.0, 1.0
  )

  overlay = _read_png(path)
  assert overlay.shape == (HEIGHT, WIDTH, 3)
  expected = visualize.heatmap_overlay(
      image, np.full((HEIGHT, WIDTH), 0.5, np.float32), 0.0, 1.0
  )
  np.testing.assert_array_equal(overlay, expected)


def test_save_overlay_grayscale_image(tmp_path):
  gray = np.zeros((HEIGHT, WIDTH), np.uint8)

  path = visualize.save_overlay(
      tmp_path / "gray.png", gray, np.ones((4, 4), np.float32), 0.0, 1.0
  )

  assert _read_png(path).shape == (HEIGHT, WIDTH, 3)
