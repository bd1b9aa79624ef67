"""Tests for the optimizer, the pmapped train step and checkpoints."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from sprs_jax import checkpoint
from sprs_jax import model as model_lib
from sprs_jax import train


def _tiny_config():
  config = base.get_base_config()
  config.model.widths = (8, 16)
  config.model.num_groups = 4
  config.model.embed_dim = 16
  config.training.learning_rate = 1e-2
  config.training.num_epochs = 4
  config.training.lr_decay_epochs = (2, 3)
  return config


def _setup(config, steps_per_epoch=1):
  model = model_lib.create_model(config.model, config.sde.sigma_max)
  optimizer = train.create_optimizer(config.training, steps_per_epoch)
  schedule = train.learning_rate_schedule(config.training, steps_per_epoch)
  state = train.create_train_state(jax.random.key(0), model, optimizer, 8)
  step = train.make_train_step(model, optimizer, schedule, config.training,
                               config.sde.sigma_max)
  return state, step


def _run_steps(state, step_fn, images, devices, num_steps):
  p_step = jax.pmap(step_fn, axis_name="batch", devices=devices)
  state = flax.jax_utils.replicate(state, devices)
  rng = flax.jax_utils.replicate(jax.random.key(5), devices)
  batch = images.reshape((len(devices), -1) + images.shape[1:])
  for _ in range(num_steps):
    state, metrics = p_step(state, batch, rng)
  return train.unreplicate(state), train.unreplicate(metrics)


def test_pmap_two_devices_matches_one():
  assert jax.local_device_count() >= 2, "conftest forces 2 host devices"
  config = _tiny_config()
  state, step_fn = _setup(config)
  images = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3), minval=-1)

  devices = jax.devices()
  single, metrics_single = _run_steps(state, step_fn, images, devices[:1], 3)
  pair, metrics_pair = _run_steps(state, step_fn, images, devices[:2], 3)

  assert int(single.step) == 3
  assert int(pair.step) == 3
  assert float(metrics_single["loss"]) == pytest.approx(
      float(metrics_pair["loss"]), rel=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(single.params),
                  jax.tree_util.tree_leaves(pair.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(single.ema_params),
                  jax.tree_util.tree_leaves(pair.ema_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_step_trains_all_but_fourier_frequencies():
  config = _tiny_config()
  state, step_fn = _setup(config)
  images = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1)
  new, _ = _run_steps(state, step_fn, images, jax.devices()[:1], 2)
  np.testing.assert_array_equal(new.params["embed_fourier"]["W"],
                                state.params["embed_fourier"]["W"])
  assert not np.allclose(new.params["inc"]["conv0"]["kernel"],
                         state.params["inc"]["conv0"]["kernel"])
  assert not np.allclose(new.ema_params["inc"]["conv0"]["kernel"],
                         state.ema_params["inc"]["conv0"]["kernel"])


def test_ema_decay_warms_up_to_configured_value():
  assert float(train.ema_decay_at(1, 0.9999)) == pytest.approx(2 / 11)
  assert float(train.ema_decay_at(90, 0.9999)) == pytest.approx(91 / 100)
  assert float(train.ema_decay_at(10**7, 0.9999)) == pytest.approx(0.9999)


def test_piecewise_schedule_decays_at_epoch_boundaries():
  config = _tiny_config()
  schedule = train.learning_rate_schedule(config.training, steps_per_epoch=5)
  assert float(schedule(9)) == pytest.approx(1e-2)
  assert float(schedule(10)) == pytest.approx(1e-3)
  assert float(schedule(15)) == pytest.approx(1e-4)


def test_warmup_and_cosine_schedules():
  config = _tiny_config()
  config.training.warmup_steps = 4
  piecewise = train.learning_rate_schedule(config.training, 5)
  assert float(piecewise(0)) == pytest.approx(2.5e-3)
  assert float(piecewise(3)) == pytest.approx(1e-2)
  config.training.lr_schedule = "cosine"
  cosine = train.learning_rate_schedule(config.training, 5)
  assert float(cosine(4)) == pytest.approx(1e-2)
  assert float(cosine(20)) == pytest.approx(0.0, abs=1e-9)
  config.training.lr_schedule = "linear"
  with pytest.raises(ValueError, match="training.lr_schedule='linear'"):
    train.learning_rate_schedule(config.training, 5)


def test_checkpoint_round_trip(tmp_path):
  config = _tiny_config()
  state, _ = _setup(config)
  state = state.replace(step=jnp.asarray(7, jnp.int32))
  checkpointer = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  assert checkpointer.restore(state, jax.random.key(0)) is None
  checkpointer.save(state, jax.random.key(42))
  restored, rng = checkpointer.restore(state, jax.random.key(0))
  checkpointer.close()
  assert int(restored.step) == 7
  np.testing.assert_array_equal(jax.random.key_data(rng),
                                jax.random.key_data(jax.random.key(42)))
  for a, b in zip(jax.tree_util.tree_leaves(restored),
                  jax.tree_util.tree_leaves(state)):
    np.testing.assert_array_equal(a, b)
