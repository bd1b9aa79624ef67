"""Tests for sprs_jax.metrics against hand-computed values and references."""

import numpy as np
import pytest
from skimage import measure
from sklearn.metrics import f1_score, roc_auc_score

from sprs_jax import metrics


def _reference_aupro(masks, heatmaps, fpr_limit):
  """Compute AUPRO slowly, one threshold at a time, from the definition.

  Regions are labeled with skimage (connectivity=2, i.e. 8-connectivity) so
  the reference does not share the labeling code under test.
  """
  region_scores = []
  for mask, heatmap in zip(masks, heatmaps):
    labeled = measure.label(mask.astype(np.uint8), connectivity=2)
    for region_id in range(1, labeled.max() + 1):
      region_scores.append(heatmap[labeled == region_id])
  normal_scores = heatmaps[masks == 0]

  # Curve points from a threshold above every score down to the lowest score,
  # one point per distinct score of any pixel.
  thresholds = np.unique(heatmaps)[::-1]
  points = [(0.0, 0.0)]
  for threshold in thresholds:
    fpr = np.mean(normal_scores >= threshold)
    pro = np.mean([np.mean(pixels >= threshold) for pixels in region_scores])
    points.append((fpr, pro))

  area = 0.0
  for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
    if x1 <= fpr_limit:
      area += (x1 - x0) * (y0 + y1) / 2
      continue
    if x0 < fpr_limit:
      y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
      area += (fpr_limit - x0) * (y0 + y_limit) / 2
    break
  return area / fpr_limit


def _random_split(seed, count=4, height=12, width=10, decimals=2):
  """Return random masks and heat maps with many tied scores."""
  rng = np.random.default_rng(seed)
  masks = (rng.random((count, height, width)) < 0.15).astype(np.uint8)
  masks[0] = 0
  heatmaps = np.round(rng.random(masks.shape) + 0.3 * masks, decimals)
  return masks, heatmaps.astype(np.float32)


# image_auroc


def test_image_auroc_tie_by_hand():
  # Pairs (anomalous, normal): (0.5, 0.1) counts 1, (0.5, 0.5) is a tie and
  # counts 0.5, (0.9, 0.1) and (0.9, 0.5) count 1 each: 3.5 / 4 = 0.875.
  labels = np.array([0, 0, 1, 1])
  scores = np.array([0.1, 0.5, 0.5, 0.9])

  assert metrics.image_auroc(labels, scores) == pytest.approx(0.875, abs=1e-15)


def test_image_auroc_perfect_and_inverted():
  labels = np.array([0, 1, 0, 1])

  assert metrics.image_auroc(labels, np.array([1.0, 2.0, 1.5, 3.0])) == 1.0
  assert metrics.image_auroc(labels, np.array([3.0, 1.0, 2.0, 0.5])) == 0.0


def test_image_auroc_matches_sklearn():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, size=200).astype(bool)
  scores = np.round(rng.random(200), 1)

  expected = roc_auc_score(labels, scores)

  assert metrics.image_auroc(labels, scores) == pytest.approx(
      expected, abs=1e-12
  )


# pixel_auroc


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_pixel_auroc_matches_sklearn(seed, dtype):
  masks, heatmaps = _random_split(seed, decimals=1)
  if dtype == np.int32:
    heatmaps = heatmaps * 10
  heatmaps = heatmaps.astype(dtype)

  expected = roc_auc_score(masks.ravel(), heatmaps.ravel())

  assert metrics.pixel_auroc(masks, heatmaps) == pytest.approx(
      expected, abs=1e-12
  )


def test_pixel_auroc_accepts_bool_masks():
  masks, heatmaps = _random_split(3)

  from_uint8 = metrics.pixel_auroc(masks, heatmaps)
  from_bool = metrics.pixel_auroc(masks.astype(bool), heatmaps)

  assert from_bool == from_uint8


def test_pixel_auroc_all_scores_tied():
  masks, heatmaps = _random_split(4)

  assert metrics.pixel_auroc(masks, np.zeros_like(heatmaps)) == 0.5


# aupro


def test_aupro_perfect_heatmap():
  masks, _ = _random_split(5)
  heatmaps = masks.astype(np.float32)

  assert metrics.aupro(masks, heatmaps) == pytest.approx(1.0, abs=1e-12)


def test_aupro_two_regions_by_hand():
  # One 1x8 image. Region A = pixels 0-2 (size 3), region B = pixel 5
  # (size 1), normal pixels 3, 4, 6, 7.
  masks = np.array([[[1, 1, 1, 0, 0, 1, 0, 0]]])
  heatmaps = np.array([[[0.9, 0.6, 0.2, 0.8, 0.6, 0.7, 0.4, 0.1]]])
  # Points (FPR, PRO) per distinct threshold, PRO = mean(A fraction,
  # B fraction):
  #   above all (0, 0); t=0.9 (0, 1/6); t=0.8 (1/4, 1/6); t=0.7 (1/4, 2/3);
  #   t=0.6 (2/4, 5/6), where a normal and an anomalous pixel tie;
  #   t=0.4 (3/4, 5/6); t=0.2 (3/4, 1); t=0.1 (1, 1).
  # Limit 0.3 lies on the tie segment (1/4, 2/3)-(1/2, 5/6), where
  # PRO(0.3) = 2/3 + (0.05 / 0.25) * (1/6) = 0.7.
  # Area = 0.25 * 1/6 + 0.05 * (2/3 + 0.7) / 2 = 50/1200 + 41/1200,
  # so AUPRO = (91/1200) / 0.3 = 91/360.
  assert metrics.aupro(masks, heatmaps, fpr_limit=0.3) == pytest.approx(
      91 / 360, abs=1e-12
  )
  # Over the full curve: 1/24 + 0.25 * (2/3 + 5/6) / 2 + 0.25 * 5/6
  # + 0.25 * 1 = (2 + 9 + 10 + 12) / 48 = 11/16.
  assert metrics.aupro(masks, heatmaps, fpr_limit=1.0) == pytest.approx(
      11 / 16, abs=1e-12
  )


def test_aupro_uses_8_connectivity():
  # Pixels (0, 1) and (1, 2) touch only at a corner. With 8-connectivity the
  # mask is one region of 3 pixels, 2 of them at score 0.9, so PRO is 2/3
  # from FPR 0 to 1 and AUPRO(limit 1) = 2/3. With 4-connectivity the regions
  # {(0, 0), (0, 1)} and {(1, 2)} would give PRO = mean(1, 0) = 1/2.
  masks = np.array([[[1, 1, 0], [0, 0, 1]]])
  heatmaps = np.array([[[0.9, 0.9, 0.5], [0.5, 0.5, 0.1]]])

  assert metrics.aupro(masks, heatmaps, fpr_limit=1.0) == pytest.approx(
      2 / 3, abs=1e-12
  )


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_slow_reference(seed, fpr_limit):
  masks, heatmaps = _random_split(seed)

  expected = _reference_aupro(masks, heatmaps, fpr_limit)

  assert metrics.aupro(masks, heatmaps, fpr_limit) == pytest.approx(
      expected, abs=1e-10
  )


@pytest.mark.parametrize("chunk_size", [1, 2, 7])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_in_threshold_chunks_matches_one_chunk(
    monkeypatch, chunk_size, fpr_limit
):
  # Two decimals give runs of tied normal scores that cross chunk borders.
  masks, heatmaps = _random_split(seed=5, decimals=2)
  one_chunk = metrics.aupro(masks, heatmaps, fpr_limit)
  expected = _reference_aupro(masks, heatmaps, fpr_limit)

  monkeypatch.setattr(metrics, "_THRESHOLD_CHUNK_SIZE", chunk_size)
  chunked = metrics.aupro(masks, heatmaps, fpr_limit)

  assert chunked == pytest.approx(one_chunk, abs=1e-12)
  assert chunked == pytest.approx(expected, abs=1e-10)


def test_aupro_averages_over_regions():
  # Image 0 has a 4-pixel region fully detected, image 1 a 1-pixel region
  # missed (below every normal score). PRO is the mean over regions, not
  # over pixels, so it is 1/2 from FPR 0 to 1 and AUPRO(0.3) = 0.5.
  masks = np.zeros((2, 3, 3), dtype=np.uint8)
  masks[0, :2, :2] = 1
  masks[1, 2, 2] = 1
  heatmaps = np.full((2, 3, 3), 0.5)
  heatmaps[0, :2, :2] = 1.0
  heatmaps[1, 2, 2] = 0.0

  assert metrics.aupro(masks, heatmaps) == pytest.approx(0.5, abs=1e-12)


# f1_max


def test_f1_max_by_hand():
  # Thresholds: 0.9 -> TP 1, FP 0, F1 = 2/(1+3) = 0.5; 0.6 -> TP 2, FP 1,
  # F1 = 4/(3+3) = 2/3; 0.4 -> TP 3, FP 1, F1 = 6/(4+3) = 6/7;
  # 0.2 -> TP 3, FP 2, F1 = 6/(5+3) = 3/4.
  labels = np.array([0, 0, 1, 1, 1])
  scores = np.array([0.2, 0.6, 0.4, 0.6, 0.9])

  f1, threshold = metrics.f1_max(labels, scores)

  assert f1 == pytest.approx(6 / 7, abs=1e-15)
  assert threshold == 0.4


def test_f1_max_tie_returns_highest_threshold():
  # Threshold 0.9 -> F1 = 2/(1+2) = 2/3; threshold 0.6 -> F1 = 4/(4+2) = 2/3.
  labels = np.array([1, 0, 0, 1])
  scores = np.array([0.9, 0.8, 0.7, 0.6])

  f1, threshold = metrics.f1_max(labels, scores)

  assert f1 == pytest.approx(2 / 3, abs=1e-15)
  assert threshold == 0.9


def test_f1_max_matches_brute_force():
  rng = np.random.default_rng(7)
  labels = rng.integers(0, 2, size=60)
  scores = np.round(rng.random(60), 1)

  f1, threshold = metrics.f1_max(labels, scores)

  candidates = {
      value: f1_score(labels, scores >= value) for value in np.unique(scores)
  }
  assert f1 == pytest.approx(max(candidates.values()), abs=1e-12)
  assert candidates[threshold] == pytest.approx(f1, abs=1e-12)


# compute_metrics


def test_compute_metrics_matches_single_metrics():
  masks, heatmaps = _random_split(8)
  labels = masks.any(axis=(1, 2)).astype(int)
  image_scores = heatmaps.max(axis=(1, 2))

  result = metrics.compute_metrics(labels, image_scores, masks, heatmaps)

  f1, threshold = metrics.f1_max(labels, image_scores)
  expected = {
      "image_auroc": metrics.image_auroc(labels, image_scores),
      "pixel_auroc": metrics.pixel_auroc(masks, heatmaps),
      "aupro": metrics.aupro(masks, heatmaps),
      "f1_max": f1,
      "f1_threshold": threshold,
  }
  assert result == expected
  for key, value in result.items():
    assert type(value) is float, key


def test_compute_metrics_passes_fpr_limit():
  masks, heatmaps = _random_split(14)
  labels = masks.any(axis=(1, 2)).astype(int)

  result = metrics.compute_metrics(
      labels, np.arange(4.0), masks, heatmaps, fpr_limit=0.05
  )

  assert result["aupro"] == metrics.aupro(masks, heatmaps, fpr_limit=0.05)


# Degenerate and invalid input


@pytest.mark.parametrize(
    "labels, scores, message",
    [
        ([0, 0, 0], [0.1, 0.2, 0.3], "3 normal and 0 anomalous"),
        ([1, 1], [0.1, 0.2], "0 normal and 2 anomalous"),
        ([0, 1, 1], [0.1, 0.2], r"labels \(3,\) and scores \(2,\)"),
        ([[0, 1]], [[0.1, 0.2]], r"shape \[N\]"),
        ([0, 1, 1], [0.1, np.nan, 0.3], "1 NaN values out of 3"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "1 values differ"),
        ([0, 1], ["a", "b"], "real numeric array"),
    ],
)
@pytest.mark.parametrize("metric", [metrics.image_auroc, metrics.f1_max])
def test_image_metrics_reject_invalid_input(metric, labels, scores, message):
  with pytest.raises(ValueError, match=message):
    metric(np.array(labels), np.array(scores))


def _invalid_pixel_cases():
  masks, heatmaps = _random_split(9)
  with_nan = heatmaps.copy()
  with_nan[1, 2, 3] = np.nan
  return [
      (
          np.zeros_like(masks),
          heatmaps,
          r"no anomalous pixel \(4 images of 12x10\)",
      ),
      (np.ones_like(masks), heatmaps, "no normal pixel"),
      (
          masks,
          heatmaps[:, :, :-1],
          r"masks \(4, 12, 10\) and heatmaps \(4, 12, 9\)",
      ),
      (masks[0], heatmaps[0], r"shape \[N, H, W\]"),
      (masks, with_nan, "1 NaN values out of 480"),
      (masks * 255, heatmaps, "divided by 255"),
  ]


@pytest.mark.parametrize("masks, heatmaps, message", _invalid_pixel_cases())
@pytest.mark.parametrize("metric", [metrics.pixel_auroc, metrics.aupro])
def test_pixel_metrics_reject_invalid_input(metric, masks, heatmaps, message):
  with pytest.raises(ValueError, match=message):
    metric(masks, heatmaps)


@pytest.mark.parametrize("fpr_limit", [0.0, -0.1, 1.5, np.nan])
def test_aupro_rejects_invalid_fpr_limit(fpr_limit):
  masks, heatmaps = _random_split(10)
  labels = masks.any(axis=(1, 2))

  with pytest.raises(ValueError, match="fpr_limit must be in"):
    metrics.aupro(masks, heatmaps, fpr_limit)
  with pytest.raises(ValueError, match="fpr_limit must be in"):
    metrics.compute_metrics(
        labels, np.arange(4.0), masks, heatmaps, fpr_limit=fpr_limit
    )


def test_compute_metrics_rejects_count_mismatch():
  masks, heatmaps = _random_split(11)
  labels = np.array([0, 1, 1])

  message = r"labels \(3,\) and masks \(4, 12, 10\)"
  with pytest.raises(ValueError, match=message):
    metrics.compute_metrics(labels, np.zeros(3), masks, heatmaps)


def test_compute_metrics_rejects_normal_image_with_mask():
  masks, heatmaps = _random_split(12)
  labels = np.array([0, 0, 1, 1])

  with pytest.raises(ValueError, match=r"1 images labeled normal .* \[1\]"):
    metrics.compute_metrics(labels, np.arange(4.0), masks, heatmaps)


def test_compute_metrics_rejects_single_class_split():
  masks, heatmaps = _random_split(13)
  labels = np.ones(4, dtype=int)

  with pytest.raises(ValueError, match="0 normal and 4 anomalous"):
    metrics.compute_metrics(labels, np.arange(4.0), masks, heatmaps)
