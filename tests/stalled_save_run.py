"""Runs run.py with one checkpoint save stalled, so a test can kill it mid-save.

Orbax writes a checkpoint into `<step>.orbax-checkpoint-tmp...` and renames it
to `<step>` as the last step of the save. Before the rename of save number
$STALL_SAVE_NUMBER (1-based), this script prints STALL_MARKER and the
temporary folder to stderr and sleeps for an hour, so the step folder is
never renamed. The arguments are those of
run.py.
"""

import asyncio
import os
import pathlib
import runpy
import sys

from orbax.checkpoint._src.path import async_path

STALL_MARKER = "Stalling the rename of"
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_original_rename = async_path.rename
_renames = 0


async def _stalled_rename(source, target):
  global _renames
  # Items inside a checkpoint are renamed from temporary names too; only
  # step folders count.
  if target.name.isdigit():
    _renames += 1
    if _renames == int(os.environ["STALL_SAVE_NUMBER"]):
      print(f"{STALL_MARKER} {source}", file=sys.stderr, flush=True)
      await asyncio.sleep(3600)
  return await _original_rename(source, target)


if __name__ == "__main__":
  # atomicity.py looks the function up on the module at every save.
  async_path.rename = _stalled_rename
  sys.path.insert(0, str(_REPO_ROOT))
  sys.argv[0] = str(_REPO_ROOT / "run.py")
  runpy.run_path(str(_REPO_ROOT / "run.py"), run_name="__main__")
