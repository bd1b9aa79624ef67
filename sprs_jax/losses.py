"""Denoising score matching for the VE SDE."""

import jax
import jax.numpy as jnp

from sprs_jax import sde


def draw_times_and_noise(rng, example_ids, image_shape, t_min, t_max):
  """Draws (t [B], z [B, H, W, C]) with one random stream per example.

  Each example's draw depends only on ``rng`` and its global index in the
  batch, so a batch split over any number of devices gets the same noise.
  """
  def draw_one(example_id):
    key_t, key_z = jax.random.split(jax.random.fold_in(rng, example_id))
    t = jax.random.uniform(key_t, (), minval=t_min, maxval=t_max)
    z = jax.random.normal(key_z, image_shape)
    return t, z

  return jax.vmap(draw_one)(example_ids)


def dsm_loss(score_fn, images, t, z, sigma_max):
  """Returns the denoising score matching loss of one batch.

  loss = mean over the batch of sum over pixels and channels of
  (s(x + sigma(t) z, t) * sigma(t) + z)^2, where the optimum s is the score
  of the noised data, -z / sigma(t) in expectation.

  Args:
    score_fn: maps (noised images [B, H, W, C], t [B]) to scores.
    images: clean images [B, H, W, C] in [-1, 1].
    t: diffusion times [B].
    z: standard normal noise shaped like images.
    sigma_max: the VE SDE's sigma.
  """
  std = sde.marginal_std(t, sigma_max)[:, None, None, None]
  score = score_fn(images + std * z, t)
  per_example = jnp.sum(jnp.square(score * std + z), axis=(1, 2, 3))
  return jnp.mean(per_example)
