"""Orbax checkpoints of the training state, one folder per category.

A checkpoint contains the params, the EMA params, the optimizer state, the step
and the base RNG key. Orbax writes each step into a temporary folder
(`<step>.orbax-checkpoint-tmp...`) and renames it to `<step>` when complete,
so a run killed during a save leaves the previous checkpoint readable, and
the latest step is the highest digit-named folder. A training Checkpointer
deletes such leftover temporary folders when it starts.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from sprs_jax import distributed


class Checkpointer:
  """Saves and restores training states under ``directory``.

  With ``delete_partial_saves`` it deletes the temporary folders of saves
  that a killed run left. Only training sets it: a reader must not delete
  the folder of a save in progress in another process.
  """

  def __init__(self, directory: str, max_to_keep: int = 2,
               delete_partial_saves: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        cleanup_tmp_directories=delete_partial_saves)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, state, rng) -> str:
    """Saves an unreplicated state and the base RNG key; returns the path.

    Every process of a multi-process run must call this with the same
    values. Orbax 0.12 writes host NumPy arrays from process 0 only.
    """
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
    # Before Orbax's own barriers, which would hang or fail with internal
    # messages if the processes restored different steps.
    distributed.check_same_in_all_processes(
        -1 if step is None else step,
        f"checkpoint step to restore from {self.directory} (-1: none)")
    if step is None:
      return None
    template = {"state": state_template,
                "rng": np.asarray(jax.random.key_data(rng_template))}
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    path = os.path.join(self.directory, str(step))
    try:
      restored = self._manager.restore(
          step, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, TypeError) as error:
      # Orbax reports a tree mismatch with internal names only.
      raise _mismatch_error(
          path, f"{type(error).__name__}: {str(error)[:300]}") from error
    _check_shapes(restored["state"], state_template, path)
    rng = jax.random.wrap_key_data(np.asarray(restored["rng"]))
    logging.info("Restored checkpoint at step %d from %s", step, path)
    return restored["state"], rng

  def close(self):
    self._manager.close()


def _mismatch_error(path: str, detail: str) -> ValueError:
  return ValueError(
      f"The checkpoint {path} does not fit the model of this config "
      f"({detail}). It was trained with other model or data.image_size "
      "fields: pass the config it was trained with, or another --workdir.")


def _check_shapes(restored, template, path: str) -> None:
  """Raises ValueError at the first leaf whose shape differs from template.

  Orbax restores the saved shapes even when the target gives others.
  """
  restored_leaves = jax.tree_util.tree_leaves_with_path(restored)
  template_leaves = jax.tree_util.tree_leaves(template)
  if len(restored_leaves) != len(template_leaves):
    raise _mismatch_error(
        path, f"{len(restored_leaves)} arrays saved, {len(template_leaves)} "
        "expected")
  for (key_path, saved), expected in zip(restored_leaves, template_leaves):
    if np.shape(saved) != np.shape(expected):
      raise _mismatch_error(
          path, f"{jax.tree_util.keystr(key_path)} has shape "
          f"{np.shape(saved)}, the config gives {np.shape(expected)}")
