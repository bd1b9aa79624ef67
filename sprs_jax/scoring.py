"""Perturbation-resilience scoring: heat maps and image scores.

For a noise level t, a draw n = sigma(t) z perturbs the image and the score
model estimates the restoring step sigma(t)^2 s(x + n, t). A pixel the model
restores well has a small residual (sigma(t)^2 s(x + n, t) + n)^2; normal
pixels are restored, anomalous ones are not.
"""

import functools

import jax
import jax.numpy as jnp

from sprs_jax import sde


def resilience_maps(score_fn, images, example_keys, noise_levels,
                    num_draws: int, sigma_max: float):
  """Returns the resilience map [B, H, W] of a batch, float32.

  For each noise level t and draw, e = (sigma(t)^2 s(x + n, t) + n)^2 with
  n = sigma(t) z, averaged over channels and draws. Each level's map is
  divided by sigma(t)^2 before the levels are averaged, so that all levels
  weigh alike. With one level this is the reference map up to a constant,
  which changes no ranking. Levels and draws run as one vmapped batch.

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

  def draw_noise(key):
    keys = jax.random.split(key, len(noise_levels) * num_draws)
    draw = lambda k: jax.random.normal(k, images.shape[1:], jnp.float32)
    noise = jax.vmap(draw)(keys)
    return noise.reshape((len(noise_levels), num_draws) + images.shape[1:])

  # [L, D, B, H, W, C] standard normal noise, each image from its own key.
  unit_noise = jnp.moveaxis(jax.vmap(draw_noise)(example_keys), 0, 2)
  batch = images.shape[0]

  def residual(t, std, z):
    noise = std * z
    score = score_fn(images + noise, jnp.full((batch,), t))
    error = jnp.square(score * std**2 + noise)
    return jnp.mean(error, axis=-1) / std**2

  per_draw = jax.vmap(
      jax.vmap(residual, in_axes=(None, None, 0)), in_axes=(0, 0, 0))(
          levels, stds, unit_noise)
  return jnp.mean(per_draw, axis=(0, 1))


def mean_filter(maps, size: int):
  """Returns the size x size mean of [B, H, W] maps, zero-padded at borders.

  Every output pixel divides by size^2, border pixels included, as PyTorch's
  avg_pool2d with count_include_pad=True does.
  """
  if size <= 1:
    return maps
  pad = size // 2
  summed = jax.lax.reduce_window(
      maps, 0.0, jax.lax.add, (1, size, size), (1, 1, 1),
      ((0, 0), (pad, size - 1 - pad), (pad, size - 1 - pad)))
  return summed / (size * size)


def postprocess(maps, heatmap_size: int, filter_size: int):
  """Resizes [B, h, w] maps to heat maps [B, S, S] and smooths them.

  Bilinear resize with half-pixel centers (align_corners=False), then the
  mean filter. Returns (heat maps, image scores [B] = heat-map max).
  """
  batch = maps.shape[0]
  heatmaps = jax.image.resize(
      maps, (batch, heatmap_size, heatmap_size), "bilinear", antialias=False)
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
