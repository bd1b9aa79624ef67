"""Trains and evaluates SPR anomaly detectors.

Examples:
  python run.py --config=configs/demo.py
  python run.py --config=configs/demo.py:all --workdir=workdirs/demo_all
  python run.py --config=configs/mvtec.py:bottle \
      --config.data.manual_dir=/data/mvtec_anomaly_detection
"""

import logging as pylogging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sprs_jax import run_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Config file and category, e.g. configs/mvtec.py:bottle or "
    "configs/demo.py:all. Fields are overridden with --config.a.b=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Folder for checkpoints, metrics.json, results.md and panels. Default: "
    "workdirs/<data set name>.")
_MODE = flags.DEFINE_enum(
    "mode", "train_and_evaluate", list(run_lib.MODES),
    "train: train only; evaluate: score the test split with the latest "
    "checkpoint in the workdir; train_and_evaluate: both.")
flags.mark_flags_as_required(["config"])


class _QuietLibraryInfo(pylogging.Filter):
  """Drops INFO records of Orbax and TFDS, which log every file operation."""

  _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorflow_datasets{os.sep}")

  def filter(self, record):
    noisy = any(part in record.pathname for part in self._NOISY)
    return record.levelno > pylogging.INFO or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraryInfo())
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("workdirs", config.data.name)
  try:
    run_lib.run(config, workdir, _MODE.value)
  except (ValueError, OSError, FloatingPointError) as error:
    # User errors (bad data, config or workdir) end with their message alone;
    # the traceback stays available at --verbosity=1.
    logging.vlog(1, "Traceback of the error below:", exc_info=True)
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
