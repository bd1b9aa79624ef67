"""Tests for perturbation-resilience scoring and heat-map post-processing."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from sprs_jax import scoring
from sprs_jax import sde


def _toy_score_fn(x, t):
  """A fixed nonlinear 'score' that depends on x and t, for exact checks."""
  return -jnp.tanh(x * 3.0) / sde.marginal_std(t)[:, None, None, None]


def _loop_reference(images, keys, noise_levels, num_draws):
  """Maps computed with Python loops over images, levels and draws."""
  maps = []
  for index in range(images.shape[0]):
    noise_keys = jax.random.split(keys[index], len(noise_levels) * num_draws)
    total = 0.0
    for level_index, t in enumerate(noise_levels):
      std = sde.marginal_std(t)
      for draw in range(num_draws):
        z = jax.random.normal(noise_keys[level_index * num_draws + draw],
                              images.shape[1:])
        x = images[index:index + 1] + std * z
        score = _toy_score_fn(x, jnp.full((1,), t))[0]
        total = total + jnp.mean((score * std**2 + std * z) ** 2, -1) / std**2
    maps.append(total / (len(noise_levels) * num_draws))
  return jnp.stack(maps)


def test_maps_equal_loop_over_levels_and_draws():
  images = jax.random.uniform(jax.random.key(0), (3, 8, 8, 3), minval=-1)
  keys = jax.random.split(jax.random.key(1), 3)
  levels = (1e-3, 1e-2, 0.1)
  maps = scoring.resilience_maps(_toy_score_fn, images, keys, levels, 2,
                                 25.0)
  looped = _loop_reference(images, keys, levels, 2)
  assert maps.shape == (3, 8, 8)
  np.testing.assert_allclose(maps, looped, rtol=1e-5, atol=1e-6)


def test_maps_do_not_depend_on_batching():
  images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3), minval=-1)
  keys = jax.random.split(jax.random.key(1), 4)
  whole = scoring.resilience_maps(_toy_score_fn, images, keys, (1e-3,), 3,
                                  25.0)
  halves = [scoring.resilience_maps(_toy_score_fn, images[i:i + 2],
                                    keys[i:i + 2], (1e-3,), 3, 25.0)
            for i in (0, 2)]
  np.testing.assert_allclose(whole, jnp.concatenate(halves), rtol=1e-6)


def test_exact_score_gives_zero_map():
  # For data concentrated on x0 the exact score restores every pixel.
  images = jnp.zeros((1, 4, 4, 3))
  exact = lambda x, t: -x / sde.marginal_std(t)[:, None, None, None] ** 2
  maps = scoring.resilience_maps(exact, images, jax.random.split(
      jax.random.key(0), 1), (1e-3, 0.5), 2, 25.0)
  np.testing.assert_allclose(maps, 0.0, atol=1e-6)


@pytest.mark.parametrize("size", [1, 3, 31])
def test_mean_filter_matches_zero_padded_uniform_filter(size):
  maps = np.random.default_rng(0).random((2, 40, 40)).astype(np.float32)
  expected = np.stack([
      ndimage.uniform_filter(m, size, mode="constant", cval=0.0) for m in maps])
  np.testing.assert_allclose(scoring.mean_filter(jnp.asarray(maps), size),
                             expected, rtol=1e-5, atol=1e-6)


def test_postprocess_resizes_and_takes_max():
  maps = jnp.zeros((2, 8, 8)).at[1, 3, 4].set(1.0)
  heatmaps, scores = scoring.postprocess(maps, 32, 5)
  assert heatmaps.shape == (2, 32, 32)
  np.testing.assert_allclose(scores, heatmaps.max(axis=(1, 2)))
  assert float(scores[0]) == 0.0
  assert float(scores[1]) > 0.0
  peak = np.unravel_index(np.argmax(heatmaps[1]), (32, 32))
  assert abs(peak[0] - 14) <= 2
  assert abs(peak[1] - 18) <= 2


def test_make_score_batch_rejects_bad_noise_levels():
  config = ml_collections.ConfigDict(dict(
      noise_levels=(0.0,), num_draws=3, heatmap_size=8, filter_size=3))
  with pytest.raises(ValueError, match="eval.noise_levels"):
    scoring.make_score_batch(None, config, 25.0)
  config.noise_levels = (1e-3,)
  config.num_draws = 0
  with pytest.raises(ValueError, match="eval.num_draws=0"):
    scoring.make_score_batch(None, config, 25.0)


@pytest.mark.parametrize("size_in", [8, 12, 40, 7])
def test_bilinear_matrix_matches_jax_image_resize(size_in):
  # Upsampling, downsampling and an odd size, against the generic resize.
  maps = jax.random.uniform(jax.random.key(0), (2, size_in, size_in))
  rows = scoring.bilinear_matrix(size_in, 24)
  resized = jnp.einsum("oh,bhw->bow", rows, maps)
  resized = jnp.einsum("pw,bow->bop", rows, resized)
  expected = jax.image.resize(maps, (2, 24, 24), "bilinear", antialias=False)
  np.testing.assert_allclose(resized, expected, atol=1e-5)


def test_pass_loop_equals_batched_passes():
  # The loop over (level, draw) passes equals one batched forward pass of
  # all of them, the form it replaced.
  images = jax.random.uniform(jax.random.key(2), (2, 8, 8, 3), minval=-1)
  keys = jax.random.split(jax.random.key(3), 2)
  levels, draws = (1e-3, 0.05), 2
  maps = scoring.resilience_maps(_toy_score_fn, images, keys, levels, draws,
                                 25.0)
  stds = sde.marginal_std(jnp.asarray(levels))
  noise = jax.vmap(lambda key: jax.vmap(
      lambda k: jax.random.normal(k, images.shape[1:]))(
          jax.random.split(key, len(levels) * draws)))(keys)
  noise = noise.reshape((2, len(levels), draws) + images.shape[1:])
  noise = noise * stds[None, :, None, None, None, None]
  batched = images[:, None, None] + noise
  times = jnp.broadcast_to(jnp.asarray(levels)[None, :, None], (2, 2, 2))
  scores = _toy_score_fn(batched.reshape((-1,) + images.shape[1:]),
                         times.reshape(-1)).reshape(batched.shape)
  errors = jnp.square(scores * stds[None, :, None, None, None, None]**2
                      + noise).mean(-1)
  expected = (errors / stds[None, :, None, None, None]**2).mean(axis=(1, 2))
  np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6)
