"""Tests for the score network."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from sprs_jax import model as model_lib
from sprs_jax import sde

TINY = dict(widths=(8, 16, 16), num_groups=4, embed_dim=16)


def test_default_model_has_reference_parameter_count():
  model = model_lib.create_model(base.get_base_config().model, 25.0)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 192, 192, 3)), jnp.ones((1,)))
  assert model_lib.count_params(shapes["params"]) == 17_843_331
  # 128 fixed Fourier frequencies are part of that count.
  assert shapes["params"]["embed_fourier"]["W"].shape == (128,)


def test_decoder_widths_follow_reference_layout():
  model = model_lib.UNet()
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)), jnp.ones((1,)))["params"]
  kernel = lambda name, conv: shapes[name][conv]["kernel"].shape
  assert kernel("up1", "conv0") == (3, 3, 1024, 512)
  assert kernel("up1", "conv1") == (3, 3, 512, 256)
  assert kernel("up2", "conv0") == (3, 3, 512, 256)
  assert kernel("up4", "conv1") == (3, 3, 64, 64)
  assert shapes["outc"]["kernel"].shape == (1, 1, 64, 3)


@pytest.mark.parametrize("size", [16, 18])
def test_output_shape_and_scale(size):
  model = model_lib.UNet(**TINY)
  x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  t = jnp.array([1e-3, 0.5])
  params = model.init(jax.random.key(0), x, t)
  out = model.apply(params, x, t)
  assert out.shape == (2, size, size, 3)
  assert out.dtype == jnp.float32
  # The output is divided by sigma(t): the small-t score is far larger.
  ratio = float(jnp.abs(out[0]).mean() / jnp.abs(out[1]).mean())
  expected = float(sde.marginal_std(0.5) / sde.marginal_std(1e-3))
  assert ratio == pytest.approx(expected, rel=0.5)


def test_bfloat16_compute_keeps_float32_params():
  model = model_lib.UNet(**TINY, dtype=jnp.bfloat16)
  x = jnp.ones((1, 16, 16, 3))
  params = model.init(jax.random.key(0), x, jnp.ones((1,)))
  dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert model.apply(params, x, jnp.ones((1,))).dtype == jnp.float32


def test_widths_not_divisible_by_groups_raise():
  model = model_lib.UNet(widths=(8, 12), num_groups=8)
  with pytest.raises(ValueError, match="divisible by model.num_groups=8"):
    model.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)), jnp.ones((1,)))


def test_unknown_dtype_raises():
  config = base.get_base_config().model
  config.dtype = "float16"
  with pytest.raises(ValueError, match="model.dtype='float16'"):
    model_lib.create_model(config, 25.0)


def test_upsample_matches_align_corners_definition():
  x = jnp.array([0.0, 3.0, 6.0]).reshape(1, 1, 3, 1) * jnp.ones((1, 3, 1, 1))
  up = np.asarray(model_lib.upsample2x_align_corners(x))[0, 0, :, 0]
  # Output pixel i samples input position i * (3 - 1) / (6 - 1).
  np.testing.assert_allclose(up, [0.0, 1.2, 2.4, 3.6, 4.8, 6.0], atol=1e-6)
  assert up.shape == (6,)


def test_upsample_of_one_pixel_repeats_it():
  x = jnp.full((1, 1, 1, 2), 5.0)
  np.testing.assert_allclose(model_lib.upsample2x_align_corners(x),
                             jnp.full((1, 2, 2, 2), 5.0))


def test_group_norm_matches_flax_values_and_gradients():
  import flax.linen as nn
  x = 3.0 * jax.random.normal(jax.random.key(0), (2, 5, 6, 16)) + 1.5
  ours = model_lib.GroupNorm(num_groups=4)
  reference = nn.GroupNorm(num_groups=4, epsilon=1e-5)
  params = {"params": {
      "scale": jax.random.normal(jax.random.key(1), (16,)),
      "bias": jax.random.normal(jax.random.key(2), (16,))}}
  assert (jax.tree_util.tree_structure(ours.init(jax.random.key(3), x)) ==
          jax.tree_util.tree_structure(params))
  weights = jax.random.normal(jax.random.key(4), x.shape)
  loss = lambda module: lambda p, x: jnp.sum(
      model_lib.swish(module.apply(p, x)) * weights)

  np.testing.assert_allclose(ours.apply(params, x),
                             reference.apply(params, x), atol=1e-5)
  for ours_grad, reference_grad in zip(
      jax.tree_util.tree_leaves(jax.grad(loss(ours), (0, 1))(params, x)),
      jax.tree_util.tree_leaves(jax.grad(loss(reference), (0, 1))(params, x))):
    np.testing.assert_allclose(ours_grad, reference_grad, atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (1, 7, 5, 2)])
def test_max_pool_matches_flax_window_pool(shape):
  import flax.linen as nn
  # Odd sizes drop the last row or column, as PyTorch's MaxPool2d(2) does.
  x = jax.random.normal(jax.random.key(0), shape)
  np.testing.assert_array_equal(
      model_lib.max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
  weights = jax.random.normal(jax.random.key(1), model_lib.max_pool_2x2(x).shape)
  np.testing.assert_array_equal(
      jax.grad(lambda x: jnp.sum(model_lib.max_pool_2x2(x) * weights))(x),
      jax.grad(lambda x: jnp.sum(
          nn.max_pool(x, (2, 2), strides=(2, 2)) * weights))(x))
