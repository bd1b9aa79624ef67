r"""Measures the host memory of evaluating a test split of N images.

Writes a synthetic MVTec AD category (train/good, test/good,
test/<defect>, ground_truth/<defect>/*_mask.png) of PNGs at the config's
image size, builds it with the project's MVTec AD TFDS builder, and runs
`sprs_jax.evaluate.evaluate` on its test split with freshly initialized
params, as `run.py --mode=evaluate` does after training. Scoring, metrics,
the threshold record and the panels run in one subprocess, whose peak
resident memory is measured per phase. It prints a table and, as the last
line, one JSON object.

Examples:
  python benchmarks/eval_memory.py --config.data.image_size=256
  python benchmarks/eval_memory.py --num_images=1000 \
      --config.data.image_size=256 \
      --config.model.widths='(32,64,128,256,256)'

Figures:
  peak_rss_mib             peak resident memory of the evaluating process
  <phase>_peak_rss_mib     peak resident memory during one phase: setup
                           (data source, params), scoring, metrics,
                           threshold, panels
  <phase>_seconds          wall time of the phase
  images_per_second        test images / scoring seconds (decoding included)
  kept_mib                 NumPy arrays that scoring returns for the later
                           phases, in MiB
"""

import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

# The repository root, so that `configs` and `sprs_jax` import from anywhere.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))

import sprs_jax  # noqa: E402  (sets XLA flags before JAX starts)
from sprs_jax import cli  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import timing  # noqa: E402  (benchmarks/timing.py, next to this script)

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_ROOT / "configs" / "mvtec.py"),
    "Config file and argument, e.g. configs/mvtec.py. Fields are overridden "
    "with --config.a.b=value, e.g. --config.data.image_size=256. The data "
    "set fields are replaced by the synthetic MVTec AD category.")
_NUM_IMAGES = flags.DEFINE_integer(
    "num_images", 1000, "Test images of the synthetic split.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "",
    "Folder for the synthetic PNGs and their TFDS copy, kept and reused by "
    "later runs with the same --num_images and image size. Default: a "
    "temporary folder, removed at the end.")
_PART = flags.DEFINE_enum(
    "part", "all", ["all", "evaluate"],
    "all: write and build the data set, then evaluate in a subprocess; "
    "evaluate: evaluate the built data set of --data_dir in this process.")

# Share of normal test images, and the defect folders the others fill in turn.
_NORMAL_SHARE = 0.25
_DEFECT_TYPES = ("crack", "hole", "scratch")
# Training images, which the builder requires and evaluation never reads.
_NUM_TRAIN_IMAGES = 2
_CATEGORY = "bottle"

_PHASES = ("setup", "scoring", "metrics", "threshold", "panels")


def _split_dirs(data_dir: pathlib.Path, num_images: int, size: int):
  """Returns (manual_dir, tfds_dir) of the split with these sizes."""
  split_dir = data_dir / f"synthetic_{num_images}_images_{size}px"
  return split_dir / "manual", split_dir / "tfds"


def _synthetic_image(rng: np.random.Generator, size: int) -> np.ndarray:
  """Returns uint8 [size, size, 3]: smooth random shading plus pixel noise."""
  coarse = rng.integers(40, 216, (8, 8, 3), dtype=np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize(
      (size, size), Image.Resampling.BILINEAR), np.int16)
  noise = rng.integers(-12, 13, smooth.shape, dtype=np.int16)
  return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def _defect_mask(rng: np.random.Generator, size: int) -> np.ndarray:
  """Returns a uint8 0/255 [size, size] mask of one random ellipse.

  Its half-axes are 2 % to 12 % of the side, so a defect covers about 0.1 %
  to 5 % of the image, and at least one pixel.
  """
  rows, cols = np.mgrid[0:size, 0:size]
  center = rng.uniform(0.15, 0.85, 2) * size
  half_axes = rng.uniform(0.02, 0.12, 2) * size
  inside = (((rows - center[0]) / half_axes[0]) ** 2
            + ((cols - center[1]) / half_axes[1]) ** 2) <= 1.0
  # The pixel under the center keeps tiny images from getting an empty mask.
  inside[int(center[0]), int(center[1])] = True
  return np.where(inside, np.uint8(255), np.uint8(0))


def write_split(manual_dir: pathlib.Path, num_images: int, size: int) -> None:
  """Writes one MVTec AD category of PNGs under `manual_dir`.

  A quarter of the `num_images` test images (at least one) is normal, and
  the others fill the defect folders in turn, each with a mask whose ellipse
  is painted dark in its image.
  """
  rng = np.random.default_rng(0)
  category_dir = manual_dir / _CATEGORY
  for index in range(_NUM_TRAIN_IMAGES):
    path = category_dir / "train" / "good" / f"{index:04d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_synthetic_image(rng, size)).save(path)

  num_normal = max(1, round(num_images * _NORMAL_SHARE))
  for index in range(num_images):
    image = _synthetic_image(rng, size)
    if index < num_normal:
      defect_type = "good"
    else:
      defect_type = _DEFECT_TYPES[(index - num_normal) % len(_DEFECT_TYPES)]
      mask = _defect_mask(rng, size)
      image[mask > 0] //= 3
      mask_path = (category_dir / "ground_truth" / defect_type
                   / f"{index:04d}_mask.png")
      mask_path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(mask).save(mask_path)

    path = category_dir / "test" / defect_type / f"{index:04d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def _use_synthetic_data(config, manual_dir, tfds_dir) -> None:
  config.data.name = "mvtec_ad"
  config.data.category = _CATEGORY
  config.data.manual_dir = str(manual_dir)
  config.data.data_dir = str(tfds_dir)


def _read_status_kib(field: str) -> int | None:
  """Returns a `VmHWM`-like field of /proc/self/status in KiB, or None."""
  try:
    with open("/proc/self/status") as status:
      for line in status:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


class PhaseMemory:
  """Peak resident memory and wall time of consecutive phases of a process.

  Each phase's peak is VmHWM of /proc/self/status when the phase ends, after
  VmHWM was reset to the current RSS when it began (writing 5 to
  /proc/self/clear_refs, Linux 4.0 or newer). Where the reset is not
  possible, every phase reports the process's peak so far (ru_maxrss), which
  is an upper bound.
  """

  def __init__(self):
    self.peaks_mib = {}
    self.seconds = {}
    self.method = "VmHWM reset per phase"
    self._phase = None
    self._start = 0.0

  def _reset_peak(self) -> None:
    try:
      with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    except OSError:
      self.method = "ru_maxrss so far (no per-phase reset)"

  def _phase_peak_mib(self) -> float:
    high_water = _read_status_kib("VmHWM")
    if self.method.startswith("VmHWM") and high_water is not None:
      return high_water / 1024.0
    return timing.peak_rss_mib()

  def begin(self, phase: str) -> None:
    """Ends the running phase, if any, and starts `phase`."""
    self.end()
    self._phase = phase
    self._start = time.perf_counter()
    self._reset_peak()

  def end(self) -> None:
    """Records the running phase's peak and time; no-op between phases."""
    if self._phase is None:
      return
    self.seconds[self._phase] = time.perf_counter() - self._start
    # A phase that runs twice (never in evaluate) keeps its larger peak.
    self.peaks_mib[self._phase] = max(
        self.peaks_mib.get(self._phase, 0.0), self._phase_peak_mib())
    self._phase = None


def _marking(memory: PhaseMemory, phase: str, function, on_result=None):
  """Wraps `function` so that calling it starts `phase`."""
  def wrapper(*args, **kwargs):
    memory.begin(phase)
    result = function(*args, **kwargs)
    if on_result is not None:
      on_result(result)
    return result
  return wrapper


def _array_mib(outputs: dict) -> dict:
  """Returns {key: MiB} of the NumPy arrays in score_split's outputs.

  A dict of arrays (the display images of the panel candidates) counts as
  the sum of its arrays.
  """
  sizes = {}
  for key, value in outputs.items():
    if isinstance(value, dict):
      value = list(value.values())
    if isinstance(value, np.ndarray):
      sizes[key] = value.nbytes / 2**20
    elif value and all(isinstance(item, np.ndarray) for item in value):
      sizes[key] = sum(item.nbytes for item in value) / 2**20
  return sizes


def measure_evaluate(config, num_images: int, data_dir: pathlib.Path) -> dict:
  """Runs evaluate() on the built synthetic split and returns the figures."""
  import jax
  import jax.numpy as jnp
  from sprs_jax import evaluate
  from sprs_jax import input_pipeline
  from sprs_jax import metrics as metrics_lib
  from sprs_jax import model as model_lib
  from sprs_jax import threshold as threshold_lib

  memory = PhaseMemory()
  start_rss_mib = (_read_status_kib("VmRSS") or 0) / 1024.0
  memory.begin("setup")

  size = config.data.image_size
  manual_dir, tfds_dir = _split_dirs(data_dir, num_images, size)
  _use_synthetic_data(config, manual_dir, tfds_dir)
  source = input_pipeline.load_split(config.data, "test")
  if len(source) != num_images:
    raise ValueError(
        f"{tfds_dir} contains {len(source)} test images, not --num_images="
        f"{num_images}. Delete {tfds_dir.parent} to rebuild it.")

  # Params only, because evaluation needs no optimizer state.
  model = model_lib.create_model(config.model, config.sde.sigma_max)
  params = jax.jit(model.init)(
      jax.random.key(config.seed), jnp.zeros((1, size, size, 3)),
      jnp.ones((1,)))["params"]
  jax.block_until_ready(params)

  # evaluate() looks these functions up at call time, so each wrapper marks
  # where its phase begins.
  kept = {}
  patches = [
      (evaluate, "score_split", "scoring", lambda out: kept.update(
          _array_mib(out))),
      (metrics_lib, "compute_metrics", "metrics", None),
      (threshold_lib, "make_record", "threshold", None),
      (evaluate, "select_panel_indices", "panels", None),
  ]
  originals = [(module, name, getattr(module, name))
               for module, name, _, _ in patches]
  for module, name, phase, on_result in patches:
    setattr(module, name,
            _marking(memory, phase, getattr(module, name), on_result))

  category_dir = tempfile.mkdtemp(prefix="eval_memory_")
  try:
    results = evaluate.evaluate(config, category_dir, params, source,
                                checkpoint_step=0)
    memory.end()
    num_panels = len(os.listdir(os.path.join(category_dir, "panels")))
  finally:
    for module, name, function in originals:
      setattr(module, name, function)
    shutil.rmtree(category_dir, ignore_errors=True)

  figures = {
      "num_test_images": results["num_test_images"],
      "num_panels": num_panels,
      # Resetting VmHWM resets ru_maxrss too, so take the largest phase.
      "peak_rss_mib": max([timing.peak_rss_mib()]
                          + list(memory.peaks_mib.values())),
      "start_rss_mib": start_rss_mib,
      "phase_peak_method": memory.method,
      "images_per_second": num_images / memory.seconds["scoring"],
      "kept_mib": sum(kept.values()),
      "kept_mib_by_array": kept,
      "metrics": {key: results[key] for key in (
          "image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_threshold")},
  }
  for phase in _PHASES:
    figures[f"{phase}_peak_rss_mib"] = memory.peaks_mib[phase]
    figures[f"{phase}_seconds"] = memory.seconds[phase]
  return figures


def describe_setup(config, num_images: int) -> dict:
  return {
      "num_images": num_images,
      "cpu_cores": os.cpu_count(),
      "machine": platform.machine(),
      "image_size": config.data.image_size,
      "heatmap_size": config.eval.heatmap_size,
      "widths": list(config.model.widths),
      "dtype": config.model.dtype,
      "eval_batch_size": config.eval.batch_size,
      "noise_levels": list(config.eval.noise_levels),
      "num_draws": config.eval.num_draws,
      "filter_size": config.eval.filter_size,
      "num_panels_requested": config.eval.num_panels,
  }


def build_split(config, num_images: int, data_dir: pathlib.Path) -> dict:
  """Writes the PNGs and builds their TFDS copy, unless they exist already."""
  from sprs_jax import input_pipeline

  size = config.data.image_size
  manual_dir, tfds_dir = _split_dirs(data_dir, num_images, size)
  figures = {"write_seconds": 0.0}
  if not manual_dir.exists():
    start = time.perf_counter()
    partial_dir = manual_dir.with_name("manual.partial")
    shutil.rmtree(partial_dir, ignore_errors=True)
    write_split(partial_dir, num_images, size)
    partial_dir.rename(manual_dir)
    figures["write_seconds"] = time.perf_counter() - start

  start = time.perf_counter()
  _use_synthetic_data(config, manual_dir, tfds_dir)
  input_pipeline.prepare(config.data)
  figures["build_seconds"] = time.perf_counter() - start
  return figures


def _run_evaluate_in_subprocess(data_dir: pathlib.Path) -> dict:
  """Reruns this script with --part=evaluate; returns its JSON."""
  args = [sys.executable, __file__] + [
      arg for arg in sys.argv[1:]
      if not arg.startswith(("--part", "--data_dir"))] + [
          "--part=evaluate", f"--data_dir={data_dir}"]
  completed = subprocess.run(args, capture_output=True, text=True,
                             check=False)
  if completed.returncode:
    sys.stderr.write(completed.stderr)
    raise SystemExit(f"error: the evaluate part failed (exit code "
                     f"{completed.returncode}); its output is above.")
  return json.loads(completed.stdout.strip().splitlines()[-1])


def format_table(result: dict) -> str:
  lines = [f"{'phase':<12}{'peak RSS MiB':>14}{'seconds':>10}"]
  for phase in _PHASES:
    lines.append(f"{phase:<12}{result[f'{phase}_peak_rss_mib']:>14.0f}"
                 f"{result[f'{phase}_seconds']:>10.1f}")
  lines += [
      f"{'process peak RSS MiB':<26}{result['peak_rss_mib']:.0f}",
      f"{'scoring images/s':<26}{result['images_per_second']:.3f}",
      f"{'kept arrays MiB':<26}{result['kept_mib']:.1f}",
  ]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  num_images = _NUM_IMAGES.value
  if num_images < 2:
    raise app.UsageError(
        f"--num_images={num_images} must be >= 2, so that the split has "
        "normal and anomalous images.")

  if _PART.value == "evaluate":
    if not _DATA_DIR.value:
      raise app.UsageError("--part=evaluate needs --data_dir.")
    try:
      result = measure_evaluate(config, num_images,
                                pathlib.Path(_DATA_DIR.value))
    except ValueError as error:
      cli.exit_with_error(error)
    print(json.dumps(result, sort_keys=True))
    return

  data_dir = _DATA_DIR.value or tempfile.mkdtemp(prefix="eval_memory_data_")
  data_dir = pathlib.Path(data_dir).expanduser().resolve()
  try:
    result = describe_setup(config, num_images)
    try:
      result.update(build_split(config, num_images, data_dir))
    except ValueError as error:
      cli.exit_with_error(error)
    result["data_source"] = "MVTec AD builder (array_record)"
    result.update(_run_evaluate_in_subprocess(data_dir))
  finally:
    if not _DATA_DIR.value:
      shutil.rmtree(data_dir, ignore_errors=True)
  print(format_table(result))
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
