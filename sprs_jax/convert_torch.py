"""Converts a state_dict of the authors' PyTorch release into a workdir.

Usage (from the repository root)::

  python -m sprs_jax.convert_torch --checkpoint=bottle.pth \
      --workdir=workdirs/converted
  python run.py --config=configs/mvtec.py:bottle --workdir=workdirs/converted \
      --mode=evaluate --config.data.manual_dir=/path/to/mvtec_anomaly_detection

The release saves the EMA weights of its U-Net with
``torch.save(model.state_dict(), "<category>.pth")``: NCHW conv kernels
[out, in, kh, kw] and nn.Linear weights [out, in]. They become Flax params of
`model.UNet`, with HWIO conv kernels and [in, out] Dense kernels. The widths and
embed_dim are read from the tensor shapes and must equal the config's.

The workdir gets what training would have left there::

  <workdir>/<category>/config.json          the config, as run_lib writes it
  <workdir>/<category>/checkpoints/<step>/  a train.TrainState: params and
                                            ema_params both the converted
                                            weights, a fresh optimizer state

The stored step is the number of steps that training with the config would
run (training.num_epochs * ceil(training images / training.batch_size)) when
the category's data set is already prepared. Then --mode=train_and_evaluate
finds training finished, skips it and only evaluates. When the data set is not
prepared, that number is unknown and the step is 1, the lowest step that
evaluate and predict accept. --mode=evaluate and --mode=predict use the
weights as they are in both cases and log no warning, because no
train_stats.json is written.

PyTorch is needed only here, to read the file; `load_state_dict` imports it.
"""

import dataclasses
import importlib
import math
import os
import pathlib
import pickle
import shlex
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sprs_jax import checkpoint
from sprs_jax import cli
from sprs_jax import input_pipeline
from sprs_jax import model as model_lib
from sprs_jax import run_lib
from sprs_jax import train as train_lib

# Keys under which training scripts commonly store a state_dict inside a
# larger dict, such as {"model": state_dict, "optimizer": ...}.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "ema_state_dict",
                "ema")
# Prefix that nn.DataParallel and DistributedDataParallel add to every key.
DATA_PARALLEL_PREFIX = "module."
DEFAULT_DATA_SET = "mvtec_ad"
DEFAULT_CONFIG_FILE = "configs/mvtec.py"
IMAGE_CHANNELS = 3
# Maximum number of problems listed in one error message.
_MAX_LISTED = 12

_STATE_DICT_FIX = (
    "Convert the state_dict of the SPR U-Net as the authors' release saves "
    "it: torch.save(model.state_dict(), path), with the EMA weights loaded "
    "into the model.")


@dataclasses.dataclass(frozen=True)
class _Entry:
  """The Flax target of one state_dict tensor, and its expected shape.

  Attributes:
    path: the keys of the leaf in the params tree, such as ("inc", "conv0",
      "kernel").
    torch_shape: the shape the tensor must have in the state_dict.
    kind: "conv" (OIHW to HWIO), "dense" ([out, in] to [in, out]) or "copy".
  """
  path: tuple[str, ...]
  torch_shape: tuple[int, ...]
  kind: str


@dataclasses.dataclass(frozen=True)
class Conversion:
  """The result of `convert`.

  Attributes:
    category: the category converted, a config.data.category value.
    workdir: the workdir written to.
    category_dir: <workdir>/<category>.
    checkpoint_path: the folder of the Orbax checkpoint written.
    step: the training step stored with the weights (see the module doc).
    config: the config written to <category_dir>/config.json.
    data_prepared: whether the category's data set was already prepared.
  """
  category: str
  workdir: str
  category_dir: str
  checkpoint_path: str
  step: int
  config: ml_collections.ConfigDict
  data_prepared: bool


def _double_conv_entries(torch_prefix: str, name: str, in_channels: int,
                         mid_channels: int, out_channels: int) -> dict:
  """Returns the entries of one DoubleConv: conv, GroupNorm, conv, GroupNorm.

  Indices 2 and 5 of the release's nn.Sequential are swish, without params.
  """
  entries = {}
  layers = ((0, 1, in_channels, mid_channels),
            (3, 4, mid_channels, out_channels))
  for flax_index, (conv, norm, channels_in, channels_out) in enumerate(layers):
    conv_name, norm_name = f"conv{flax_index}", f"norm{flax_index}"
    entries[f"{torch_prefix}.{conv}.weight"] = _Entry(
        (name, conv_name, "kernel"), (channels_out, channels_in, 3, 3), "conv")
    entries[f"{torch_prefix}.{conv}.bias"] = _Entry(
        (name, conv_name, "bias"), (channels_out,), "copy")
    entries[f"{torch_prefix}.{norm}.weight"] = _Entry(
        (name, norm_name, "scale"), (channels_out,), "copy")
    entries[f"{torch_prefix}.{norm}.bias"] = _Entry(
        (name, norm_name, "bias"), (channels_out,), "copy")
  return entries


def _dense_entries(torch_prefix: str, name: str, in_features: int,
                   out_features: int) -> dict:
  return {
      f"{torch_prefix}.weight": _Entry(
          (name, "kernel"), (out_features, in_features), "dense"),
      f"{torch_prefix}.bias": _Entry((name, "bias"), (out_features,), "copy"),
  }


def parameter_layout(widths, embed_dim: int) -> dict[str, _Entry]:
  """Returns {state_dict key: _Entry} of the release's U-Net of these widths.

  The decoder mirrors `model.UNet`: level k concatenates the skip of encoder
  level L-1-k with the upsampled features, its first conv halves the channels,
  and it outputs widths[max(L-2-k, 0)] channels.
  """
  widths = tuple(widths)
  num_levels = len(widths)
  layout = {
      "embed.0.W": _Entry(("embed_fourier", "W"), (embed_dim // 2,), "copy"),
  }
  layout.update(_dense_entries("embed.1", "embed_dense", embed_dim, embed_dim))
  layout.update(_double_conv_entries(
      "inc.double_conv", "inc", IMAGE_CHANNELS, widths[0], widths[0]))
  layout.update(_dense_entries("dense_in.dense", "dense_in", embed_dim,
                               widths[0]))

  for level in range(1, num_levels):
    layout.update(_double_conv_entries(
        f"down{level}.maxpool_conv.1.double_conv", f"down{level}",
        widths[level - 1], widths[level], widths[level]))
    layout.update(_dense_entries(f"dense_d{level}.dense", f"dense_d{level}",
                                 embed_dim, widths[level]))

  channels = widths[-1]
  for level in range(1, num_levels):
    in_channels = channels + widths[num_levels - 1 - level]
    out_channels = widths[max(num_levels - 2 - level, 0)]
    layout.update(_double_conv_entries(
        f"up{level}.conv.double_conv", f"up{level}", in_channels,
        in_channels // 2, out_channels))
    layout.update(_dense_entries(f"dense_u{level}.dense", f"dense_u{level}",
                                 embed_dim, out_channels))
    channels = out_channels

  layout["outc.conv.weight"] = _Entry(
      ("outc", "kernel"), (IMAGE_CHANNELS, widths[0], 1, 1), "conv")
  layout["outc.conv.bias"] = _Entry(("outc", "bias"), (IMAGE_CHANNELS,),
                                    "copy")
  return layout


def _output_channels(state_dict, key: str, source: str) -> int:
  """Returns dim 0 of state_dict[key], which the architecture is read from."""
  if key not in state_dict:
    raise ValueError(
        f"{source} has no key {key!r}, from which the network's widths are "
        f"read. {_STATE_DICT_FIX}")
  shape = np.shape(state_dict[key])
  if len(shape) < 1:
    raise ValueError(
        f"{source}: {key!r} is a scalar, expected a tensor of at least one "
        f"dimension. {_STATE_DICT_FIX}")
  return int(shape[0])


def infer_architecture(state_dict, source: str = "The state_dict"):
  """Returns (widths, embed_dim) of the U-Net that state_dict belongs to.

  The number of levels is 1 + the number of ``down<k>`` modules. Level widths
  are the output channels of each level's second conv, and embed_dim is the
  output size of ``embed.1``. GroupNorm layers store no group count, so
  model.num_groups cannot be read from the weights (the release uses 32).

  Raises:
    ValueError: naming a key the widths are read from that is missing, or
      ``down<k>`` indices that do not run 1, 2, ... without gaps.
  """
  down_levels = set()
  for key in state_dict:
    head = key.split(".", 1)[0]
    if head.startswith("down") and head[len("down"):].isdigit():
      down_levels.add(int(head[len("down"):]))
  expected_levels = set(range(1, len(down_levels) + 1))
  if down_levels != expected_levels:
    raise ValueError(
        f"{source} has the encoder levels down{sorted(down_levels)}, expected "
        f"down1 to down{len(down_levels)} without gaps. {_STATE_DICT_FIX}")

  widths = [_output_channels(state_dict, "inc.double_conv.3.weight", source)]
  for level in sorted(down_levels):
    widths.append(_output_channels(
        state_dict, f"down{level}.maxpool_conv.1.double_conv.3.weight",
        source))
  embed_dim = _output_channels(state_dict, "embed.1.weight", source)
  return tuple(widths), embed_dim


def _list_problems(problems: list[str]) -> str:
  listed = problems[:_MAX_LISTED]
  if len(problems) > len(listed):
    listed.append(f"... and {len(problems) - len(listed)} more")
  return "\n  ".join(listed)


def check_keys(state_dict, widths, embed_dim: int,
               source: str = "The state_dict") -> None:
  """Raises ValueError listing every missing, unexpected or misshaped key.

  The expected keys and shapes are those of `parameter_layout`. Every tensor
  must also be of a floating-point dtype.
  """
  layout = parameter_layout(widths, embed_dim)
  missing = [key for key in layout if key not in state_dict]
  unexpected = [key for key in state_dict if key not in layout]
  problems = [f"missing key {key!r} of shape {layout[key].torch_shape}"
              for key in missing]
  problems += [f"unexpected key {key!r}" for key in unexpected]
  for key, entry in layout.items():
    if key not in state_dict:
      continue
    value = state_dict[key]
    if tuple(np.shape(value)) != entry.torch_shape:
      problems.append(
          f"{key!r} has shape {tuple(np.shape(value))}, expected "
          f"{entry.torch_shape}")
    elif not np.issubdtype(np.asarray(value).dtype, np.floating):
      problems.append(
          f"{key!r} has dtype {np.asarray(value).dtype}, expected a "
          "floating-point dtype")
  if problems:
    raise ValueError(
        f"{source} does not match the SPR U-Net with widths {widths} and "
        f"embed_dim {embed_dim} (read from inc, down1.. and embed.1):\n  "
        f"{_list_problems(problems)}\n{_STATE_DICT_FIX}")


def check_model_config(widths, embed_dim: int, model_config,
                       source: str = "The state_dict") -> None:
  """Raises ValueError if config.model's widths or embed_dim differ.

  The message names each field with the state_dict's value as a --config
  override.
  """
  widths = tuple(int(width) for width in widths)
  config_widths = tuple(model_config.widths)
  overrides, differences = [], []
  if config_widths != widths:
    differences.append(
        f"model.widths: state_dict {widths}, config {config_widths}")
    overrides.append(f"'--config.model.widths={widths}'")
  if model_config.embed_dim != embed_dim:
    differences.append(
        f"model.embed_dim: state_dict {embed_dim}, config "
        f"{model_config.embed_dim}")
    overrides.append(f"--config.model.embed_dim={embed_dim}")
  if differences:
    raise ValueError(
        f"{source} does not fit the config ({'; '.join(differences)}). Set "
        f"the state_dict's values with the overrides {' '.join(overrides)} "
        "after --config (such as --config=configs/mvtec.py:<category>), in "
        "this command and in every later run.py command on this workdir.")


def _set_leaf(tree: dict, path: tuple[str, ...], value) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def convert_state_dict(state_dict: Mapping[str, np.ndarray],
                       model_config=None,
                       source: str = "The state_dict") -> dict:
  """Maps the release's state_dict to `model.UNet` params.

  Args:
    state_dict: {key: NumPy array} as the release names and shapes them.
    model_config: config.model to check the widths and embed_dim against;
      None skips that check.
    source: how error messages name the state_dict, such as its file.

  Returns:
    The nested params dict of float32 NumPy arrays: conv kernels HWIO, Dense
    kernels [in, out].

  Raises:
    ValueError: naming every missing, unexpected or misshaped key, or the
      config fields that differ from the state_dict.
  """
  widths, embed_dim = infer_architecture(state_dict, source)
  check_keys(state_dict, widths, embed_dim, source)
  if model_config is not None:
    check_model_config(widths, embed_dim, model_config, source)

  params = {}
  for key, entry in parameter_layout(widths, embed_dim).items():
    value = np.asarray(state_dict[key], np.float32)
    if entry.kind == "conv":
      value = np.transpose(value, (2, 3, 1, 0))
    elif entry.kind == "dense":
      value = value.T
    _set_leaf(params, entry.path, np.ascontiguousarray(value))
  return params


def _import_torch(path: str):
  try:
    return importlib.import_module("torch")
  except ImportError as error:
    raise ImportError(
        f"Reading {path} needs PyTorch, which is not installed. Install it "
        "with `pip install torch`, or the smaller CPU build with `pip install "
        "torch --index-url https://download.pytorch.org/whl/cpu`.") from error


def _unwrap(loaded, state_dict_key: str | None, torch, path: str) -> Mapping:
  """Returns the state_dict inside what torch.load returned."""
  if not isinstance(loaded, Mapping):
    raise ValueError(
        f"{path} contains a {type(loaded).__name__}, expected a state_dict "
        f"(a dict of tensors). {_STATE_DICT_FIX}")
  keys = ", ".join(repr(key) for key in list(loaded)[:10])
  if state_dict_key is not None:
    if state_dict_key not in loaded:
      raise ValueError(
          f"{path} has no key {state_dict_key!r} (--state_dict_key). Its "
          f"top-level keys are: {keys}.")
    return loaded[state_dict_key]

  if loaded and all(isinstance(value, torch.Tensor)
                    for value in loaded.values()):
    return loaded
  candidates = [key for key in WRAPPER_KEYS
                if isinstance(loaded.get(key), Mapping)]
  if len(candidates) > 1:
    raise ValueError(
        f"{path} contains several state_dicts ({', '.join(candidates)}). "
        "Select the EMA weights with --state_dict_key.")
  if not candidates:
    raise ValueError(
        f"{path} is a dict but not a state_dict, and has none of the keys "
        f"{', '.join(WRAPPER_KEYS)}. Its top-level keys are: {keys}. Pass "
        "the key of the state_dict with --state_dict_key.")
  logging.info("Reading the state_dict under the key %r of %s.",
               candidates[0], path)
  return loaded[candidates[0]]


def load_state_dict(path: str, state_dict_key: str | None = None) -> dict:
  """Reads a state_dict saved with torch.save into NumPy arrays.

  The file is read with ``torch.load(map_location="cpu", weights_only=True)``,
  which builds tensors and containers only and runs no code from the file.
  A dict that wraps the state_dict under one of `WRAPPER_KEYS` (or under
  `state_dict_key`) is unwrapped, and the ``module.`` prefix of DataParallel
  is removed. Floating-point tensors become float32 arrays, others keep their
  dtype (`check_keys` rejects them).

  Raises:
    ImportError: if PyTorch is not installed, with the command to install it.
    ValueError: if the file is missing or unreadable, or contains no
      state_dict.
  """
  torch = _import_torch(path)
  if not os.path.isfile(path):
    raise ValueError(
        f"The checkpoint {path!r} does not exist or is not a file. Pass the "
        ".pth file of the authors' release with --checkpoint.")
  try:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError,
          ValueError) as error:
    detail = " ".join(str(error).split())[:300]
    raise ValueError(
        f"Failed to read {path} with torch.load(weights_only=True) "
        f"({type(error).__name__}: {detail}). The file must be written by "
        "torch.save and contain tensors and containers only. "
        f"{_STATE_DICT_FIX}") from error

  state_dict = _unwrap(loaded, state_dict_key, torch, path)
  if not isinstance(state_dict, Mapping) or not state_dict:
    raise ValueError(
        f"{path} contains no tensors where the state_dict should be. "
        f"{_STATE_DICT_FIX}")
  for key, value in state_dict.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(
          f"{path}: the state_dict entry {key!r} is a "
          f"{type(value).__name__}, expected a tensor. {_STATE_DICT_FIX}")

  if all(key.startswith(DATA_PARALLEL_PREFIX) for key in state_dict):
    state_dict = {key[len(DATA_PARALLEL_PREFIX):]: value
                  for key, value in state_dict.items()}
  arrays = {}
  for key, value in state_dict.items():
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.to(torch.float32)
    arrays[key] = value.numpy()
  return arrays


def mvtec_categories() -> list[str]:
  builder_class = input_pipeline.import_builder_class(DEFAULT_DATA_SET)
  return [config.name for config in builder_class.BUILDER_CONFIGS]


def default_config(category: str,
                   source: str) -> ml_collections.ConfigDict:
  """Returns configs/mvtec.py's config of an MVTec AD category.

  Raises:
    ValueError: if category is not an MVTec AD category, asking for --config.
  """
  categories = mvtec_categories()
  if category not in categories:
    raise ValueError(
        f"No --config given, and the category {category!r} ({source}) is not "
        f"an MVTec AD category ({', '.join(categories)}). Pass --category "
        "with one of these, or the config of the data set with --config, for "
        "example --config=configs/btad.py:01.")
  try:
    mvtec = importlib.import_module("configs.mvtec")
  except ModuleNotFoundError as error:
    raise ValueError(
        f"Cannot import {DEFAULT_CONFIG_FILE} ({error}). Run from the "
        "repository root, or pass "
        f"--config=<repository>/{DEFAULT_CONFIG_FILE}:{category}.") from error
  return mvtec.get_config(category)


def resolve_config(checkpoint_path: str, category: str | None, config):
  """Returns (category, config) of a conversion, checked against each other.

  The category is `category`, else the stem of the checkpoint's file name.
  The config is `config`, else configs/mvtec.py's for an MVTec AD category.

  Raises:
    ValueError: if the category is not one of the config's data set, or
      differs from config.data.category, or no config is given for a
      category outside MVTec AD.
  """
  if category:
    source = "--category"
  else:
    category = pathlib.Path(checkpoint_path).stem
    source = f"the file name of {checkpoint_path}"
  if category == run_lib.ALL_CATEGORIES:
    raise ValueError(
        f"The category {category!r} ({source}) selects several categories. "
        "A checkpoint contains one category. Pass it with --category.")
  if config is None:
    config = default_config(category, source)
  elif config.data.category == run_lib.ALL_CATEGORIES:
    raise ValueError(
        "--config selects all categories of its data set, but a checkpoint "
        "contains one. Select it after the colon of --config, for example "
        f"--config=configs/mvtec.py:{category}.")
  elif config.data.category != category:
    raise ValueError(
        f"The category is {category!r} ({source}), but --config selects "
        f"{config.data.category!r}. Pass --category="
        f"{config.data.category}, or select {category!r} after the colon "
        f"of --config, for example --config=configs/mvtec.py:{category}.")
  input_pipeline.get_builder(config.data)  # Validates the category name.
  run_lib.validate_config(config)
  return category, config


def _prepared_total_steps(config) -> int | None:
  """Returns training's total steps if the data set is prepared, else None."""
  builder = input_pipeline.get_builder(config.data)
  # is_prepared() logs a warning about a missing dataset_info.json when the
  # folder does not exist, which is the usual case here and no problem.
  if not builder.data_path.exists() or not builder.is_prepared():
    return None
  splits = builder.info.splits
  if "train" not in splits:
    return None
  num_train = splits["train"].num_examples
  steps_per_epoch = math.ceil(num_train / config.training.batch_size)
  return config.training.num_epochs * steps_per_epoch


def _check_params_fit_model(params, config) -> None:
  """Raises RuntimeError if params differ from model.UNet's in any leaf.

  A mismatch means that `parameter_layout` no longer follows `model.UNet`, a
  bug here, not in the user's file.
  """
  model = model_lib.create_model(config.model, config.sde.sigma_max)
  size = config.data.image_size
  expected = jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)),
      jnp.ones((1,)))["params"]
  expected_shapes = {
      jax.tree_util.keystr(path): tuple(leaf.shape)
      for path, leaf in jax.tree_util.tree_leaves_with_path(expected)}
  actual_shapes = {
      jax.tree_util.keystr(path): tuple(np.shape(leaf))
      for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  if actual_shapes != expected_shapes:
    differing = sorted(
        path for path in set(expected_shapes) | set(actual_shapes)
        if expected_shapes.get(path) != actual_shapes.get(path))
    raise RuntimeError(
        "convert_torch.parameter_layout does not match model.UNet at "
        f"{', '.join(differing[:5])}: update parameter_layout to the model's "
        "param names and shapes.")


def _check_no_checkpoint(checkpoint_dir: str) -> None:
  if os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
    raise ValueError(
        f"{checkpoint_dir} is a file, where the checkpoint folder should go. "
        "Pass another --workdir, or move that file away.")
  if os.path.isdir(checkpoint_dir) and os.listdir(checkpoint_dir):
    raise ValueError(
        f"{checkpoint_dir} already contains checkpoints, which are kept. "
        "Pass another --workdir, or move that folder away to replace them.")


def convert(checkpoint_path: str, workdir: str | None = None, config=None,
            category: str | None = None,
            state_dict_key: str | None = None) -> Conversion:
  """Converts a .pth state_dict into <workdir>/<category> for run.py.

  Everything is read and checked before anything is written: the file, the
  category and config (`resolve_config`), the keys and shapes, and that no
  checkpoint exists in <workdir>/<category>/checkpoints.

  Args:
    checkpoint_path: the .pth file of the authors' release.
    workdir: the run.py workdir to write to; None for
      workdirs/<config.data.name>, run.py's default.
    config: the config of the category; None for configs/mvtec.py's.
    category: the category; None for the stem of checkpoint_path.
    state_dict_key: the key of the state_dict in a wrapping dict.

  Returns:
    What was written where, as a `Conversion`.

  Raises:
    ImportError: if PyTorch is not installed.
    ValueError: for every invalid input, naming it and the fix.
  """
  category, config = resolve_config(checkpoint_path, category, config)
  if workdir is None:
    workdir = os.path.join("workdirs", config.data.name)
  category_dir = os.path.join(workdir, category)
  checkpoint_dir = os.path.join(category_dir, "checkpoints")
  _check_no_checkpoint(checkpoint_dir)

  state_dict = load_state_dict(checkpoint_path, state_dict_key)
  params = convert_state_dict(state_dict, config.model, checkpoint_path)
  _check_params_fit_model(params, config)
  logging.info("Converted %s parameters of %s: widths %s, embed_dim %d.",
               f"{model_lib.count_params(params):,}", checkpoint_path,
               tuple(config.model.widths), config.model.embed_dim)
  total_steps = _prepared_total_steps(config)
  step = total_steps or 1

  optimizer = train_lib.create_optimizer(config.training, 1)
  state = train_lib.TrainState(
      step=jnp.asarray(step, jnp.int32),
      params=params,
      ema_params=params,
      opt_state=optimizer.init(params))
  # Training splits the seed's key the same way, so a later --mode=train run
  # on this workdir draws the noise that a run trained here would draw.
  _, train_rng = jax.random.split(jax.random.key(config.seed))

  os.makedirs(category_dir, exist_ok=True)
  train_lib.write_json_atomically(
      os.path.join(category_dir, "config.json"), config.to_dict())
  checkpointer = checkpoint.Checkpointer(
      checkpoint_dir, config.training.max_checkpoints)
  try:
    checkpoint_path_written = checkpointer.save(state, train_rng)
  finally:
    checkpointer.close()
  return Conversion(
      category=category, workdir=workdir, category_dir=category_dir,
      checkpoint_path=checkpoint_path_written, step=step, config=config,
      data_prepared=total_steps is not None)


def next_commands(conversion: Conversion, config_spec: str,
                  overrides: Mapping[str, object]) -> list[str]:
  """Returns the run.py commands that evaluate, then predict, with a workdir.

  config_spec is the --config value ("configs/mvtec.py:bottle"), and
  overrides the --config.* fields given ({"model.widths": (32, 64, 64)}).
  """
  evaluate = ["python", "run.py", f"--config={config_spec}"]
  evaluate += [f"--config.{field}={value}"
               for field, value in overrides.items()]
  if not conversion.data_prepared and not conversion.config.data.manual_dir:
    evaluate.append("--config.data.manual_dir=<folder of the data set>")
  evaluate += [f"--workdir={conversion.workdir}", "--mode=evaluate"]
  predict = ["python", "run.py", "--mode=predict",
             f"--workdir={conversion.workdir}",
             f"--category={conversion.category}", "--images=<photos>"]
  return [shlex.join(evaluate), shlex.join(predict)]


def _define_flags():
  """Defines this tool's flags.

  Only __main__ calls it, so importing the module defines no flags that could
  clash with run.py's.
  """
  flags.DEFINE_string(
      "checkpoint", None,
      "The .pth file of the authors' PyTorch release: the EMA weights saved "
      "with torch.save(model.state_dict(), '<category>.pth').")
  flags.DEFINE_string(
      "workdir", None,
      "The run.py workdir to write <category>/config.json and "
      "<category>/checkpoints/ to. Default: workdirs/<data set name>, as "
      "run.py.")
  flags.DEFINE_string(
      "category", None,
      "The category of the weights. Default: the file name without its "
      "extension, such as bottle for bottle.pth.")
  config_flags.DEFINE_config_file(
      "config", None,
      "Config file and category, as run.py takes it. Default: "
      f"{DEFAULT_CONFIG_FILE}:<category> for an MVTec AD category. Required "
      "for any other category. Fields are overridden with --config.a.b=value.",
      lock_config=True)
  flags.DEFINE_string(
      "state_dict_key", None,
      "The key of the state_dict when the file contains a dict that wraps "
      f"it. Default: the one of {', '.join(WRAPPER_KEYS)} that is present.")
  flags.mark_flag_as_required("checkpoint")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  cli.setup_logging()
  flag_values = flags.FLAGS
  config = flag_values.config
  checkpoint_path = os.path.expanduser(flag_values.checkpoint)
  workdir = flag_values.workdir and os.path.expanduser(flag_values.workdir)
  try:
    conversion = convert(checkpoint_path, workdir, config,
                         flag_values.category, flag_values.state_dict_key)
  except (ValueError, OSError, ImportError) as error:
    cli.exit_with_error(error)

  if config is None:
    config_spec = f"{DEFAULT_CONFIG_FILE}:{conversion.category}"
    overrides = {}
  else:
    config_spec = config_flags.get_config_filename(flag_values["config"])
    overrides = config_flags.get_override_values(flag_values["config"])
  logging.info("Wrote the converted weights of %s as the checkpoint of step "
               "%d to %s.", conversion.category, conversion.step,
               conversion.checkpoint_path)
  if not conversion.data_prepared:
    logging.info(
        "The data set is not prepared, so the number of training steps is "
        "unknown and the checkpoint is stored at step 1. --mode=train or "
        "train_and_evaluate on this workdir would train these weights for "
        "the config's whole schedule. --mode=evaluate uses them as they are.")
  commands = next_commands(conversion, config_spec, overrides)
  logging.info("Next, evaluate on the test split (this also chooses the "
               "decision threshold that predict needs):\n  %s\nThen score "
               "new photos:\n  %s", commands[0], commands[1])


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
