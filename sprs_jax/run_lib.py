"""Runs training and evaluation for one or all categories of a data set.

Workdir layout::

  <workdir>/metrics.json           {"<category>": {"image_auroc": ..., ...}}
  <workdir>/results.md             the same figures as a table, with a mean row
  <workdir>/<category>/config.json the config the category was trained with
  <workdir>/<category>/checkpoints/<step>/   Orbax checkpoints
  <workdir>/<category>/train_stats.json      wall time and images/s
  <workdir>/<category>/panels/*.png          input | ground truth | heat map
  <workdir>/<category>/threshold.json        decision threshold (evaluate)
  <workdir>/<category>/predictions/          default output of the predict mode
"""

import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from sprs_jax import checkpoint
from sprs_jax import distributed
from sprs_jax import evaluate as evaluate_lib
from sprs_jax import faults
from sprs_jax import input_pipeline
from sprs_jax import model as model_lib
from sprs_jax import predict as predict_lib
from sprs_jax import threshold as threshold_lib
from sprs_jax import train as train_lib

# Modes that `run` carries out with a config. The predict mode (`predict`)
# reads the config that the workdir stores.
CONFIG_MODES = ("train", "evaluate", "train_and_evaluate")
PREDICT_MODE = "predict"
MODES = CONFIG_MODES + (PREDICT_MODE,)
PREDICTIONS_DIR = "predictions"
ALL_CATEGORIES = "all"
# Config fields that fix the shapes in a checkpoint or the function the
# params compute. A workdir trained with other values cannot be resumed or
# evaluated with these.
_SHAPE_FIELDS = ("model.widths", "model.num_groups", "model.embed_dim",
                 "sde.sigma_max", "data.image_size")

METRIC_COLUMNS = (
    ("image_auroc", "Image AUROC"),
    ("pixel_auroc", "Pixel AUROC"),
    ("aupro", "AUPRO"),
    ("f1_max", "F1-max"),
)


def resolve_categories(data_config) -> list[str]:
  """Returns [category], or every category of the builder for "all"."""
  if data_config.category != ALL_CATEGORIES:
    input_pipeline.get_builder(data_config)  # Validates name and category.
    return [data_config.category]
  builder_class = input_pipeline.import_builder_class(data_config.name)
  return [config.name for config in builder_class.BUILDER_CONFIGS]


def _decoder_mid_widths(widths) -> list[int]:
  """Returns the channels of each decoder level's first conv (see model.UNet)."""
  mids, channels = [], widths[-1]
  for level in range(1, len(widths)):
    mids.append((channels + widths[-1 - level]) // 2)
    channels = widths[max(len(widths) - 2 - level, 0)]
  return mids


def _is_number(value, types) -> bool:
  return isinstance(value, types) and not isinstance(value, bool)


def validate_config(config) -> None:
  """Raises ValueError naming the first invalid field, before any work starts."""
  problems = []

  def require(condition, message):
    if not condition:
      problems.append(message)

  widths = tuple(config.model.widths)
  if not all(_is_number(width, int) and width >= 1 for width in widths):
    raise ValueError(
        f"Invalid config:\n  model.widths={widths} must be positive "
        "integers, for example (16, 32, 64, 128, 128).")
  groups = config.model.num_groups
  require(len(widths) >= 1, "model.widths must name at least one level.")
  require(groups >= 1, f"model.num_groups={groups} must be >= 1.")
  if widths and groups >= 1:
    for width in list(widths) + _decoder_mid_widths(widths):
      if width % groups:
        problems.append(
            f"model.widths={widths} gives a layer of {width} channels, which "
            f"model.num_groups={groups} does not divide. Use widths whose "
            "levels and neighbouring pairs' means are multiples of num_groups.")
        break
  for field in ("data.image_size", "training.num_epochs",
                "training.batch_size", "training.log_every_steps",
                "training.checkpoint_every_steps", "training.max_checkpoints",
                "eval.num_draws", "eval.batch_size", "eval.heatmap_size",
                "eval.filter_size"):
    value = _lookup(config, field)
    require(isinstance(value, int) and value >= 1,
            f"{field}={value!r} must be an integer >= 1.")
  t_min, t_max = config.training.t_min, config.training.t_max
  require(0.0 < t_min <= t_max <= 1.0,
          f"training.t_min={t_min} and training.t_max={t_max} must satisfy "
          "0 < t_min <= t_max <= 1.")
  levels = tuple(config.eval.noise_levels)
  require(levels and all(_is_number(t, (int, float)) and 0.0 < t <= 1.0
                         for t in levels),
          f"eval.noise_levels={levels} must be a non-empty tuple of diffusion "
          "times in (0, 1], for example (0.001,).")
  require(config.sde.sigma_max > 1.0,
          f"sde.sigma_max={config.sde.sigma_max} must be > 1.")
  require(config.model.dtype in ("float32", "bfloat16"),
          f"model.dtype={config.model.dtype!r} must be 'float32' or "
          "'bfloat16'.")
  require(config.training.lr_schedule in ("piecewise", "cosine"),
          f"training.lr_schedule={config.training.lr_schedule!r} must be "
          "'piecewise' or 'cosine'.")
  require(config.training.learning_rate > 0,
          f"training.learning_rate={config.training.learning_rate!r} must be "
          "> 0.")
  require(config.training.weight_decay >= 0,
          f"training.weight_decay={config.training.weight_decay!r} must be "
          ">= 0.")
  require(config.training.warmup_steps >= 0,
          f"training.warmup_steps={config.training.warmup_steps} must be "
          ">= 0.")
  require(0.0 <= config.training.ema_decay < 1.0,
          f"training.ema_decay={config.training.ema_decay} must be in "
          "[0, 1).")
  devices = jax.local_device_count()
  if isinstance(config.eval.batch_size, int) and config.eval.batch_size >= 1:
    require(config.eval.batch_size % devices == 0,
            f"eval.batch_size={config.eval.batch_size} must be a multiple of "
            f"the {devices} local devices.")
  if isinstance(config.training.batch_size, int) and config.training.batch_size >= 1:
    require(config.training.batch_size % jax.device_count() == 0,
            f"training.batch_size={config.training.batch_size} must be a "
            f"multiple of the {jax.device_count()} devices.")
  if problems:
    raise ValueError("Invalid config:\n  " + "\n  ".join(problems))


def _missing_folders(path: str) -> list[str]:
  """Returns path and its ancestors that do not exist yet, deepest first."""
  missing = []
  path = os.path.abspath(path)
  while not os.path.exists(path):
    missing.append(path)
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return missing


def _check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:
    raise ValueError(
        f"Cannot create the workdir {workdir!r}: {error}. Pass a writable "
        "folder with --workdir.") from error
  if not os.access(workdir, os.W_OK):
    raise ValueError(
        f"The workdir {workdir!r} is not writable. Pass a writable folder "
        "with --workdir.")


def _lookup(config, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value[part]
  return list(value) if isinstance(value, (tuple, list)) else value


def _check_config_matches(config, category_dir: str) -> None:
  """Raises if category_dir contains a checkpoint of other shapes than config."""
  path = os.path.join(category_dir, "config.json")
  if not os.path.exists(path) or not _has_checkpoint(category_dir):
    return
  with open(path) as f:
    saved = json.load(f)
  mismatches = []
  for field in _SHAPE_FIELDS:
    saved_value = _lookup(saved, field)
    value = _lookup(config, field)
    if saved_value != value:
      mismatches.append(f"{field}: workdir has {saved_value}, config has {value}")
  if mismatches:
    raise ValueError(
        f"{category_dir} contains a model trained with other settings "
        f"({'; '.join(mismatches)}). Use another --workdir, or set these "
        "fields back to the workdir's values.")


def _checkpoint_dir(category_dir: str) -> str:
  return os.path.join(category_dir, "checkpoints")


def _latest_step(category_dir: str) -> int:
  """Returns the step of the latest checkpoint in category_dir, or 0."""
  directory = _checkpoint_dir(category_dir)
  if not os.path.isdir(directory):
    return 0
  return max((int(name) for name in os.listdir(directory) if name.isdigit()),
             default=0)


def _has_checkpoint(category_dir: str) -> bool:
  return _latest_step(category_dir) > 0


def _require_checkpoint(category_dir: str) -> None:
  """Raises FileNotFoundError unless category_dir has a finished checkpoint."""
  directory = _checkpoint_dir(category_dir)
  if not _has_checkpoint(category_dir):
    raise FileNotFoundError(
        f"No checkpoint in {directory}. Train first with "
        "--mode=train_and_evaluate (or --mode=train) and the same --workdir.")


def restore_for_evaluation(config, category_dir: str):
  """Returns (EMA params, step) of the latest checkpoint in category_dir.

  Raises:
    FileNotFoundError: if category_dir has no checkpoint.
  """
  _require_checkpoint(category_dir)
  checkpointer = checkpoint.Checkpointer(_checkpoint_dir(category_dir))
  try:
    model = model_lib.create_model(config.model, config.sde.sigma_max)
    optimizer = train_lib.create_optimizer(config.training, 1)
    rng = jax.random.key(config.seed)
    template = jax.eval_shape(
        lambda: train_lib.create_train_state(
            rng, model, optimizer, config.data.image_size))
    state, _ = checkpointer.restore(template, rng)
  finally:
    checkpointer.close()
  _warn_if_unfinished(category_dir, int(state.step))
  return state.ema_params, int(state.step)


def _warn_if_unfinished(category_dir: str, step: int) -> None:
  """Logs a warning if train_stats.json shows that training stopped early."""
  stats_path = os.path.join(category_dir, "train_stats.json")
  if not os.path.exists(stats_path):
    return
  with open(stats_path) as f:
    total_steps = json.load(f).get("total_steps")
  if total_steps is not None and step < total_steps:
    logging.warning(
        "Evaluating the checkpoint at step %d of %d: training of %s did not "
        "finish. Rerun with --mode=train_and_evaluate and the same --workdir "
        "to finish it first.", step, total_steps, category_dir)


def run_category(config, workdir: str, mode: str) -> dict | None:
  """Trains and/or evaluates config.data.category; returns its metrics.

  Returns None in "train" mode, which computes no metrics.
  """
  category = config.data.category
  category_dir = os.path.join(workdir, category)
  logging.info("Category %s: %s, workdir %s", category, mode, category_dir)

  # The data set and the workdir are checked before anything is written.
  input_pipeline.prepare(config.data)
  _check_config_matches(config, category_dir)
  if mode == "evaluate":
    _require_checkpoint(category_dir)

  params = None
  if mode in ("train", "train_and_evaluate"):
    train_loader = input_pipeline.TrainLoader(
        input_pipeline.load_split(config.data, "train"),
        image_size=config.data.image_size,
        global_batch_size=config.training.batch_size,
        seed=config.seed)
    logging.info("The training split of %s has %d images.", category,
                 train_loader.num_examples)
    total_steps = config.training.num_epochs * train_loader.steps_per_epoch
    config_path = os.path.join(category_dir, "config.json")
    # config.json describes the latest training, so a run that trains
    # nothing (already finished) leaves it as it is.
    if distributed.is_primary() and (
        _latest_step(category_dir) < total_steps
        or not os.path.exists(config_path)):
      os.makedirs(category_dir, exist_ok=True)
      train_lib.write_json_atomically(config_path, config.to_dict())
    state = train_lib.train(config, category_dir, train_loader)
    params, step = state.ema_params, int(state.step)
  if mode == "train":
    return None
  if params is None:
    params, step = restore_for_evaluation(config, category_dir)

  results = evaluate_lib.evaluate(
      config, category_dir, params,
      input_pipeline.load_split(config.data, "test"), step)
  stats_path = os.path.join(category_dir, "train_stats.json")
  if os.path.exists(stats_path):
    with open(stats_path) as f:
      stats = json.load(f)
    results["train_seconds"] = float(stats["train_seconds"])
    results["train_images_per_second"] = float(
        stats["train_images_per_second"])
  logging.info(
      "Category %s: image AUROC %.4f, pixel AUROC %.4f, AUPRO %.4f, "
      "F1-max %.4f", category, results["image_auroc"], results["pixel_auroc"],
      results["aupro"], results["f1_max"])
  return results


def format_results_table(all_metrics: dict, categories=None) -> str:
  """Returns a Markdown table of metrics with a mean row for several rows."""
  categories = sorted(all_metrics) if categories is None else categories
  header = ["Category"] + [title for _, title in METRIC_COLUMNS] + [
      "Train time (s)"]
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
  for category in categories:
    entry = all_metrics[category]
    cells = [category] + [f"{entry[key]:.4f}" for key, _ in METRIC_COLUMNS]
    cells.append(f"{entry.get('train_seconds', float('nan')):.0f}")
    lines.append("| " + " | ".join(cells) + " |")
  if len(categories) > 1:
    means = [np.mean([all_metrics[c][key] for c in categories])
             for key, _ in METRIC_COLUMNS]
    total = sum(all_metrics[c].get("train_seconds", 0.0) for c in categories)
    lines.append("| **mean** | " + " | ".join(f"**{m:.4f}**" for m in means)
                 + f" | {total:.0f} (total) |")
  return "\n".join(lines) + "\n"


def run(config, workdir: str, mode: str) -> dict:
  """Runs ``mode`` for the configured category or all of them.

  Results are merged into <workdir>/metrics.json category by category, so
  figures of other categories already there are kept, and results.md is
  rewritten from it. Returns the metrics of the categories run now. In a
  multi-process run every process returns them and process 0 alone writes.
  """
  if mode not in CONFIG_MODES:
    raise ValueError(
        f"--mode={mode!r} is not one of {', '.join(CONFIG_MODES)}.")
  validate_config(config)
  categories = resolve_categories(config.data)
  if mode == "evaluate":
    for category in categories:
      _require_checkpoint(os.path.join(workdir, category))
  new_folders = _missing_folders(workdir)
  _check_workdir(workdir)
  metrics_path = os.path.join(workdir, "metrics.json")
  try:
    _read_metrics(metrics_path)
    # Every category's data is checked (and built) before any training
    # starts, so a broken folder stops an "all" run at once, not hours in.
    # Process 0 builds missing data sets before the other processes look.
    distributed.primary_first(
        lambda: _prepare_categories(config.data, categories),
        "building the data sets")
  except Exception:
    # Folders made by this call for the workdir and still empty go again.
    for folder in new_folders:
      try:
        if os.path.isdir(folder) and not os.listdir(folder):
          os.rmdir(folder)
      except OSError:
        # Another process of a multi-process run removed or filled it first.
        pass
    raise

  results = {}
  for category in categories:
    category_config = ml_collections.ConfigDict(config.to_dict())
    category_config.data.category = category
    category_results = run_category(category_config, workdir, mode)
    if category_results is None:
      continue
    results[category] = category_results
    if distributed.is_primary():
      _write_metrics(workdir, category, category_results)

  if results and distributed.is_primary():
    table = format_results_table(results, categories=list(results))
    print(table)
    logging.info("Wrote %s and %s", metrics_path,
                 os.path.join(workdir, "results.md"))
  return results


def _prepare_categories(data_config, categories) -> None:
  """Builds the data set of every category that has no prepared copy."""
  for category in categories:
    category_data = ml_collections.ConfigDict(data_config.to_dict())
    category_data.category = category
    input_pipeline.prepare(category_data)


def _write_metrics(workdir: str, category: str, category_results: dict):
  """Merges one category's metrics into metrics.json and rewrites results.md."""
  metrics_path = os.path.join(workdir, "metrics.json")
  all_metrics = _read_metrics(metrics_path)
  all_metrics[category] = category_results
  train_lib.write_json_atomically(metrics_path, all_metrics)
  results_path = os.path.join(workdir, "results.md")
  with open(results_path + ".tmp", "w") as f:
    f.write(f"# Results in {os.path.abspath(workdir)}\n\n")
    f.write(format_results_table(all_metrics))
  os.replace(results_path + ".tmp", results_path)


def _load_json(path: str, description: str, fix: str):
  """Returns the JSON content of path, or raises ValueError naming it.

  The message reads "Failed to read <description><path>: <error>. <fix>".
  """
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as error:
    raise ValueError(
        f"Failed to read {description}{path}: {error}. {fix}") from error


def _read_metrics(path: str) -> dict:
  """Returns the metrics.json at path ({} if missing).

  Raises:
    ValueError: naming the file if it is not a JSON object.
  """
  if not os.path.exists(path):
    return {}
  metrics = _load_json(
      path, "", "Repair or move away this file, whose results are merged "
      "with the new ones.")
  if not isinstance(metrics, dict):
    raise ValueError(
        f"{path} contains a {type(metrics).__name__}, expected a JSON object "
        "{category: metrics}. Repair or move away this file.")
  for category, entry in metrics.items():
    missing = [key for key, _ in METRIC_COLUMNS
               if not isinstance(entry, dict)
               or not _is_number(entry.get(key), (int, float))]
    if missing:
      raise ValueError(
          f"{path}: the entry of {category!r} lacks the numbers "
          f"{', '.join(missing)}. Repair or move away this file.")
  return metrics


def trained_categories(workdir: str) -> list[str]:
  """Returns the sorted categories of workdir that have a config.json."""
  if not os.path.isdir(workdir):
    return []
  return sorted(
      name for name in os.listdir(workdir)
      if os.path.isfile(os.path.join(workdir, name, "config.json")))


def select_category(workdir: str, category: str | None) -> str:
  """Returns `category`, or the workdir's only trained category if None.

  Raises:
    ValueError: if the workdir has no trained category, if `category` is not
      one of them, or if it is None and there are several, listing them.
  """
  if not os.path.isdir(workdir):
    raise ValueError(
        f"The workdir {workdir!r} does not exist or is not a folder. Pass the "
        "--workdir of a trained and evaluated run.")
  categories = trained_categories(workdir)
  if not categories and os.path.isfile(os.path.join(workdir, "config.json")):
    parent = os.path.dirname(os.path.abspath(workdir))
    raise ValueError(
        f"{workdir!r} is the folder of one category, not a workdir. Pass its "
        f"parent: --workdir={parent} --category="
        f"{os.path.basename(os.path.abspath(workdir))}.")
  if not categories:
    raise ValueError(
        f"The workdir {workdir!r} contains no trained category (no "
        "<category>/config.json). Train first with --mode=train_and_evaluate "
        "and this --workdir.")
  if category is None:
    if len(categories) > 1:
      raise ValueError(
          f"The workdir {workdir!r} contains {len(categories)} categories: "
          f"{', '.join(categories)}. Select one with --category.")
    return categories[0]
  if category not in categories:
    raise ValueError(
        f"Category {category!r} is not trained in the workdir {workdir!r}. "
        f"Trained categories: {', '.join(categories)}.")
  return category


def load_saved_config(category_dir: str) -> ml_collections.ConfigDict:
  """Returns the config stored in <category_dir>/config.json."""
  path = os.path.join(category_dir, "config.json")
  saved = _load_json(
      path, "the training config ",
      "Train the category again with --mode=train_and_evaluate.")
  return ml_collections.ConfigDict(saved)


def apply_threshold_scoring(config, record: dict, category_dir: str) -> None:
  """Sets the scoring fields of config to those the threshold was chosen with.

  Photos are then scored with the same settings as the test split in
  evaluation, so their scores are comparable with the threshold.

  Raises:
    ValueError: if the record's scoring fields do not fit the config.
  """
  try:
    config.update_from_flattened_dict(record["scoring"])
  except (KeyError, TypeError, ValueError) as error:
    raise ValueError(
        f"The scoring fields of {os.path.join(category_dir, 'threshold.json')} "
        f"do not fit the config ({error}). Run --mode=evaluate with the "
        "category's --config and this --workdir to write them again.") from error


def check_threshold_params(record: dict, params, step: int,
                           category_dir: str) -> None:
  """Raises ValueError unless the threshold was chosen for these params.

  Both the checkpoint step and the params fingerprint must match the record.
  """
  if (step != record["checkpoint_step"] or threshold_lib.params_fingerprint(
      params) != record["params_fingerprint"]):
    raise ValueError(
        f"The threshold in {category_dir} was chosen for other params (the "
        f"checkpoint at step {record['checkpoint_step']}, fingerprint "
        f"{record['params_fingerprint']}) than the latest checkpoint (step "
        f"{step}). Run --mode=evaluate with the category's --config and this "
        "--workdir to choose it again.")


def _check_output_dir(output_dir: str) -> None:
  """Creates output_dir/heatmaps and checks that files can be written there."""
  try:
    os.makedirs(os.path.join(output_dir, predict_lib.HEATMAP_DIR),
                exist_ok=True)
    faults.write_probe(output_dir)
  except OSError as error:
    raise ValueError(
        f"Cannot write to the output folder {output_dir!r}: {error}. Pass a "
        "writable folder with --output.") from error


def predict(workdir: str, images: str, output_dir: str | None = None,
            category: str | None = None) -> predict_lib.Summary:
  """Scores the photos that `images` names with a trained category.

  Uses the config, the latest checkpoint's EMA params and the threshold
  stored in <workdir>/<category>. Every input is checked first: the
  category, the threshold, the checkpoint, the output folder and every photo.
  Any problem raises before anything is scored or written.

  Args:
    workdir: a workdir trained and evaluated by `run`.
    images: an image file, a folder or a glob pattern (`predict.find_images`).
    output_dir: folder for predictions.csv and heatmaps/. Default:
      <workdir>/<category>/predictions.
    category: required when the workdir contains several categories.

  Returns:
    The summary of what was scored and written, which is also printed.

  Raises:
    ValueError: for each invalid input, with the fix, including an existing
      predictions.csv in the output folder, which is never replaced.
  """
  category = select_category(workdir, category)
  category_dir = os.path.join(workdir, category)
  config = load_saved_config(category_dir)
  record = threshold_lib.load(category_dir)
  apply_threshold_scoring(config, record, category_dir)
  _require_checkpoint(category_dir)

  if output_dir is None:
    output_dir = os.path.join(category_dir, PREDICTIONS_DIR)
  if not output_dir:
    raise ValueError(
        "--output is empty. Pass a folder, or leave --output out to write to "
        f"{os.path.join(category_dir, PREDICTIONS_DIR)}.")
  csv_path = os.path.join(output_dir, predict_lib.CSV_NAME)
  if os.path.exists(csv_path):
    raise ValueError(
        f"{csv_path} already exists and is kept. Pass another folder with "
        "--output, or move that folder away.")
  heatmap_dir = os.path.join(output_dir, predict_lib.HEATMAP_DIR)
  if os.path.isdir(heatmap_dir) and os.listdir(heatmap_dir):
    raise ValueError(
        f"{heatmap_dir} already contains files of an earlier run, which are "
        "kept. Pass another folder with --output, or move that folder away.")
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise ValueError(
        f"The output {output_dir!r} is a file. Pass a folder with --output.")

  paths = predict_lib.find_images(images)
  predict_lib.check_images(paths)
  params, step = restore_for_evaluation(config, category_dir)
  check_threshold_params(record, params, step, category_dir)
  _check_output_dir(output_dir)
  logging.info("Scoring %d images with category %s of %s.", len(paths),
               category, workdir)
  summary = predict_lib.write_predictions(
      config, params, paths, record, output_dir)
  print(summary.describe())
  return summary
