"""Trains and evaluates SPR anomaly detectors, and scores new photos.

Examples:
  python run.py --config=configs/demo.py
  python run.py --config=configs/demo.py:all --workdir=workdirs/demo_all
  python run.py --config=configs/mvtec.py:bottle \
      --config.data.manual_dir=/data/mvtec_anomaly_detection
  python run.py --mode=predict --workdir=workdirs/spr_textures \
      --images='photos/*.jpg'

Exit status: 0 on success, 1 on an error (printed as `error: ...`), and
128 + the signal number (143 for SIGTERM, 130 for SIGINT) when a signal
stopped training after a checkpoint. Rerunning the same command resumes.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from sprs_jax import cli
from sprs_jax import faults
from sprs_jax import distributed
from sprs_jax import run_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Config file and category, e.g. configs/mvtec.py:bottle or "
    "configs/demo.py:all. Fields are overridden with --config.a.b=value. "
    "Required by every mode except predict.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Folder for checkpoints, metrics.json, results.md and panels. Default: "
    "workdirs/<data set name>. Required by --mode=predict.")
_MODE = flags.DEFINE_enum(
    "mode", "train_and_evaluate", list(run_lib.MODES),
    "train: train only; evaluate: score the test split with the latest "
    "checkpoint in the workdir; train_and_evaluate: both; predict: score "
    "unlabeled photos (--images) with a trained and evaluated workdir.")
_IMAGES = flags.DEFINE_string(
    "images", None,
    "--mode=predict: the photos to score, as an image file, a folder or a "
    "quoted glob pattern such as 'photos/*.jpg'.")
_OUTPUT = flags.DEFINE_string(
    "output", None,
    "--mode=predict: folder for predictions.csv and heatmaps/. Default: "
    "<workdir>/<category>/predictions.")
_CATEGORY = flags.DEFINE_string(
    "category", None,
    "--mode=predict: the workdir's category to score with. Required when the "
    "workdir contains several categories.")
_PREDICT_ONLY_FLAGS = (_IMAGES, _OUTPUT, _CATEGORY)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process runs: HOST:PORT of process 0, where JAX's distributed "
    "runtime starts its coordinator. Default: the JAX_COORDINATOR_ADDRESS "
    "environment variable. Needs --num_processes and --process_id.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None,
    "Multi-process runs: the number of processes, one per host. Not needed "
    "on Cloud TPU VMs and in SLURM or Open MPI jobs, where JAX detects it.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None,
    "Multi-process runs: this process's index, from 0 to --num_processes - "
    "1. Process 0 writes the workdir's files.")
_DISTRIBUTED_FLAGS = (_COORDINATOR_ADDRESS, _NUM_PROCESSES, _PROCESS_ID)


def _check_flags(mode: str) -> None:
  """Raises ValueError if `mode` lacks a flag it needs or gets an unused one."""
  if mode == run_lib.PREDICT_MODE:
    if _CONFIG.value is not None:
      raise ValueError(
          "--config is not used by --mode=predict, which reads the config "
          "stored in <workdir>/<category>/config.json. Remove --config and "
          "its --config.* overrides.")
    for flag in _DISTRIBUTED_FLAGS:
      if flag.value is not None:
        raise ValueError(
            f"--{flag.name} is not used by --mode=predict, which scores on "
            "the local devices of one process. Remove it.")
    for flag, example in ((_WORKDIR, "--workdir=workdirs/spr_textures"),
                          (_IMAGES, "--images='photos/*.png'")):
      if not flag.value:
        raise ValueError(
            f"--{flag.name} is required by --mode=predict, for example "
            f"{example}.")
    return

  if _CONFIG.value is None:
    raise ValueError(
        f"--config is required by --mode={mode}, for example "
        "--config=configs/demo.py:gravel.")
  for flag in _PREDICT_ONLY_FLAGS:
    if flag.value is not None:
      hint = ""
      if flag is _CATEGORY:
        hint = (f" With --mode={mode}, the config selects the category, for "
                "example --config=configs/demo.py:gravel.")
      raise ValueError(
          f"--{flag.name} is only used by --mode=predict.{hint}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  cli.setup_logging()
  mode = _MODE.value
  try:
    _check_flags(mode)
    if mode == run_lib.PREDICT_MODE:
      output = _OUTPUT.value and os.path.expanduser(_OUTPUT.value)
      run_lib.predict(os.path.expanduser(_WORKDIR.value), _IMAGES.value,
                      output, _CATEGORY.value)
    else:
      distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value,
                             _PROCESS_ID.value)
      config = _CONFIG.value
      workdir = _WORKDIR.value or os.path.join("workdirs", config.data.name)
      run_lib.run(config, os.path.expanduser(workdir), mode)
  except faults.TrainingStopped as stopped:
    cli.exit_after_stop(stopped)
  # ConnectionError, from distributed.initialize, is an OSError.
  except (ValueError, OSError, FloatingPointError) as error:
    cli.exit_with_error(error)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
