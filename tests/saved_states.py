"""Reads back the training state that a test run checkpointed."""

import os

import jax
import numpy as np

from sprs_jax import checkpoint
from sprs_jax import model as model_lib
from sprs_jax import train


def restore_latest(config, category_dir):
  """Returns (TrainState, RNG key data) of category_dir's latest checkpoint.

  The template comes from `config`'s model and image size. The optimizer's
  schedule does not change the state's shapes, so one step per epoch does.
  """
  model = model_lib.create_model(config.model, config.sde.sigma_max)
  optimizer = train.create_optimizer(config.training, 1)
  rng = jax.random.key(0)
  template = jax.eval_shape(lambda: train.create_train_state(
      rng, model, optimizer, config.data.image_size))
  checkpointer = checkpoint.Checkpointer(
      os.path.join(category_dir, "checkpoints"))
  try:
    state, restored_rng = checkpointer.restore(template, rng)
  finally:
    checkpointer.close()
  return state, np.asarray(jax.random.key_data(restored_rng))
