r"""Measures sprs-jax against the authors' PyTorch code on the same shapes.

The authors' U-Net is imported from a checkout that you pass with
--reference-repo (it is never copied into this repository):

  git clone https://github.com/Lee-JongHyeon/Anomaly-Detection-using-Score-based-Perturbation-Resilience spr-torch
  pip install torch
  python benchmarks/compare_reference.py --reference-repo=spr-torch \
      --image-size=64 --batch-size=16 --steps=5

Each side and part (train step, full scoring) runs in its own subprocess, so
peak memory is measured apart, and the parts alternate between the sides for
--rounds rounds, so that a slow spell of the machine hits both. The best
round of each side counts. The reference train step is their loss, AdamW
(lr 1e-4, weight decay 1e-3) and an EMA update (0.9999); their scoring is
their test loop: 3 draws at t = 1e-3, bilinear resize to 256 x 256 and a
31 x 31 mean filter. Ours runs configs/mvtec.py with the same shapes.

Prints a table of figures and ratios: ours / theirs, where above 1 is faster
or, for memory, larger. The last line is one JSON object with train_ratio,
scoring_ratio and memory_ratio, the larger of the two peak memory ratios.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

import timing  # benchmarks/timing.py, next to this script

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_THROUGHPUT = _ROOT / "benchmarks" / "throughput.py"


def _require_checkout(repo: str) -> None:
  """Exits with a message unless `repo` contains the authors' unet package."""
  package = os.path.join(repo, "unet", "unet_model.py")
  if not os.path.isfile(package):
    raise SystemExit(
        f"error: {package} does not exist. --reference-repo must be a "
        "checkout of github.com/Lee-JongHyeon/Anomaly-Detection-using-Score-"
        "based-Perturbation-Resilience (the folder that contains unet/).")


def _import_reference(repo: str):
  """Returns the authors' UNet class from their checkout at `repo`."""
  _require_checkout(repo)
  sys.path.insert(0, os.path.abspath(repo))
  from unet import UNet  # pylint: disable=import-outside-toplevel
  return UNet


def measure_reference(part: str, repo: str, image_size: int,
                      batch_size: int, steps: int, warmup: int) -> dict:
  """Times the authors' train step or test loop; returns a figures dict."""
  import numpy as np
  import torch
  import torch.nn.functional as F

  unet_class = _import_reference(repo)
  torch.manual_seed(0)
  sigma_max = 25.0

  def marginal_std(t):
    return torch.sqrt((sigma_max**(2.0 * t) - 1.0) / 2.0 / np.log(sigma_max))

  model = unet_class(marginal_std, 3, 3, 256)
  images = torch.rand(batch_size, 3, image_size, image_size) * 2.0 - 1.0

  if part == "train":
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4,
                                  weight_decay=1e-3)
    trained = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in trained]

    def run_once():
      t = torch.rand(batch_size) * (1.0 - 1e-5) + 1e-5
      z = torch.randn_like(images)
      std = marginal_std(t)[:, None, None, None]
      score = model(images + z * std, t)
      loss = torch.mean(torch.sum((score * std + z)**2, dim=(1, 2, 3)))
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
      with torch.no_grad():
        torch._foreach_lerp_(ema, trained, 1.0 - 0.9999)  # pylint: disable=protected-access
      loss.item()

  else:
    model.eval()

    def run_once():
      t = torch.full((batch_size,), 1e-3)
      std = marginal_std(t)[:, None, None, None]
      maps = 0.0
      with torch.no_grad():
        for _ in range(3):
          noise = torch.randn_like(images) * std
          restored = model(images + noise, t) * std**2 + noise
          maps = maps + (restored**2).mean(1, keepdim=True)
        maps = maps / 3
        heatmaps = F.interpolate(maps, (256, 256), mode="bilinear",
                                 align_corners=False)
        heatmaps = F.avg_pool2d(heatmaps, 31, 1, padding=15).numpy()
      heatmaps.max(axis=(1, 2, 3))

  first, times = timing.time_calls(run_once, steps, warmup)
  median = statistics.median(times)
  return {
      f"{part}_images_per_second": batch_size / median,
      f"{part}_compile_seconds": max(first - median, 0.0),
      f"{part}_peak_rss_mib": timing.peak_rss_mib(),
      "torch": torch.__version__,
      "torch_threads": torch.get_num_threads(),
  }


def _last_json_line(completed, description: str) -> dict:
  if completed.returncode:
    sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
    raise SystemExit(f"error: {description} failed (exit code "
                     f"{completed.returncode}); its output is above.")
  return json.loads(completed.stdout.strip().splitlines()[-1])


def run_ours(part: str, args) -> dict:
  command = [
      sys.executable, str(_THROUGHPUT), f"--part={part}",
      f"--steps={args.steps}", f"--warmup={args.warmup}",
      f"--config={_ROOT / 'configs' / 'mvtec.py'}",
      f"--config.data.image_size={args.image_size}",
      f"--config.training.batch_size={args.batch_size}",
      f"--config.eval.batch_size={args.batch_size}",
      f"--config.model.dtype={args.dtype}",
  ]
  return _last_json_line(
      subprocess.run(command, capture_output=True, text=True, check=False),
      f"sprs-jax's {part} part")


def run_theirs(part: str, args) -> dict:
  command = [
      sys.executable, __file__, f"--side-part={part}",
      f"--reference-repo={args.reference_repo}",
      f"--image-size={args.image_size}", f"--batch-size={args.batch_size}",
      f"--steps={args.steps}", f"--warmup={args.warmup}",
  ]
  return _last_json_line(
      subprocess.run(command, capture_output=True, text=True, check=False),
      f"the reference {part} part")


def _best(rounds, key):
  values = [r[key] for r in rounds if r.get(key) is not None]
  if not values:
    return None
  return min(values) if key.endswith("_mib") else max(values)


def compare(args) -> dict:
  ours = {"train": [], "score": []}
  theirs = {"train": [], "score": []}
  for round_index in range(args.rounds):
    for part in ("train", "score"):
      print(f"round {round_index + 1}/{args.rounds}: {part}, reference ...",
            file=sys.stderr, flush=True)
      theirs[part].append(run_theirs(part, args))
      print(f"round {round_index + 1}/{args.rounds}: {part}, sprs-jax ...",
            file=sys.stderr, flush=True)
      ours[part].append(run_ours(part, args))

  result = {"image_size": args.image_size, "batch_size": args.batch_size,
            "steps": args.steps, "rounds": args.rounds, "dtype": args.dtype,
            "torch": theirs["train"][0]["torch"],
            "torch_threads": theirs["train"][0]["torch_threads"],
            "cpu_cores": os.cpu_count()}
  for part in ("train", "score"):
    for key in (f"{part}_images_per_second", f"{part}_peak_rss_mib",
                f"{part}_compile_seconds"):
      result[f"ours_{key}"] = _best(ours[part], key)
      result[f"theirs_{key}"] = _best(theirs[part], key)
  result["train_ratio"] = (result["ours_train_images_per_second"] /
                           result["theirs_train_images_per_second"])
  result["scoring_ratio"] = (result["ours_score_images_per_second"] /
                             result["theirs_score_images_per_second"])
  result["train_memory_ratio"] = (result["ours_train_peak_rss_mib"] /
                                  result["theirs_train_peak_rss_mib"])
  result["scoring_memory_ratio"] = (result["ours_score_peak_rss_mib"] /
                                    result["theirs_score_peak_rss_mib"])
  result["memory_ratio"] = max(result["train_memory_ratio"],
                               result["scoring_memory_ratio"])
  return result


def format_table(result: dict) -> str:
  lines = [f"{'figure':<26}{'sprs-jax':>12}{'reference':>12}{'ratio':>8}"]
  for label, key, form in (
      ("train images/s", "train_images_per_second", "{:.2f}"),
      ("scoring images/s", "score_images_per_second", "{:.2f}"),
      ("train peak RSS MiB", "train_peak_rss_mib", "{:.0f}"),
      ("scoring peak RSS MiB", "score_peak_rss_mib", "{:.0f}"),
  ):
    ours, theirs = result[f"ours_{key}"], result[f"theirs_{key}"]
    lines.append(f"{label:<26}{form.format(ours):>12}"
                 f"{form.format(theirs):>12}{ours / theirs:>8.2f}")
  return "\n".join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reference-repo", required=True,
                      help="Checkout of the authors' PyTorch code.")
  parser.add_argument("--image-size", type=int, default=64)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--steps", type=int, default=5,
                      help="Timed repetitions of each part per round.")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--dtype", default="float32",
                      choices=("float32", "bfloat16"),
                      help="sprs-jax's compute dtype; the reference runs "
                      "float32 as released.")
  parser.add_argument("--side-part", choices=("train", "score"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  for name in ("image_size", "batch_size", "steps", "rounds"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1.")
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.side_part:
    print(json.dumps(measure_reference(
        args.side_part, args.reference_repo, args.image_size,
        args.batch_size, args.steps, args.warmup)))
    return
  _import_reference_check(args.reference_repo)
  result = compare(args)
  print(format_table(result))
  print(json.dumps(result, sort_keys=True))


def _import_reference_check(repo: str) -> None:
  """Fails early, before any timing, if the checkout or torch is missing."""
  _require_checkout(repo)
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise SystemExit("error: PyTorch is not installed. Install the CPU build "
                     "with: pip install torch --index-url "
                     "https://download.pytorch.org/whl/cpu") from None


if __name__ == "__main__":
  main()
