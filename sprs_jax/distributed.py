"""Multi-process (multi-host) runs on JAX's distributed runtime.

A run is multi-process when the --coordinator_address, --num_processes and
--process_id flags name more than one process, when a SLURM or Open MPI job
has more than one task, or on a Cloud TPU VM. Every process then calls
`jax.distributed.initialize` before JAX starts its backend, and training
`pmap`s over the devices of all processes. A single-process run never calls
it.

Process 0 alone writes the workdir's files (metrics, results, configs,
statistics, thresholds, panels). Checkpoints are saved and restored by every
process through Orbax, which writes host NumPy arrays from process 0 only and
waits at barriers, so every process must see the same workdir (a shared file
system).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

# The environment variable that jax.distributed.initialize reads when it gets
# no coordinator address.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"

# Variables by which JAX 0.10 detects a SLURM or Open MPI job and reads its
# process count (jax/_src/clusters/slurm_cluster.py and ompi_cluster.py).
_SLURM_ENV = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
              "SLURM_PROCID", "SLURM_LOCALID")
_SLURM_COUNT_ENV = "SLURM_NTASKS"
_OMPI_ENV = "OMPI_MCA_orte_hnp_uri"
_OMPI_COUNT_ENV = "OMPI_COMM_WORLD_SIZE"

_FLAG_HINT = ("Pass all three of --coordinator_address=HOST:PORT (the address "
              "of process 0), --num_processes=N and --process_id=I (0 to "
              "N - 1), the same address and N in every process.")


def _running_on_cloud_tpu() -> bool:
  """Returns whether JAX found TPU chips of a Cloud TPU VM when imported.

  The check reads PCI devices and sends no request to the metadata server.
  """
  # NOTE: a private JAX module (jax 0.10); if it moves, Cloud TPU runs need
  # the three flags.
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _cluster_process_count(environ) -> int | None:
  """Returns the task count of a SLURM or Open MPI job that JAX detects."""
  if all(name in environ for name in _SLURM_ENV):
    return _parse_count(environ[_SLURM_COUNT_ENV], _SLURM_COUNT_ENV)
  if _OMPI_ENV in environ and _OMPI_COUNT_ENV in environ:
    return _parse_count(environ[_OMPI_COUNT_ENV], _OMPI_COUNT_ENV)
  return None


def _parse_count(value: str, name: str) -> int:
  try:
    return int(value)
  except ValueError as error:
    raise ValueError(
        f"The environment variable {name}={value!r} is not an integer process "
        "count.") from error


def _check_address(address: str, source: str) -> None:
  """Raises ValueError unless address is HOST:PORT with a port in 1..65535."""
  host, separator, port = address.rpartition(":")
  if not separator or not host or not port.isdigit() or not (
      1 <= int(port) <= 65535):
    raise ValueError(
        f"{source}={address!r} is not HOST:PORT with a port from 1 to 65535, "
        "for example 10.0.0.2:8476.")


def initialize_arguments(coordinator_address: str | None = None,
                         num_processes: int | None = None,
                         process_id: int | None = None,
                         environ=os.environ,
                         on_cloud_tpu: bool | None = None) -> dict | None:
  """Returns the keyword arguments of jax.distributed.initialize, or None.

  None means a single-process run, which must not call it. {} means that
  JAX detects every value itself (Cloud TPU, SLURM, Open MPI).

  Args:
    coordinator_address: --coordinator_address, HOST:PORT of process 0. When
      None, the JAX_COORDINATOR_ADDRESS environment variable is used.
    num_processes: --num_processes, the number of processes.
    process_id: --process_id, this process's index in 0..num_processes - 1.
    environ: the environment variables to read.
    on_cloud_tpu: whether this is a Cloud TPU VM; None reads it from JAX.

  Raises:
    ValueError: if only some of the values are given, or one is invalid.
  """
  env_address = environ.get(COORDINATOR_ENV) or None
  if coordinator_address is not None:
    _check_address(coordinator_address, "--coordinator_address")
  elif env_address is not None:
    _check_address(env_address, COORDINATOR_ENV)
  address = coordinator_address or env_address
  cluster_count = _cluster_process_count(environ)

  if num_processes is None and process_id is None:
    if coordinator_address is not None:
      raise ValueError(
          f"--coordinator_address={coordinator_address} is given without "
          f"--num_processes and --process_id. {_FLAG_HINT}")
    if cluster_count is not None:
      return {} if cluster_count > 1 else None
    if env_address is not None:
      raise ValueError(
          f"The environment variable {COORDINATOR_ENV}={env_address} is set, "
          f"but --num_processes and --process_id are not. {_FLAG_HINT} For a "
          f"single-process run, unset {COORDINATOR_ENV}.")
    if on_cloud_tpu is None:
      on_cloud_tpu = _running_on_cloud_tpu()
    # NOTE: a single-host Cloud TPU VM also initializes, as a runtime of one
    # process, because only the metadata server stores the host count.
    return {} if on_cloud_tpu else None

  missing = [name for name, value in (
      ("--num_processes", num_processes), ("--process_id", process_id),
      ("--coordinator_address", address)) if value is None]
  if missing:
    raise ValueError(f"{' and '.join(missing)} missing. {_FLAG_HINT}")
  if num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be >= 1.")
  if not 0 <= process_id < num_processes:
    raise ValueError(
        f"--process_id={process_id} is out of range: with --num_processes="
        f"{num_processes} it must be from 0 to {num_processes - 1}.")
  if num_processes == 1:
    return None
  return {"coordinator_address": address, "num_processes": num_processes,
          "process_id": process_id}


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins JAX's distributed runtime when the run is multi-process.

  Must run before anything starts JAX's backend. Returns whether the runtime
  was initialized; a single-process run returns False and changes nothing.

  Raises:
    ValueError: from `initialize_arguments`.
    ConnectionError: if the runtime fails to start, for example when the
      coordinator is not reached within JAX's 300 s timeout.
  """
  arguments = initialize_arguments(coordinator_address, num_processes,
                                   process_id)
  if arguments is None:
    return False
  described = (", ".join(f"{key}={value}" for key, value in arguments.items())
               or "values detected by JAX")
  logging.info("Joining the JAX distributed runtime (%s).", described)
  try:
    jax.distributed.initialize(**arguments)
  except (RuntimeError, ValueError) as error:
    raise ConnectionError(
        f"Failed to join the JAX distributed runtime ({described}): {error}. "
        "Check that process 0 runs and that every process got the same "
        "--coordinator_address and --num_processes.") from error
  logging.info("Process %d of %d, %d local and %d global devices.",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def is_primary() -> bool:
  """Returns whether this process writes the workdir's files (process 0)."""
  return jax.process_index() == 0


def check_same_in_all_processes(value: int, description: str) -> None:
  """Raises ValueError in every process unless all of them pass the same value.

  For values read from the workdir, such as the step of the latest
  checkpoint, which differ when the hosts do not share the workdir.
  """
  if jax.process_count() == 1:
    return
  values = multihost_utils.process_allgather(np.int32(value)).tolist()
  if len(set(values)) > 1:
    raise ValueError(
        f"The processes read different values of the {description}: "
        f"{values} (process 0 first). Every process must see the same "
        "workdir: put it on a file system that all hosts share.")


def primary_first(function, description: str):
  """Calls function() in process 0, then in the other processes.

  For steps that may write shared files, such as building a data set: the
  other processes reuse what process 0 wrote. Returns function's result.

  Raises:
    ValueError: in the other processes if function raised in process 0,
      which raises that error itself. `description` names the step.
  """
  if jax.process_count() == 1:
    return function()

  result, error = None, None
  if is_primary():
    try:
      result = function()
    except Exception as caught:  # pylint: disable=broad-exception-caught
      error = caught
  # The outcome of process 0 doubles as the barrier of the other processes.
  failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
  if error is not None:
    raise error
  if failed:
    raise ValueError(
        f"Process 0 failed while {description}; its output gives the error.")
  if not is_primary():
    result = function()
  return result


def replicate(tree, axis_name: str):
  """Copies every leaf of tree to each local device, for jax.pmap inputs.

  Returns arrays [local_device_count, ...] placed as jax.pmap(...,
  axis_name=axis_name) places its outputs (a NamedSharding over the local
  devices in JAX 0.10), so a step that takes its own outputs back compiles
  once. flax.jax_utils.replicate places them otherwise, and such a step
  compiled a second time at its second call.
  """
  devices = jax.local_devices()
  sharding = NamedSharding(Mesh(np.array(devices), (axis_name,)),
                           PartitionSpec(axis_name))
  return jax.tree_util.tree_map(
      lambda leaf: jax.device_put(jnp.stack([leaf] * len(devices)), sharding),
      tree)
