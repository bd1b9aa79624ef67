r"""Times each convolution and GroupNorm of the U-Net in JAX and in PyTorch.

For every layer of the score network at one image size it measures two
operations, forward and backward as a train step runs them:

* conv: the 3x3 convolution, gradients with respect to input and kernel;
* norm: GroupNorm followed by swish, gradients with respect to input, scale
  and bias.

The JAX side uses the modules of sprs_jax.model and XLA's flags from
sprs_jax.xla_flags; the PyTorch side uses torch.nn.Conv2d, torch.nn.GroupNorm
and SiLU. No checkout of the authors' code is needed, only PyTorch:

  pip install torch
  python benchmarks/compare_layers.py --image-size=64 --batch-size=16

Each side runs in its own subprocess, the sides alternate for --rounds
rounds, and the fastest round of each side counts. Prints a table of
milliseconds per layer with the ratio theirs / ours (above 1: sprs-jax is
faster). The last line is one JSON object with every layer's figures and
conv_ratio, norm_ratio and total_ratio, the ratios of the sums.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def unet_layers(image_size: int, widths) -> list[dict]:
  """Returns each 3x3 conv of sprs_jax.model.UNet with its input shape.

  Every entry has name, size (height and width of the input), in_channels
  and out_channels, in the order the forward pass runs them. Sizes assume
  image_size is divisible by 2^(levels - 1).
  """
  layers = []

  def double_conv(name, size, in_channels, out_channels, mid_channels=None):
    mid_channels = mid_channels or out_channels
    layers.append({"name": f"{name}.conv0", "size": size,
                   "in_channels": in_channels, "out_channels": mid_channels})
    layers.append({"name": f"{name}.conv1", "size": size,
                   "in_channels": mid_channels, "out_channels": out_channels})

  num_levels = len(widths)
  double_conv("inc", image_size, 3, widths[0])
  for level in range(1, num_levels):
    double_conv(f"down{level}", image_size >> level, widths[level - 1],
                widths[level])

  channels = widths[-1]
  for level in range(1, num_levels):
    skip_level = num_levels - 1 - level
    in_channels = widths[skip_level] + channels
    features = widths[max(num_levels - 2 - level, 0)]
    double_conv(f"up{level}", image_size >> skip_level, in_channels, features,
                in_channels // 2)
    channels = features
  return layers


def _best_seconds(run_once, steps: int, warmup: int) -> float:
  """Returns the fastest of `steps` timed calls after 1 + warmup untimed ones."""
  for _ in range(1 + warmup):
    run_once()
  best = float("inf")
  for _ in range(steps):
    start = time.perf_counter()
    run_once()
    best = min(best, time.perf_counter() - start)
  return best


def measure_jax(args) -> list[dict]:
  """Returns the best seconds of conv and norm per layer, in JAX."""
  sys.path.insert(0, str(_ROOT))
  import sprs_jax.xla_flags  # pylint: disable=import-outside-toplevel,unused-import
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from sprs_jax import model  # pylint: disable=import-outside-toplevel

  results = []
  for layer in unet_layers(args.image_size, args.widths):
    shape = (args.batch_size, layer["size"], layer["size"],
             layer["in_channels"])
    images = jax.random.normal(jax.random.key(0), shape)
    conv = nn.Conv(layer["out_channels"], (3, 3), padding=1)
    conv_params = conv.init(jax.random.key(1), images)
    conv_grad = jax.jit(jax.grad(
        lambda params, x: jnp.sum(jnp.square(conv.apply(params, x))),
        argnums=(0, 1)))

    outputs = jax.random.normal(
        jax.random.key(2), shape[:3] + (layer["out_channels"],))
    norm = model.GroupNorm(args.num_groups)
    norm_params = norm.init(jax.random.key(3), outputs)
    norm_grad = jax.jit(jax.grad(
        lambda params, x: jnp.sum(jnp.square(model.swish(norm.apply(params, x)))),
        argnums=(0, 1)))

    results.append({
        "conv_seconds": _best_seconds(
            lambda: jax.block_until_ready(conv_grad(conv_params, images)),
            args.steps, args.warmup),
        "norm_seconds": _best_seconds(
            lambda: jax.block_until_ready(norm_grad(norm_params, outputs)),
            args.steps, args.warmup),
    })
  return results


def measure_torch(args) -> list[dict]:
  """Returns the best seconds of conv and norm per layer, in PyTorch."""
  import torch  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  results = []
  for layer in unet_layers(args.image_size, args.widths):
    images = torch.randn(args.batch_size, layer["in_channels"], layer["size"],
                         layer["size"], requires_grad=True)
    conv = torch.nn.Conv2d(layer["in_channels"], layer["out_channels"], 3,
                           padding=1)
    outputs = torch.randn(args.batch_size, layer["out_channels"],
                          layer["size"], layer["size"], requires_grad=True)
    norm = torch.nn.GroupNorm(args.num_groups, layer["out_channels"])

    def conv_step():
      torch.sum(torch.square(conv(images))).backward()  # pylint: disable=cell-var-from-loop

    def norm_step():
      torch.sum(torch.square(torch.nn.functional.silu(norm(outputs)))).backward()  # pylint: disable=cell-var-from-loop

    results.append({
        "conv_seconds": _best_seconds(conv_step, args.steps, args.warmup),
        "norm_seconds": _best_seconds(norm_step, args.steps, args.warmup),
    })
  return results


def _run_side(side: str, args) -> list[dict]:
  """Runs one side in a subprocess; returns its per-layer figures."""
  command = [
      sys.executable, __file__, f"--side={side}",
      f"--image-size={args.image_size}", f"--batch-size={args.batch_size}",
      f"--widths={','.join(map(str, args.widths))}",
      f"--num-groups={args.num_groups}", f"--steps={args.steps}",
      f"--warmup={args.warmup}",
  ]
  completed = subprocess.run(command, capture_output=True, text=True,
                             check=False)
  if completed.returncode:
    sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
    raise SystemExit(f"error: the {side} side failed (exit code "
                     f"{completed.returncode}); its output is above.")
  return json.loads(completed.stdout.strip().splitlines()[-1])


def compare(args) -> dict:
  """Returns the per-layer figures of both sides and the ratios of the sums."""
  rounds = {"jax": [], "torch": []}
  for round_index in range(args.rounds):
    for side in ("torch", "jax"):
      print(f"round {round_index + 1}/{args.rounds}: {side} ...",
            file=sys.stderr, flush=True)
      rounds[side].append(_run_side(side, args))

  layers = unet_layers(args.image_size, args.widths)
  for index, layer in enumerate(layers):
    for side in ("jax", "torch"):
      for kind in ("conv", "norm"):
        layer[f"{side}_{kind}_ms"] = 1e3 * min(
            figures[index][f"{kind}_seconds"] for figures in rounds[side])

  result = {"image_size": args.image_size, "batch_size": args.batch_size,
            "widths": list(args.widths), "num_groups": args.num_groups,
            "rounds": args.rounds, "cpu_cores": os.cpu_count(),
            "layers": layers}
  for kind in ("conv", "norm"):
    for side in ("jax", "torch"):
      result[f"{side}_{kind}_ms"] = sum(l[f"{side}_{kind}_ms"] for l in layers)
    result[f"{kind}_ratio"] = result[f"torch_{kind}_ms"] / result[f"jax_{kind}_ms"]
  result["total_ratio"] = (
      (result["torch_conv_ms"] + result["torch_norm_ms"]) /
      (result["jax_conv_ms"] + result["jax_norm_ms"]))
  return result


def format_table(result: dict) -> str:
  """Returns the per-layer table: ms per side and theirs / ours per kind."""
  header = (f"{'layer':<12}{'size':>6}{'in':>6}{'out':>6}"
            f"{'conv jax':>10}{'torch':>8}{'ratio':>7}"
            f"{'norm jax':>10}{'torch':>8}{'ratio':>7}")
  lines = [header]
  rows = result["layers"] + [{
      "name": "sum", "size": "", "in_channels": "", "out_channels": "",
      **{key: result[key] for key in ("jax_conv_ms", "torch_conv_ms",
                                      "jax_norm_ms", "torch_norm_ms")}}]
  for row in rows:
    cells = f"{row['name']:<12}{row['size']:>6}{row['in_channels']:>6}{row['out_channels']:>6}"
    for kind in ("conv", "norm"):
      ours, theirs = row[f"jax_{kind}_ms"], row[f"torch_{kind}_ms"]
      cells += f"{ours:>10.2f}{theirs:>8.2f}{theirs / ours:>7.2f}"
    lines.append(cells)
  return "\n".join(lines)


def _widths(text: str) -> tuple[int, ...]:
  try:
    widths = tuple(int(part) for part in text.split(","))
  except ValueError as error:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a comma-separated list of integers, for example "
        "64,128,256,512,512.") from error
  if not widths or min(widths) < 1:
    raise argparse.ArgumentTypeError(f"widths {text!r} must be >= 1.")
  return widths


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--image-size", type=int, default=64,
                      help="height and width of the input images, in pixels")
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--widths", type=_widths, default=(64, 128, 256, 512, 512),
                      help="channels per level, comma-separated")
  parser.add_argument("--num-groups", type=int, default=32,
                      help="GroupNorm groups; must divide every layer's width")
  parser.add_argument("--steps", type=int, default=5,
                      help="timed calls per layer and operation")
  parser.add_argument("--warmup", type=int, default=1,
                      help="untimed calls after the first, per layer")
  parser.add_argument("--rounds", type=int, default=2,
                      help="alternating runs of each side; the fastest counts")
  parser.add_argument("--side", choices=("jax", "torch"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  for name in ("image_size", "batch_size", "num_groups", "steps", "rounds"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be "
                   ">= 1.")
  if args.warmup < 0:
    parser.error(f"--warmup={args.warmup} must be >= 0.")
  levels = len(args.widths)
  if args.image_size % 2**(levels - 1):
    parser.error(f"--image-size={args.image_size} must be divisible by "
                 f"{2**(levels - 1)} for {levels} levels.")
  for layer in unet_layers(args.image_size, args.widths):
    if layer["out_channels"] % args.num_groups:
      parser.error(f"--num-groups={args.num_groups} does not divide the "
                   f"{layer['out_channels']} channels of {layer['name']}.")
  return args


def main():
  args = parse_args()
  if args.side:
    measure = measure_jax if args.side == "jax" else measure_torch
    print(json.dumps(measure(args)))
    return
  result = compare(args)
  print(format_table(result))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
