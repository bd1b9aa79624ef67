"""Command-line plumbing that run.py and the converter share.

Logging that drops the per-file INFO records of Orbax and TFDS, flag parsing
that reports an invalid flag or --config override as one error line, and
the exit path of user errors.
"""

import logging as pylogging
import os
import sys

from absl import flags
from absl import logging


class QuietLibraryInfo(pylogging.Filter):
  """Drops INFO records of Orbax and TFDS, which log every file operation."""

  _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorflow_datasets{os.sep}")

  def filter(self, record):
    noisy = any(part in record.pathname for part in self._NOISY)
    return record.levelno > pylogging.INFO or not noisy


def setup_logging() -> None:
  """Logs at INFO level, without the file-by-file records of the libraries."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(QuietLibraryInfo())


def exit_with_error(error: Exception) -> None:
  """Prints `error: <message>` and exits 1; --verbosity=1 logs the traceback.

  For user errors (bad data, config, files or workdir), whose message
  states the fix.
  """
  logging.vlog(1, "Traceback of the error below:", exc_info=True)
  print(f"error: {error}", file=sys.stderr)
  sys.exit(1)


def exit_after_stop(stopped) -> None:
  """Prints why training stopped and exits with stopped.exit_status.

  `stopped` is a faults.TrainingStopped, whose status is 128 + the signal
  number (143 for SIGTERM, 130 for SIGINT), as a shell reports a process
  that the signal ended.
  """
  print(str(stopped), file=sys.stderr)
  sys.exit(stopped.exit_status)


def parse_flags(argv):
  """Parses the flags; a --config.* override of no field is a user error.

  ml_collections raises AttributeError or KeyError while it applies such an
  override, which absl would show as a traceback.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    print(f"error: {error}\nPass --helpfull to list the flags.",
          file=sys.stderr)
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    detail = " ".join(
        str(error).replace("\\n", " ").replace("\\'", "").split())
    overrides = [arg.split("=")[0] for arg in argv[1:]
                 if arg.startswith("--config.")]
    print(f"error: invalid --config override ({', '.join(overrides)}): "
          f"{detail.strip(chr(34) + chr(39))}\nconfigs/base.py and README.md "
          "(Configuration) list the fields.", file=sys.stderr)
  sys.exit(1)
