r"""Measures training and scoring throughput of a config on this machine.

Runs the same functions that training and evaluation run (the pmapped train
step with buffer donation, and the pmapped scorer with every noise level,
draw, heat-map resize and mean filter) on random images, so no data set is
needed. Each part runs in its own subprocess, so that its peak memory is
measured apart. It prints a table and, as the last line, one JSON object.

Examples:
  python benchmarks/throughput.py
  python benchmarks/throughput.py --config=configs/mvtec.py:bottle \
      --config.data.image_size=64 --steps=10
  python benchmarks/throughput.py --config.model.dtype=bfloat16

Figures:
  train_images_per_second   global batch x steps / wall time of the steps
  score_images_per_second   images scored per second, heat maps on the host
  *_compile_seconds         first call minus the median timed call
  *_peak_rss_mib            peak resident memory of the part's process
  *_peak_device_mib         peak accelerator memory (GPU/TPU only)
  train_tflops_per_second   XLA's FLOP count of one step / median step time
  train_mfu                 the above / --peak_tflops (when known)
"""

import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys

# The repository root, so that `configs` and `sprs_jax` import from anywhere.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))

import sprs_jax  # noqa: E402  (sets XLA flags before JAX starts)
from sprs_jax import cli  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import timing  # noqa: E402  (benchmarks/timing.py, next to this script)

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_ROOT / "configs" / "mvtec.py"),
    "Config file and argument, e.g. configs/mvtec.py:bottle. Fields are "
    "overridden with --config.a.b=value, e.g. --config.data.image_size=64.")
_PART = flags.DEFINE_enum(
    "part", "all", ["all", "train", "score"],
    "all: train and score, each in a subprocess; train or score: that part "
    "in this process.")
_STEPS = flags.DEFINE_integer(
    "steps", 5, "Timed repetitions of each part, after warm-up.")
_WARMUP = flags.DEFINE_integer(
    "warmup", 2, "Untimed repetitions after the first (compiling) call.")
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops", None,
    "Peak dense TFLOP/s of one device for the config's dtype, for MFU. "
    "Default: known GPUs and TPUs; none on CPU.")

# Peak dense TFLOP/s per device from the vendors' data sheets, by
# (device_kind prefix, dtype).
_PEAK_TFLOPS_BY_KIND = {
    ("NVIDIA H100", "bfloat16"): 989.0,
    ("NVIDIA H100", "float32"): 67.0,
    ("NVIDIA H200", "bfloat16"): 989.0,
    ("NVIDIA H200", "float32"): 67.0,
    ("NVIDIA A100", "bfloat16"): 312.0,
    ("NVIDIA A100", "float32"): 19.5,
    ("TPU v4", "bfloat16"): 275.0,
    ("TPU v5 lite", "bfloat16"): 197.0,
    ("TPU v5e", "bfloat16"): 197.0,
    ("TPU v5p", "bfloat16"): 459.0,
    ("TPU v6 lite", "bfloat16"): 918.0,
}


def _peak_device_mib(jax):
  stats = [device.memory_stats() or {} for device in jax.local_devices()]
  peaks = [s.get("peak_bytes_in_use") for s in stats]
  if not peaks or None in peaks:
    return None
  return max(peaks) / 2**20


def _summary(prefix, batch, first, times) -> dict:
  median = statistics.median(times)
  return {
      f"{prefix}_images_per_second": batch / median,
      f"{prefix}_images_per_second_best": batch / min(times),
      f"{prefix}_step_seconds_median": median,
      f"{prefix}_compile_seconds": max(first - median, 0.0),
  }


def measure_train(config, steps: int, warmup: int) -> dict:
  """Times the pmapped train step of sprs_jax.train on random images."""
  import flax
  import jax
  import jax.numpy as jnp
  import numpy as np
  from sprs_jax import losses
  from sprs_jax import model as model_lib
  from sprs_jax import train

  num_devices = jax.local_device_count()
  batch = config.training.batch_size
  size = config.data.image_size
  if batch % num_devices:
    raise ValueError(f"--config.training.batch_size={batch} must be "
                     f"divisible by the {num_devices} local devices.")
  model = model_lib.create_model(config.model, config.sde.sigma_max)
  steps_per_epoch = 1000
  learning_rate_fn = train.learning_rate_schedule(config.training,
                                                  steps_per_epoch)
  optimizer = train.create_optimizer(config.training, steps_per_epoch)
  state = train.create_train_state(jax.random.key(config.seed), model,
                                   optimizer, size)
  num_params = model_lib.count_params(state.params)

  # FLOPs of one step on the whole batch, from XLA's cost model.
  def loss_on_batch(params, images, t, z):
    score_fn = lambda x, times: model.apply({"params": params}, x, times)
    return losses.dsm_loss(score_fn, images, t, z, config.sde.sigma_max)

  shapes = (jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.float32),
            jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32))
  cost = jax.jit(jax.value_and_grad(loss_on_batch)).lower(
      state.params, *shapes).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = float((cost or {}).get("flops", 0.0)) or None

  train_step = jax.pmap(
      train.make_train_step(model, optimizer, learning_rate_fn,
                            config.training, config.sde.sigma_max),
      axis_name="batch", donate_argnums=(0,))
  state = flax.jax_utils.replicate(state)
  rng = flax.jax_utils.replicate(jax.random.key(config.seed + 1))
  images = np.random.default_rng(0).uniform(
      -1.0, 1.0, (num_devices, batch // num_devices, size, size, 3)).astype(
          np.float32)
  holder = {"state": state}

  def run_once():
    holder["state"], metrics = train_step(holder["state"], images, rng)
    jax.block_until_ready(metrics)

  first, times = timing.time_calls(run_once, steps, warmup)
  result = _summary("train", batch, first, times)
  result["num_params"] = num_params
  if flops:
    result["train_gflops_per_step"] = flops / 1e9
    result["train_tflops_per_second"] = flops / result[
        "train_step_seconds_median"] / 1e12
  result["train_peak_rss_mib"] = timing.peak_rss_mib()
  result["train_peak_device_mib"] = _peak_device_mib(jax)
  return result


def measure_score(config, steps: int, warmup: int) -> dict:
  """Times evaluation's scorer on random images, results back on the host."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from sprs_jax import evaluate
  from sprs_jax import model as model_lib

  batch = config.eval.batch_size
  size = config.data.image_size
  num_devices = jax.local_device_count()
  if batch % num_devices:
    raise ValueError(f"--config.eval.batch_size={batch} must be divisible "
                     f"by the {num_devices} local devices.")
  model = model_lib.create_model(config.model, config.sde.sigma_max)
  # Params only, because scoring needs no optimizer state.
  params = jax.jit(model.init)(
      jax.random.key(config.seed), jnp.zeros((1, size, size, 3)),
      jnp.ones((1,)))["params"]
  score = evaluate.make_device_scorer(config, params)
  pixels = np.random.default_rng(0).integers(
      0, 256, (batch, size, size, 3), dtype=np.uint8)
  images = pixels.astype(np.float32) / 127.5 - 1.0

  def run_once():
    keys = evaluate.image_noise_keys(config.seed, pixels)
    heatmaps, scores = score(images, keys)
    assert heatmaps.shape[0] == scores.shape[0] == batch

  first, times = timing.time_calls(run_once, steps, warmup)
  result = _summary("score", batch, first, times)
  result["score_peak_rss_mib"] = timing.peak_rss_mib()
  result["score_peak_device_mib"] = _peak_device_mib(jax)
  return result


def _peak_tflops(device_kind: str, dtype: str):
  if _PEAK_TFLOPS.value:
    return _PEAK_TFLOPS.value
  for (prefix, kind_dtype), tflops in _PEAK_TFLOPS_BY_KIND.items():
    if device_kind.startswith(prefix) and kind_dtype == dtype:
      return tflops
  return None


def describe_setup(config) -> dict:
  import jax
  device = jax.local_devices()[0]
  return {
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "local_devices": jax.local_device_count(),
      "cpu_cores": os.cpu_count(),
      "machine": platform.machine(),
      "jax": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "image_size": config.data.image_size,
      "train_batch_size": config.training.batch_size,
      "eval_batch_size": config.eval.batch_size,
      "widths": list(config.model.widths),
      "dtype": config.model.dtype,
      "noise_levels": list(config.eval.noise_levels),
      "num_draws": config.eval.num_draws,
      "heatmap_size": config.eval.heatmap_size,
      "filter_size": config.eval.filter_size,
  }


def _run_part_in_subprocess(part: str) -> dict:
  """Reruns this script with its flags and --part=part; returns its JSON."""
  args = [sys.executable, __file__] + [
      arg for arg in sys.argv[1:] if not arg.startswith("--part")] + [
          f"--part={part}"]
  completed = subprocess.run(args, capture_output=True, text=True,
                             check=False)
  if completed.returncode:
    sys.stderr.write(completed.stderr)
    raise SystemExit(f"error: the {part} part failed (exit code "
                     f"{completed.returncode}); its output is above.")
  return json.loads(completed.stdout.strip().splitlines()[-1])


def format_table(result: dict) -> str:
  rows = [
      ("train images/s (median)", "train_images_per_second", "{:.2f}"),
      ("score images/s (median)", "score_images_per_second", "{:.2f}"),
      ("train compile s", "train_compile_seconds", "{:.1f}"),
      ("score compile s", "score_compile_seconds", "{:.1f}"),
      ("train peak RSS MiB", "train_peak_rss_mib", "{:.0f}"),
      ("score peak RSS MiB", "score_peak_rss_mib", "{:.0f}"),
      ("train peak device MiB", "train_peak_device_mib", "{:.0f}"),
      ("score peak device MiB", "score_peak_device_mib", "{:.0f}"),
      ("train TFLOP/s", "train_tflops_per_second", "{:.3f}"),
      ("train MFU", "train_mfu", "{:.1%}"),
  ]
  lines = []
  for label, key, form in rows:
    if result.get(key) is not None:
      lines.append(f"{label:<26}{form.format(result[key])}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if _STEPS.value < 1 or _WARMUP.value < 0:
    raise app.UsageError("--steps must be >= 1 and --warmup >= 0.")
  if _PART.value in ("train", "score"):
    measure = measure_train if _PART.value == "train" else measure_score
    try:
      result = measure(config, _STEPS.value, _WARMUP.value)
    except ValueError as error:
      cli.exit_with_error(error)
  else:
    result = describe_setup(config)
    result.update(_run_part_in_subprocess("train"))
    result.update(_run_part_in_subprocess("score"))
    peak = _peak_tflops(result["device_kind"], result["dtype"])
    if peak and result.get("train_tflops_per_second"):
      result["train_mfu"] = result["train_tflops_per_second"] / peak
    print(format_table(result))
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
