"""Fault handling of the training loop: stop signals, divergence, disk space.

- `StopSignals` turns SIGTERM and SIGINT into a request to stop after the
  step in progress, so the loop can write a checkpoint and raise
  `TrainingStopped`. run.py exits with status 128 + the signal number.
- `DivergenceCheck` stops training at the first step whose loss is NaN or
  Inf, and `state_is_finite` keeps a state with NaN or Inf out of every
  checkpoint.
- `check_writable` and `check_free_space` reject a checkpoint folder that
  cannot take the checkpoints of a run, before training starts.
"""

import os
import shutil
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

# SIGTERM comes from job schedulers and `kill`, SIGINT from Ctrl+C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Factor and fixed bytes added to the estimated size of one checkpoint, for
# Orbax's metadata and per-array overhead.
SPACE_MARGIN_FACTOR = 1.25
SPACE_MARGIN_BYTES = 4 * 2**20


class TrainingStopped(Exception):
  """Training stopped on a signal after writing a checkpoint.

  Attributes:
    signal_number: the signal received, such as signal.SIGTERM.
    step: the last step trained.
    checkpoint_path: the checkpoint of `step`.
    exit_status: 128 + signal_number, the shell's status of a process that a
      signal stopped.
  """

  def __init__(self, signal_number: int, step: int, checkpoint_path: str):
    self.signal_number = signal_number
    self.step = step
    self.checkpoint_path = checkpoint_path
    self.exit_status = 128 + signal_number
    name = signal.Signals(signal_number).name
    super().__init__(
        f"Training stopped by {name} after step {step}, saved to "
        f"{checkpoint_path}. Rerun the same command to resume.")


class StopSignals:
  """Context manager that turns SIGTERM and SIGINT into a stop request.

  Inside the block a signal only sets `signal_number`, so the loop finishes
  its step and saves. Further signals are logged and ignored, so they cannot
  interrupt that save. The previous handlers are restored on exit. Outside
  the main thread Python cannot install handlers, so nothing is installed.

  NOTE: in a run of several processes each one reacts to its own signals. A
  signal that reaches only some of them leaves the others waiting at the
  next step's collective.
  """

  def __init__(self):
    self.signal_number: int | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      logging.warning("Training runs outside the main thread, so SIGTERM and "
                      "SIGINT stop it without a checkpoint.")
      return self
    for number in STOP_SIGNALS:
      self._previous[number] = signal.signal(number, self._handle)
    return self

  def __exit__(self, *exc_info):
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    self._previous = {}
    return False

  def _handle(self, number, frame):
    del frame  # Unused.
    name = signal.Signals(number).name
    if self.signal_number is None:
      self.signal_number = number
      logging.warning("Received %s: stopping after the current step and "
                      "saving a checkpoint.", name)
    else:
      logging.warning("Received %s while stopping: ignored, so the "
                      "checkpoint is written in full. SIGKILL stops at once "
                      "and keeps the previous checkpoint.", name)


@jax.jit
def state_is_finite(state) -> jax.Array:
  """Returns a bool scalar: every float array of state is finite.

  One pass over the state, which `train` runs before each checkpoint save.
  """
  flags = [jnp.all(jnp.isfinite(leaf))
           for leaf in jax.tree_util.tree_leaves(state)
           if jnp.issubdtype(leaf.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags))


class DivergenceCheck:
  """Checks the loss of every step for NaN and Inf, one step late.

  `push` fetches the flag of the step before the one just dispatched, so the
  host waits for the step in flight only at logs and saves. `check_latest`
  fetches the flag of the newest step and checks the state, and `train`
  runs it before every save.
  """

  def __init__(self, checkpointer):
    self._checkpointer = checkpointer
    self._pending = None

  def push(self, step: int, metrics) -> None:
    """Records step's metrics, replicated over devices, and checks the previous step."""
    previous, self._pending = self._pending, (step, metrics)
    if previous is not None:
      self._check(*previous)

  def check_latest(self, state=None) -> None:
    """Checks the newest step's loss, and with `state` its every float array.

    `state` is the unreplicated training state after that step. Raises
    FloatingPointError as `push` does.
    """
    if self._pending is None:
      return
    self._check(*self._pending)
    if state is not None and not bool(state_is_finite(state)):
      self._raise(self._pending[0], "the params or optimizer state contain "
                  "NaN or Inf")

  def _raise(self, step: int, problem: str):
    latest = self._checkpointer.latest_step()
    if latest is None:
      saved = "No checkpoint was saved before it."
    else:
      saved = (f"The latest checkpoint, {self._checkpointer.directory}"
               f"{os.sep}{latest} (step {latest}), is finite and kept.")
    raise FloatingPointError(
        f"Training diverged at step {step}: {problem}. {saved} Lower "
        "training.learning_rate or check the input images, then rerun to "
        "resume from that checkpoint.")

  def _check(self, step: int, metrics) -> None:
    """Raises FloatingPointError if step's loss is not finite."""
    if bool(jax.device_get(metrics["finite"][0])):
      return
    loss = float(jax.device_get(metrics["loss"][0]))
    self._raise(step, f"the loss is {loss}, for the first time at this step")


def write_probe(directory: str) -> None:
  """Creates directory, then writes and deletes a probe file there.

  Raises:
    OSError: if either fails.
  """
  os.makedirs(directory, exist_ok=True)
  probe = os.path.join(directory, f".write_check_{os.getpid()}")
  with open(probe, "w"):
    pass
  os.unlink(probe)


def check_writable(directory: str) -> None:
  """Raises ValueError unless checkpoints can be written to directory."""
  try:
    write_probe(directory)
  except OSError as error:
    raise ValueError(
        f"Cannot write checkpoints to {directory}: {error}. Make it "
        "writable or pass another --workdir.") from error


def checkpoint_size_estimate(tree) -> int:
  """Returns an estimate of the bytes of a checkpoint of tree, with a margin.

  It is the bytes of the arrays in tree times SPACE_MARGIN_FACTOR plus
  SPACE_MARGIN_BYTES. Orbax may compress, so the files are usually smaller.
  """
  array_bytes = sum(int(np.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize
                    for leaf in jax.tree_util.tree_leaves(tree))
  return int(array_bytes * SPACE_MARGIN_FACTOR + SPACE_MARGIN_BYTES)


def _format_bytes(count: int) -> str:
  if count < 1024:
    return f"{count} bytes"
  size = float(count)
  for unit in ("KiB", "MiB", "GiB"):
    size /= 1024
    if size < 1024:
      break
  return f"{size:.1f} {unit}"


def check_free_space(directory: str, tree, max_checkpoints: int) -> int:
  """Raises ValueError if directory lacks room for this run's checkpoints.

  A run keeps max_checkpoints checkpoints and writes one more before Orbax
  deletes the oldest. Checkpoints already in the folder take part of that
  room. Each one is sized by `checkpoint_size_estimate` of tree (the state
  and the RNG key).

  Returns:
    The free bytes needed.
  """
  per_checkpoint = checkpoint_size_estimate(tree)
  existing = sum(1 for name in os.listdir(directory) if name.isdigit())
  count = max(max_checkpoints + 1 - existing, 1)
  needed = per_checkpoint * count
  free = shutil.disk_usage(directory).free
  if free < needed:
    raise ValueError(
        f"Not enough free space in {directory}: {_format_bytes(free)} free, "
        f"{_format_bytes(needed)} needed for "
        f"{count} more checkpoints of about {_format_bytes(per_checkpoint)} "
        "each "
        f"(training.max_checkpoints={max_checkpoints} kept plus one being "
        "written). Free space, lower training.max_checkpoints or pass another "
        "--workdir.")
  return needed
