"""Perturbation-resilience scoring: heat maps and image scores.

For a noise level t, a draw n = sigma(t) z perturbs the image and the score
model estimates the restoring step sigma(t)^2 s(x + n, t). A pixel the model
restores well has a small residual (sigma(t)^2 s(x + n, t) + n)^2; normal
pixels are restored, anomalous ones are not.
"""

import jax
import jax.numpy as jnp
import numpy as np

from sprs_jax import sde


def resilience_maps(score_fn, images, example_keys, noise_levels,
                    num_draws: int, sigma_max: float):
  """Returns the resilience map [B, H, W] of a batch, float32.

  For each noise level t and draw, e = (sigma(t)^2 s(x + n, t) + n)^2 with
  n = sigma(t) z, averaged over channels and draws. Each level's map is
  divided by sigma(t)^2 before the levels are averaged, so that all levels
  weigh alike. With one level this is the reference map up to a constant,
  which changes no ranking. Levels and draws run one after another.

  Args:
    score_fn: maps (images [B, H, W, C], t [B]) to scores [B, H, W, C].
    images: [B, H, W, C] in [-1, 1].
    example_keys: one PRNG key per image, [B]. An image's noise depends only
      on its key, so maps do not change with the batch size or device count.
    noise_levels: a tuple of diffusion times t in (0, 1].
    num_draws: noise draws per level.
    sigma_max: the VE SDE's sigma.
  """
  levels = jnp.asarray(noise_levels, jnp.float32)
  stds = sde.marginal_std(levels, sigma_max)
  num_passes = len(noise_levels) * num_draws
  batch = images.shape[0]
  # Each image's key splits into one key per (level, draw) pass.
  pass_keys = jax.vmap(lambda key: jax.random.split(key, num_passes))(
      example_keys)

  def add_pass(index, total):
    level = index // num_draws
    t, std = levels[level], stds[level]
    draw = lambda key: jax.random.normal(key, images.shape[1:], jnp.float32)
    noise = std * jax.vmap(draw)(pass_keys[:, index])
    score = score_fn(images + noise, jnp.full((batch,), t))
    error = jnp.square(score * std**2 + noise)
    return total + jnp.mean(error, axis=-1) / std**2

  # One forward pass of the batch at a time keeps memory at one pass's
  # activations. A vmapped batch of all passes ran no faster on CPU.
  total = jax.lax.fori_loop(0, num_passes, add_pass,
                            jnp.zeros(images.shape[:3], jnp.float32))
  return total / num_passes


def mean_filter(maps, size: int):
  """Returns the size x size mean of [B, H, W] maps, zero-padded at borders.

  Every output pixel divides by size^2, border pixels included, as PyTorch's
  avg_pool2d with count_include_pad=True does.
  """
  if size <= 1:
    return maps
  pad = (size // 2, size - 1 - size // 2)
  # Separable: a 1 x size sum, then a size x 1 sum, 2 * size additions per
  # pixel instead of size^2.
  summed = jax.lax.reduce_window(
      maps, 0.0, jax.lax.add, (1, 1, size), (1, 1, 1), ((0, 0), (0, 0), pad))
  summed = jax.lax.reduce_window(
      summed, 0.0, jax.lax.add, (1, size, 1), (1, 1, 1), ((0, 0), pad, (0, 0)))
  return summed / (size * size)


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """Returns the [size_out, size_in] bilinear resize matrix, half-pixel centers.

  Output pixel i samples the input at (i + 0.5) * size_in / size_out - 0.5,
  clamped to the image, with no antialiasing: PyTorch's F.interpolate with
  mode="bilinear", align_corners=False, and jax.image.resize with
  antialias=False.
  """
  positions = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
  positions = np.clip(positions, 0.0, size_in - 1)
  lower = np.minimum(np.floor(positions).astype(np.int64), size_in - 1)
  upper = np.minimum(lower + 1, size_in - 1)
  weight_upper = positions - lower
  matrix = np.zeros((size_out, size_in), np.float64)
  rows = np.arange(size_out)
  np.add.at(matrix, (rows, lower), 1.0 - weight_upper)
  np.add.at(matrix, (rows, upper), weight_upper)
  return matrix.astype(np.float32)


def postprocess(maps, heatmap_size: int, filter_size: int):
  """Resizes [B, h, w] maps to heat maps [B, S, S] and smooths them.

  Bilinear resize with half-pixel centers (align_corners=False), then the
  mean filter. Returns (heat maps, image scores [B] = heat-map max).
  """
  _, height, width = maps.shape
  # Two small matrix products, faster on CPU than a gather-based resize.
  rows = jnp.asarray(bilinear_matrix(height, heatmap_size))
  cols = jnp.asarray(bilinear_matrix(width, heatmap_size))
  heatmaps = jnp.einsum("oh,bhw->bow", rows, maps)
  heatmaps = jnp.einsum("pw,bow->bop", cols, heatmaps)
  heatmaps = mean_filter(heatmaps, filter_size)
  return heatmaps, jnp.max(heatmaps, axis=(1, 2))


def make_score_batch(model, eval_config, sigma_max: float):
  """Returns score_batch(params, images, keys) -> (heat maps, image scores).

  The function is pure, so it is ready for jit or pmap. ``images`` is
  [B, H, W, 3] in [-1, 1], and ``keys`` contains one PRNG key per image. Heat
  maps are [B, heatmap_size, heatmap_size] and image scores [B].
  """
  noise_levels = tuple(float(t) for t in eval_config.noise_levels)
  if not noise_levels or min(noise_levels) <= 0.0 or max(noise_levels) > 1.0:
    raise ValueError(
        f"eval.noise_levels={noise_levels} must be a non-empty tuple of "
        "diffusion times in (0, 1], for example (0.001,).")
  if eval_config.num_draws < 1:
    raise ValueError(f"eval.num_draws={eval_config.num_draws} must be >= 1.")

  def score_batch(params, images, example_keys):
    score_fn = lambda x, t: model.apply({"params": params}, x, t)
    maps = resilience_maps(score_fn, images, example_keys, noise_levels,
                           eval_config.num_draws, sigma_max)
    return postprocess(maps, eval_config.heatmap_size, eval_config.filter_size)

  return score_batch
