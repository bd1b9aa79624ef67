"""Tests for denoising score matching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sprs_jax import losses
from sprs_jax import sde


def test_draws_depend_only_on_example_id():
  rng = jax.random.key(3)
  t_all, z_all = losses.draw_times_and_noise(rng, jnp.arange(4), (2, 2, 3),
                                             1e-5, 1.0)
  t_tail, z_tail = losses.draw_times_and_noise(rng, jnp.arange(2, 4),
                                               (2, 2, 3), 1e-5, 1.0)
  np.testing.assert_array_equal(t_all[2:], t_tail)
  np.testing.assert_array_equal(z_all[2:], z_tail)
  assert not np.allclose(z_all[0], z_all[1])


def test_draw_times_stay_in_range():
  t, _ = losses.draw_times_and_noise(jax.random.key(0), jnp.arange(500),
                                     (1, 1, 1), 0.01, 0.2)
  assert float(t.min()) >= 0.01
  assert float(t.max()) <= 0.2
  assert float(t.max()) - float(t.min()) > 0.15


def test_dsm_loss_is_zero_for_exact_score():
  # With one training image x0, the score of the noised data is
  # -(x - x0) / sigma^2, which makes every residual vanish.
  x0 = jax.random.uniform(jax.random.key(1), (3, 4, 4, 3), minval=-1, maxval=1)
  t = jnp.array([1e-3, 0.3, 0.9])
  z = jax.random.normal(jax.random.key(2), x0.shape)
  exact = lambda x, times: -(x - x0) / sde.marginal_std(
      times)[:, None, None, None] ** 2
  assert float(losses.dsm_loss(exact, x0, t, z, 25.0)) == pytest.approx(
      0.0, abs=1e-6)


def test_dsm_loss_of_zero_score_is_noise_energy():
  x0 = jnp.zeros((2, 3, 3, 3))
  z = jnp.ones_like(x0).at[1].set(2.0)
  zero = lambda x, times: jnp.zeros_like(x)
  # Per example: sum of z^2 = 27 and 108; the mean is 67.5.
  loss = losses.dsm_loss(zero, x0, jnp.array([0.5, 0.5]), z, 25.0)
  assert float(loss) == pytest.approx(67.5)
