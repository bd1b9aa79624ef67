"""Tests of training under faults: stop signals, divergence, disk space, kills.

The subprocess tests run `run.py --mode=train` on a tiny MVTec AD tree (3
training images in batches of 2, so 2 steps per epoch, 16-pixel images and
a U-Net of 8 to 16 channels) on 2 forced host devices. The runs share a JAX
compilation cache, so only the first one compiles.

Resumed runs must end with the same state as an uninterrupted run, bit for
bit: the checkpoint stores the exact float32 arrays and the base RNG key,
the loader rebuilds the same batches from (seed, epoch), and the same XLA
executable runs every step on CPU, whose reductions are deterministic.
"""

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import anomaly_trees
import stalled_save_run
import saved_states
from configs import mvtec
from sprs_jax import checkpoint
from sprs_jax import faults
from sprs_jax import input_pipeline
from sprs_jax import run_lib
from sprs_jax import train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CATEGORY = "bottle"
STEPS_PER_EPOCH = 2
NUM_EPOCHS = 300
TOTAL_STEPS = NUM_EPOCHS * STEPS_PER_EPOCH
CHECKPOINT_EVERY_STEPS = 100
OVERRIDES = {
    "data.image_size": 16,
    "model.widths": (8, 16, 16),
    "model.num_groups": 4,
    "model.embed_dim": 16,
    "training.batch_size": 2,
    "training.num_epochs": NUM_EPOCHS,
    "training.log_every_steps": 10,
    "training.checkpoint_every_steps": CHECKPOINT_EVERY_STEPS,
}
# Seconds to wait for a subprocess to reach a log line or to exit.
TIMEOUT_SECONDS = 300


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def manual_dir(module_dir):
  tree = anomaly_trees.write_category(module_dir / "manual",
                                      anomaly_trees.SPECS["mvtec_ad"])
  return tree.manual_dir


def _config(module_dir, manual_dir, **changes):
  config = mvtec.get_config(CATEGORY)
  config.update_from_flattened_dict({
      "data.manual_dir": str(manual_dir),
      "data.data_dir": str(module_dir / "data"),
      **OVERRIDES, **changes})
  return config


def _command(module_dir, manual_dir, workdir, script="run.py"):
  command = [
      sys.executable, str(REPO_ROOT / script),
      f"--config=configs/mvtec.py:{CATEGORY}", "--mode=train",
      f"--workdir={workdir}",
      f"--config.data.manual_dir={manual_dir}",
      f"--config.data.data_dir={module_dir / 'data'}",
  ]
  return command + [f"--config.{key}={value}"
                    for key, value in OVERRIDES.items()]


def _environment(module_dir, **extra):
  return dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      JAX_PLATFORMS="cpu",
      JAX_COMPILATION_CACHE_DIR=str(module_dir / "jax_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      **extra)


def _run(command, environment):
  return subprocess.run(command, cwd=REPO_ROOT, env=environment,
                        capture_output=True, text=True,
                        timeout=TIMEOUT_SECONDS)


class _Background:
  """A subprocess whose stdout and stderr go to a file that the test polls."""

  def __init__(self, command, environment, log_path):
    self.log_path = log_path
    self._log = open(log_path, "w")
    self.process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=environment, stdout=self._log,
        stderr=subprocess.STDOUT, text=True)

  def log(self):
    return self.log_path.read_text()

  def wait_for(self, text):
    """Polls the log until it contains text; fails if the process exits first."""
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while text not in self.log():
      if self.process.poll() is not None:
        pytest.fail(f"The run exited with {self.process.returncode} before "
                    f"logging {text!r}:\n{self.log()[-3000:]}")
      if time.monotonic() > deadline:
        self.process.kill()
        pytest.fail(f"No {text!r} in the log after {TIMEOUT_SECONDS} s.")
      time.sleep(0.02)

  def wait(self):
    try:
      return self.process.wait(timeout=TIMEOUT_SECONDS)
    finally:
      self._log.close()


def _category_dir(workdir):
  return pathlib.Path(workdir) / CATEGORY


def _assert_trees_equal(actual, expected):
  actual_leaves = jax.tree_util.tree_leaves_with_path(actual)
  expected_leaves = jax.tree_util.tree_leaves(expected)
  assert len(actual_leaves) == len(expected_leaves)
  for (path, a), b in zip(actual_leaves, expected_leaves):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def _assert_all_finite(tree):
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if np.issubdtype(np.asarray(leaf).dtype, np.inexact):
      assert np.all(np.isfinite(leaf)), jax.tree_util.keystr(path)


def _step_folders(category_dir):
  folder = pathlib.Path(category_dir) / "checkpoints"
  return sorted(int(path.name) for path in folder.iterdir()
                if path.name.isdigit())


def _temporary_folders(category_dir):
  folder = pathlib.Path(category_dir) / "checkpoints"
  return [path.name for path in folder.iterdir()
          if ".orbax-checkpoint-tmp" in path.name]


@pytest.fixture(scope="module")
def reference(module_dir, manual_dir):
  """Returns (state, rng key data) of an uninterrupted run to TOTAL_STEPS."""
  workdir = module_dir / "reference"
  completed = _run(_command(module_dir, manual_dir, workdir),
                   _environment(module_dir))
  assert completed.returncode == 0, completed.stderr[-3000:]
  config = _config(module_dir, manual_dir)
  return saved_states.restore_latest(config, _category_dir(workdir))


def test_sigterm_saves_and_resume_matches(module_dir, manual_dir, reference,
                                          tmp_path):
  workdir = tmp_path / "workdir"
  command = _command(module_dir, manual_dir, workdir)
  environment = _environment(module_dir)
  run = _Background(command, environment, tmp_path / "stopped.log")
  run.wait_for(f"step 20/{TOTAL_STEPS}")
  run.process.send_signal(signal.SIGTERM)
  # A second signal, which usually lands during the save, must change
  # nothing. Signals sent back to back would merge into one.
  run.wait_for("Received SIGTERM: stopping")
  run.process.send_signal(signal.SIGTERM)
  status = run.wait()
  log = run.log()

  assert status == 128 + signal.SIGTERM, log[-3000:]
  assert "Rerun the same command to resume." in log
  stopped_line = next(line for line in log.splitlines()
                      if line.startswith("Training stopped by SIGTERM"))
  step = int(stopped_line.split("after step ")[1].split(",")[0])
  assert 20 <= step < TOTAL_STEPS
  category_dir = _category_dir(workdir)
  assert str(category_dir / "checkpoints" / str(step)) in stopped_line
  assert _step_folders(category_dir)[-1] == step
  stats = json.loads((category_dir / "train_stats.json").read_text())
  assert stats["step"] == step
  config = _config(module_dir, manual_dir)
  stopped_state, _ = saved_states.restore_latest(config, category_dir)
  assert int(stopped_state.step) == step

  completed = _run(command, environment)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert f"starting at step {step}." in completed.stderr

  state, rng = saved_states.restore_latest(config, category_dir)
  expected_state, expected_rng = reference
  assert int(state.step) == TOTAL_STEPS
  np.testing.assert_array_equal(rng, expected_rng)
  _assert_trees_equal(state.params, expected_state.params)
  _assert_trees_equal(state.ema_params, expected_state.ema_params)
  _assert_trees_equal(state.opt_state, expected_state.opt_state)
  stats = json.loads((category_dir / "train_stats.json").read_text())
  assert stats["train_images"] == TOTAL_STEPS * 2


def test_kill_during_save_keeps_previous(module_dir, manual_dir, reference,
                                        tmp_path):
  workdir = tmp_path / "workdir"
  category_dir = _category_dir(workdir)
  environment = _environment(module_dir, STALL_SAVE_NUMBER="2")
  run = _Background(
      _command(module_dir, manual_dir, workdir,
               script="tests/stalled_save_run.py"),
      environment, tmp_path / "killed.log")
  run.wait_for(stalled_save_run.STALL_MARKER)
  run.process.send_signal(signal.SIGKILL)
  assert run.wait() == -signal.SIGKILL

  # The second save was written to a temporary folder and never renamed.
  assert len(_temporary_folders(category_dir)) == 1
  assert run_lib._latest_step(str(category_dir)) == CHECKPOINT_EVERY_STEPS
  checkpointer = checkpoint.Checkpointer(str(category_dir / "checkpoints"))
  try:
    assert checkpointer.latest_step() == CHECKPOINT_EVERY_STEPS
  finally:
    checkpointer.close()
  # Reading a checkpoint leaves the temporary folder alone: it could be a
  # save in progress.
  assert len(_temporary_folders(category_dir)) == 1
  config = _config(module_dir, manual_dir)
  state, _ = saved_states.restore_latest(config, category_dir)
  assert int(state.step) == CHECKPOINT_EVERY_STEPS
  _assert_all_finite(state)

  completed = _run(_command(module_dir, manual_dir, workdir),
                   _environment(module_dir))
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert f"starting at step {CHECKPOINT_EVERY_STEPS}." in completed.stderr
  assert _temporary_folders(category_dir) == []
  assert _step_folders(category_dir)[-1] == TOTAL_STEPS
  assert run_lib._latest_step(str(category_dir)) == TOTAL_STEPS
  state, _ = saved_states.restore_latest(config, category_dir)
  _assert_trees_equal(state.params, reference[0].params)
  _assert_trees_equal(state.ema_params, reference[0].ema_params)


class _PoisonedLoader:
  """A TrainLoader whose batch of one step (1-based) is all NaN."""

  def __init__(self, loader, bad_step):
    self._loader = loader
    self._bad_step = bad_step
    self.steps_per_epoch = loader.steps_per_epoch

  def epoch_batches(self, epoch, start_step=0):
    batches = self._loader.epoch_batches(epoch, start_step)
    for index, batch in enumerate(batches, start=start_step):
      if epoch * self.steps_per_epoch + index + 1 == self._bad_step:
        batch = np.full_like(batch, np.nan)
      yield batch


def test_divergence_names_step_and_checkpoint(module_dir, manual_dir, tmp_path):
  # 12 steps, a checkpoint every 4 and a log only at the last step. Step 8
  # is a checkpoint step: the check one step late alone would save it.
  bad_step = 8
  config = _config(module_dir, manual_dir, **{
      "training.num_epochs": 6,
      "training.checkpoint_every_steps": 4,
      "training.log_every_steps": 100})
  input_pipeline.prepare(config.data)
  loader = input_pipeline.TrainLoader(
      input_pipeline.load_split(config.data, "train"),
      image_size=config.data.image_size,
      global_batch_size=config.training.batch_size, seed=config.seed)
  category_dir = tmp_path / CATEGORY
  handlers = {number: signal.getsignal(number)
              for number in faults.STOP_SIGNALS}

  with pytest.raises(FloatingPointError) as error:
    train.train(config, str(category_dir), _PoisonedLoader(loader, bad_step))

  message = str(error.value)
  last_good = 4
  assert f"diverged at step {bad_step}:" in message
  assert f"{category_dir / 'checkpoints' / str(last_good)} " in message
  assert _step_folders(category_dir) == [last_good]
  state, _ = saved_states.restore_latest(config, category_dir)
  assert int(state.step) == last_good
  _assert_all_finite(state)
  stats = json.loads((category_dir / "train_stats.json").read_text())
  assert stats["step"] == last_good
  assert {number: signal.getsignal(number)
          for number in faults.STOP_SIGNALS} == handlers


class _FakeCheckpointer:
  directory = "/w/bottle/checkpoints"

  def __init__(self, latest):
    self.latest = latest

  def latest_step(self):
    return self.latest


def _metrics(finite, loss):
  """Returns metrics as the pmapped step returns them on 2 devices."""
  return {"finite": np.array([finite, finite]), "loss": np.array([loss, loss])}


def test_divergence_check_one_step_late():
  check = faults.DivergenceCheck(_FakeCheckpointer(latest=None))
  check.push(1, _metrics(True, 2.0))
  check.push(2, _metrics(False, np.nan))
  with pytest.raises(FloatingPointError) as error:
    check.push(3, _metrics(False, np.nan))
  assert "diverged at step 2:" in str(error.value)
  assert "No checkpoint was saved before it." in str(error.value)


def test_divergence_check_latest_before_save():
  check = faults.DivergenceCheck(_FakeCheckpointer(latest=4))
  check.push(5, _metrics(True, 2.0))
  check.check_latest()
  check.push(6, _metrics(False, np.inf))
  with pytest.raises(FloatingPointError) as error:
    check.check_latest()
  message = str(error.value)
  assert "diverged at step 6: the loss is inf" in message
  assert "/w/bottle/checkpoints/4 (step 4), is finite and kept." in message


def test_divergence_check_latest_checks_state():
  check = faults.DivergenceCheck(_FakeCheckpointer(latest=4))
  check.push(5, _metrics(True, 2.0))
  finite_state = {"params": np.ones(3, np.float32), "step": np.int32(5)}
  check.check_latest(finite_state)
  bad_state = {"params": np.array([1.0, np.nan, 0.0], np.float32),
               "step": np.int32(5)}
  with pytest.raises(FloatingPointError) as error:
    check.check_latest(bad_state)
  message = str(error.value)
  assert "diverged at step 5: the params or optimizer state" in message
  assert "/w/bottle/checkpoints/4 (step 4), is finite and kept." in message


def test_stop_signals_flag_and_restore(caplog):
  caplog.set_level(logging.WARNING, logger="absl")
  previous = {number: signal.getsignal(number)
              for number in faults.STOP_SIGNALS}
  with faults.StopSignals() as stop_signals:
    assert stop_signals.signal_number is None
    os.kill(os.getpid(), signal.SIGINT)
    # Python runs handlers between bytecodes of the main thread.
    time.sleep(0.01)
    assert stop_signals.signal_number == signal.SIGINT
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    assert stop_signals.signal_number == signal.SIGINT
  assert "Received SIGINT: stopping after the current step" in caplog.text
  assert "Received SIGTERM while stopping: ignored" in caplog.text
  for number, handler in previous.items():
    assert signal.getsignal(number) is handler, signal.Signals(number).name


def test_stopped_message_and_status():
  stopped = faults.TrainingStopped(signal.SIGINT, 42, "/w/bottle/checkpoints/42")
  assert stopped.exit_status == 130
  assert str(stopped) == (
      "Training stopped by SIGINT after step 42, saved to "
      "/w/bottle/checkpoints/42. Rerun the same command to resume.")


def test_no_room_fails_before_training(module_dir, manual_dir, tmp_path,
                                       monkeypatch):
  config = _config(module_dir, manual_dir)
  free = 10 * 2**20
  monkeypatch.setattr(shutil, "disk_usage",
                      lambda path: shutil._ntuple_diskusage(2**40, 2**40 - free,
                                                            free))
  workdir = tmp_path / "workdir"

  with pytest.raises(ValueError, match="Not enough free space") as error:
    run_lib.run(config, str(workdir), "train")

  message = str(error.value)
  assert str(_category_dir(workdir) / "checkpoints") in message
  assert "10.0 MiB free" in message
  assert "needed for 3 more checkpoints" in message
  assert "training.max_checkpoints=2" in message
  assert _step_folders(_category_dir(workdir)) == []
  assert not (_category_dir(workdir) / "train_stats.json").exists()


def test_space_estimate_covers_checkpoint(module_dir, reference):
  state, rng = reference
  folder = module_dir / "reference" / CATEGORY / "checkpoints"
  saved_bytes = sum(path.stat().st_size
                    for path in (folder / str(TOTAL_STEPS)).rglob("*")
                    if path.is_file())
  per_checkpoint = faults.checkpoint_size_estimate((state, rng))
  assert saved_bytes <= per_checkpoint
  # The estimate is not wildly larger than the files.
  assert per_checkpoint <= faults.SPACE_MARGIN_BYTES + 4 * saved_bytes


def test_checkpoint_folder_is_file(module_dir, manual_dir, tmp_path):
  config = _config(module_dir, manual_dir)
  category_dir = _category_dir(tmp_path / "workdir")
  category_dir.mkdir(parents=True)
  (category_dir / "checkpoints").write_text("")

  with pytest.raises(ValueError, match="Cannot write checkpoints to") as error:
    run_lib.run(config, str(tmp_path / "workdir"), "train")
  assert str(category_dir / "checkpoints") in str(error.value)


@pytest.mark.skipif(os.geteuid() == 0,
                    reason="root writes to read-only folders anyway")
def test_unwritable_checkpoint_folder(module_dir, manual_dir, tmp_path):
  config = _config(module_dir, manual_dir)
  folder = _category_dir(tmp_path / "workdir") / "checkpoints"
  folder.mkdir(parents=True)
  folder.chmod(0o555)
  try:
    with pytest.raises(ValueError, match="Cannot write checkpoints to") as error:
      run_lib.run(config, str(tmp_path / "workdir"), "train")
  finally:
    folder.chmod(0o755)
  assert str(folder) in str(error.value)
  assert "Permission denied" in str(error.value)
