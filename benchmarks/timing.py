"""Timing and memory helpers that both benchmark scripts use.

It imports nothing heavy, so the reference side's process measures PyTorch
alone.
"""

import resource
import sys
import time


def peak_rss_mib() -> float:
  """Returns the peak resident memory of this process so far, in MiB."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  # Linux reports KiB, macOS bytes.
  return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def time_calls(run_once, steps: int, warmup: int):
  """Returns (seconds of the first call, list of seconds of timed calls).

  The first call compiles (JAX) or warms caches (PyTorch); `warmup` more
  calls run untimed before the `steps` timed ones.
  """
  start = time.perf_counter()
  run_once()
  first = time.perf_counter() - start
  for _ in range(warmup):
    run_once()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run_once()
    times.append(time.perf_counter() - start)
  return first, times
