"""Orbax checkpoints of the training state, one folder per category.

A checkpoint contains the params, the EMA params, the optimizer state, the step
and the base RNG key. Orbax writes each step into a temporary folder and
renames it when complete, so a run killed during a save leaves the previous
checkpoint readable.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Saves and restores training states under ``directory``."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, state, rng) -> str:
    """Saves an unreplicated state and the base RNG key; returns the path."""
    step = int(jax.device_get(state.step))
    items = {"state": jax.device_get(state),
             "rng": np.asarray(jax.random.key_data(rng))}
    self._manager.save(step, args=ocp.args.StandardSave(items), force=True)
    self._manager.wait_until_finished()
    path = os.path.join(self.directory, str(step))
    logging.info("Saved checkpoint at step %d to %s", step, path)
    return path

  def restore(self, state_template, rng_template, step: int | None = None):
    """Returns (state, rng) of ``step`` (default the latest), or None if none.

    The templates give the pytree structure, shapes and dtypes to restore into.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    template = {"state": state_template,
                "rng": np.asarray(jax.random.key_data(rng_template))}
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    restored = self._manager.restore(
        step, args=ocp.args.StandardRestore(abstract))
    rng = jax.random.wrap_key_data(np.asarray(restored["rng"]))
    logging.info("Restored checkpoint at step %d from %s", step,
                 os.path.join(self.directory, str(step)))
    return restored["state"], rng

  def close(self):
    self._manager.close()
