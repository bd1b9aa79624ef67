"""Tests of multi-process runs: flag checks, and 2 processes against 1.

The end-to-end test starts two run.py processes with one CPU device each,
joined by JAX's distributed runtime on a localhost coordinator with Gloo
collectives, and one run.py process with two forced host devices. Both train
the same tiny config on the same data, so their checkpoints must match.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import saved_states
from configs import mvtec
from sprs_jax import checkpoint
from sprs_jax import distributed
from sprs_jax import train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CATEGORY = "bottle"
# 5 training images in global batches of 4: 2 steps per epoch, 4 steps.
OVERRIDES = {
    "data.image_size": 8,
    "model.widths": (8,),
    "model.num_groups": 4,
    "model.embed_dim": 16,
    "training.batch_size": 4,
    "training.num_epochs": 2,
    "training.learning_rate": 1e-2,
    "training.log_every_steps": 1,
    "training.checkpoint_every_steps": 2,
    "eval.heatmap_size": 8,
    "eval.filter_size": 3,
    "eval.num_draws": 1,
    "eval.batch_size": 2,
    "eval.num_panels": 2,
}
NUM_STEPS = 4
# Seconds each run.py process may take; one takes about 20 s of CPU time.
RUN_TIMEOUT = 300
# Environment variables by which JAX would detect a cluster and start a
# distributed runtime in the reference run.
_CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "JAX_COORDINATOR", "TPU_")


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def _environment(device_count: int) -> dict:
  environment = {
      key: value for key, value in os.environ.items()
      if not key.startswith(_CLUSTER_PREFIXES)}
  environment.update(
      XLA_FLAGS=f"--xla_force_host_platform_device_count={device_count}",
      JAX_PLATFORMS="cpu",
      JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
  )
  return environment


def _command(workdir, mvtec_dir, data_dir, *extra):
  command = [
      sys.executable, "run.py", f"--config=configs/mvtec.py:{CATEGORY}",
      f"--workdir={workdir}", f"--config.data.manual_dir={mvtec_dir}",
      f"--config.data.data_dir={data_dir}",
  ]
  command += [f"--config.{key}={value}" for key, value in OVERRIDES.items()]
  return command + list(extra)


def _run_processes(commands, environments, log_prefix, timeout=RUN_TIMEOUT,
                   expect_success=True):
  """Runs the commands at once; returns their exit codes and logs.

  Process i writes stdout and stderr to the file `<log_prefix>_<i>.log`, so a
  full pipe cannot block it. Every process is killed at the timeout. The
  test fails, showing the logs, at the timeout, and if expect_success is
  True and a process exits with an error.
  """
  processes, log_paths = [], []
  for index, (command, environment) in enumerate(zip(commands, environments)):
    log_path = log_prefix.with_name(f"{log_prefix.name}_{index}.log")
    with open(log_path, "w") as log:
      processes.append(subprocess.Popen(
          command, cwd=REPO_ROOT, env=environment, stdout=log,
          stderr=subprocess.STDOUT, text=True))
    log_paths.append(log_path)

  deadline = time.monotonic() + timeout
  timed_out = False
  for process in processes:
    try:
      process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      timed_out = True
      break
  if timed_out:
    for process in processes:
      process.kill()
      process.wait()

  logs = [path.read_text() for path in log_paths]
  failed = any(process.returncode for process in processes)
  if timed_out or (failed and expect_success):
    report = "\n".join(
        f"--- process {index}, exit code {process.returncode}, last lines "
        f"of {log_paths[index]}:\n{log[-4000:]}"
        for index, (process, log) in enumerate(zip(processes, logs)))
    reason = f"timed out after {timeout} s" if timed_out else "failed"
    pytest.fail(f"run.py {reason}:\n{report}")
  return [process.returncode for process in processes], logs


def _relative_files(folder):
  """Returns the files under folder, with one entry per checkpoint step.

  Orbax names the files inside a checkpoint at random.
  """
  names = set()
  for path in pathlib.Path(folder).rglob("*"):
    parts = path.relative_to(folder).parts
    if "checkpoints" in parts[:-1]:
      names.add("/".join(parts[:parts.index("checkpoints") + 2]))
    elif path.is_file():
      names.add("/".join(parts))
  return sorted(names)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  """Runs run.py with 2 processes, then with 1 process of 2 devices.

  The 2 processes train and evaluate, building the data set (process 0
  first), and run again with --mode=evaluate, which restores the checkpoint
  in both. The reference process only trains, on the same data set.

  Returns:
    A dict: "multi_workdir", "single_workdir", "first_metrics" and
    "first_threshold" (metrics.json and threshold.json after the first
    2-process run), "train_logs" and "evaluate_logs" (of the 2 processes).
  """
  from conftest import _write_mvtec_category  # pylint: disable=import-outside-toplevel

  root = tmp_path_factory.mktemp("distributed")
  mvtec_dir = root / "mvtec"
  _write_mvtec_category(mvtec_dir / CATEGORY, np.random.default_rng(0),
                        (24, 24, 3))
  data_dir = root / "data"
  multi_workdir = root / "two_processes"
  single_workdir = root / "one_process"

  def run_two_processes(mode):
    address = f"localhost:{_free_port()}"
    commands = [
        _command(multi_workdir, mvtec_dir, data_dir, f"--mode={mode}",
                 f"--coordinator_address={address}", "--num_processes=2",
                 f"--process_id={index}")
        for index in range(2)]
    return _run_processes(commands, [_environment(1)] * 2, root / mode)[1]

  runs = {"multi_workdir": multi_workdir, "single_workdir": single_workdir}
  runs["train_logs"] = run_two_processes("train_and_evaluate")
  runs["first_metrics"] = (multi_workdir / "metrics.json").read_text()
  runs["first_threshold"] = (
      multi_workdir / CATEGORY / "threshold.json").read_text()
  runs["evaluate_logs"] = run_two_processes("evaluate")
  _run_processes(
      [_command(single_workdir, mvtec_dir, data_dir, "--mode=train")],
      [_environment(2)], root / "one_process")
  return runs


def _category_line(log):
  """Returns the log's line of the category's metrics, without its prefix."""
  lines = [line.split("] ", 1)[1] for line in log.splitlines()
           if f"Category {CATEGORY}: image AUROC" in line]
  assert len(lines) == 1, log[-3000:]
  return lines[0]


def test_processes_join_runtime(two_runs):
  logs = two_runs["train_logs"]
  assert "Process 0 of 2, 1 local and 2 global devices." in logs[0]
  assert "Process 1 of 2, 1 local and 2 global devices." in logs[1]
  assert "global batch 4 on 2 devices" in logs[0]


def test_two_processes_match_two_devices(two_runs):
  config = mvtec.get_config(CATEGORY)
  config.update_from_flattened_dict(OVERRIDES)
  multi, _ = saved_states.restore_latest(
      config, two_runs["multi_workdir"] / CATEGORY)
  single, _ = saved_states.restore_latest(
      config, two_runs["single_workdir"] / CATEGORY)

  assert int(multi.step) == NUM_STEPS
  assert int(single.step) == NUM_STEPS
  # pmean over 2 devices adds 2 numbers, which is exact in either order. So
  # the runs agree to the last bit unless XLA fuses the two programs
  # differently, and 1e-6 covers such float32 rounding over 4 steps. They
  # were equal on jaxlib 0.10.2 CPU.
  for name in ("params", "ema_params", "opt_state"):
    multi_leaves = jax.tree_util.tree_leaves_with_path(getattr(multi, name))
    single_leaves = jax.tree_util.tree_leaves(getattr(single, name))
    assert len(multi_leaves) == len(single_leaves)
    for (path, a), b in zip(multi_leaves, single_leaves):
      np.testing.assert_allclose(
          a, b, rtol=1e-6, atol=1e-8,
          err_msg=f"{name}{jax.tree_util.keystr(path)}")


def test_two_processes_write_workdir(two_runs):
  files = _relative_files(two_runs["multi_workdir"])
  for name in ("metrics.json", "results.md", f"{CATEGORY}/config.json",
               f"{CATEGORY}/train_stats.json", f"{CATEGORY}/threshold.json",
               f"{CATEGORY}/checkpoints/2", f"{CATEGORY}/checkpoints/4"):
    assert name in files
  assert [name for name in files if name.startswith(f"{CATEGORY}/panels/")]
  assert not [name for name in files if name.endswith(".tmp")]
  assert _relative_files(two_runs["single_workdir"]) == [
      f"{CATEGORY}/checkpoints/2", f"{CATEGORY}/checkpoints/4",
      f"{CATEGORY}/config.json", f"{CATEGORY}/train_stats.json"]


def test_processes_compute_same_metrics(two_runs):
  for logs in (two_runs["train_logs"], two_runs["evaluate_logs"]):
    assert _category_line(logs[0]) == _category_line(logs[1])


def test_evaluate_mode_restores_in_both(two_runs):
  workdir = two_runs["multi_workdir"]
  assert (workdir / "metrics.json").read_text() == two_runs["first_metrics"]
  assert (workdir / CATEGORY / "threshold.json").read_text() == (
      two_runs["first_threshold"])
  for log in two_runs["evaluate_logs"]:
    assert f"Restored checkpoint at step {NUM_STEPS}" in log


def test_only_process_zero_prints_table(two_runs):
  for logs in (two_runs["train_logs"], two_runs["evaluate_logs"]):
    assert "| Category | Image AUROC |" in logs[0]
    assert "| Category | Image AUROC |" not in logs[1]


@pytest.mark.parametrize("arguments, environ, expected", [
    ({}, {}, None),
    ({"coordinator_address": "10.0.0.2:8476", "num_processes": 4,
      "process_id": 3}, {},
     {"coordinator_address": "10.0.0.2:8476", "num_processes": 4,
      "process_id": 3}),
    ({"num_processes": 2, "process_id": 0},
     {"JAX_COORDINATOR_ADDRESS": "host-0:1234"},
     {"coordinator_address": "host-0:1234", "num_processes": 2,
      "process_id": 0}),
    ({"coordinator_address": "localhost:1234", "num_processes": 1,
      "process_id": 0}, {}, None),
    ({}, {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]",
          "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}, {}),
    ({}, {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1",
          "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"},
     None),
    ({}, {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1",
          "OMPI_COMM_WORLD_SIZE": "3"}, {}),
])
def test_initialize_arguments(arguments, environ, expected):
  assert distributed.initialize_arguments(
      **arguments, environ=environ, on_cloud_tpu=False) == expected


def test_initialize_arguments_cloud_tpu():
  assert distributed.initialize_arguments(
      environ={}, on_cloud_tpu=True) == {}
  assert distributed.initialize_arguments(
      environ={}, on_cloud_tpu=False) is None


@pytest.mark.parametrize("arguments, environ, message", [
    ({"num_processes": 2}, {},
     "--process_id and --coordinator_address missing"),
    ({"process_id": 0, "coordinator_address": "localhost:1234"}, {},
     "--num_processes missing"),
    ({"coordinator_address": "localhost:1234"}, {},
     "given without --num_processes and --process_id"),
    ({"coordinator_address": "localhost:1234", "num_processes": 2,
      "process_id": 2}, {}, "--process_id=2 is out of range.*0 to 1"),
    ({"coordinator_address": "localhost:1234", "num_processes": 2,
      "process_id": -1}, {}, "--process_id=-1 is out of range"),
    ({"coordinator_address": "localhost:1234", "num_processes": 0,
      "process_id": 0}, {}, "--num_processes=0 must be >= 1"),
    ({"coordinator_address": "localhost", "num_processes": 2,
      "process_id": 0}, {}, "'localhost' is not HOST:PORT"),
    ({"coordinator_address": "localhost:99999", "num_processes": 2,
      "process_id": 0}, {}, "'localhost:99999' is not HOST:PORT"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "host-0:1234"},
     "JAX_COORDINATOR_ADDRESS=host-0:1234 is set, but --num_processes"),
    ({}, {"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "two"},
     "OMPI_COMM_WORLD_SIZE='two' is not an integer"),
])
def test_initialize_arguments_invalid(arguments, environ, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize_arguments(**arguments, environ=environ,
                                     on_cloud_tpu=False)


def test_process_zero_failure_stops_all(tmp_path):
  address = f"localhost:{_free_port()}"
  workdir = tmp_path / "workdir"
  commands = [
      _command(workdir, tmp_path / "missing", tmp_path / "data",
               f"--coordinator_address={address}", "--num_processes=2",
               f"--process_id={index}")
      for index in range(2)]
  codes, logs = _run_processes(
      commands, [_environment(1)] * 2, tmp_path / "failed",
      expect_success=False)

  assert codes == [1, 1]
  assert "manual_dir" in logs[0]
  assert "does not exist" in logs[0]
  assert ("error: Process 0 failed while building the data sets; its output "
          "gives the error.") in logs[1]
  for log in logs:
    assert "Traceback" not in log
  assert not workdir.exists()


# Restores the checkpoints under argv[3] + "<process id>" in a 2-process run
# whose coordinator is argv[1] and whose process id is argv[2].
_RESTORE_SCRIPT = """
import sys
import numpy as np
from sprs_jax import checkpoint, distributed, train
import jax

distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
leaf = np.zeros(2, np.float32)
template = train.TrainState(step=np.int32(0), params={"w": leaf},
                            ema_params={"w": leaf}, opt_state=())
checkpointer = checkpoint.Checkpointer(sys.argv[3] + sys.argv[2])
try:
  checkpointer.restore(template, jax.random.key(0))
except ValueError as error:
  print(f"error: {error}")
  sys.exit(3)
"""


def test_restore_rejects_unshared_workdir(tmp_path):
  state = train.TrainState(
      step=np.int32(3), params={"w": np.ones(2, np.float32)},
      ema_params={"w": np.ones(2, np.float32)}, opt_state=())
  saver = checkpoint.Checkpointer(str(tmp_path / "checkpoints0"))
  saver.save(state, jax.random.key(1))
  saver.close()
  (tmp_path / "checkpoints1").mkdir()

  address = f"localhost:{_free_port()}"
  commands = [
      [sys.executable, "-c", _RESTORE_SCRIPT, address, str(index),
       str(tmp_path / "checkpoints")]
      for index in range(2)]
  codes, logs = _run_processes(
      commands, [_environment(1)] * 2, tmp_path / "restore",
      expect_success=False)

  assert codes == [3, 3]
  for log in logs:
    assert ("The processes read different values of the checkpoint step to "
            "restore") in log
    assert "[3, -1] (process 0 first)" in log


def test_cli_rejects_partial_flags(tmp_path):
  workdir = tmp_path / "workdir"
  completed = subprocess.run(
      [sys.executable, "run.py", "--config=configs/demo.py:gravel",
       f"--workdir={workdir}", "--num_processes=2", "--process_id=0"],
      cwd=REPO_ROOT, env=_environment(1), capture_output=True, text=True,
      timeout=RUN_TIMEOUT)

  assert completed.returncode == 1
  assert "Traceback" not in completed.stderr
  assert "error: --coordinator_address missing" in completed.stderr
  assert not workdir.exists()
