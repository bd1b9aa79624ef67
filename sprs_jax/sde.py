"""The variance-exploding (VE) noise schedule of the score model."""

import math

import jax.numpy as jnp


def marginal_std(t, sigma_max: float = 25.0):
  """Returns sigma(t), the noise std of the VE SDE at diffusion time t.

  sigma(t) = sqrt((sigma_max^(2t) - 1) / (2 ln sigma_max)). It is 0 at t = 0,
  about 0.0317 at t = 1e-3 and about 9.85 at t = 1 for sigma_max = 25. Pixel
  values live in [-1, 1], so sigma is in those units.

  Args:
    t: diffusion times, any shape, in [0, 1].
    sigma_max: the SDE's sigma parameter (> 1).

  Returns:
    An array shaped like t.
  """
  log_sigma = math.log(sigma_max)
  t = jnp.asarray(t, dtype=jnp.float32)
  return jnp.sqrt(jnp.expm1(2.0 * t * log_sigma) / (2.0 * log_sigma))
