"""Runs training and evaluation for one or all categories of a data set.

Workdir layout::

  <workdir>/metrics.json           {"<category>": {"image_auroc": ..., ...}}
  <workdir>/results.md             the same figures as a table, with a mean row
  <workdir>/<category>/config.json the config the category was trained with
  <workdir>/<category>/checkpoints/<step>/   Orbax checkpoints
  <workdir>/<category>/train_stats.json      wall time and images/s
  <workdir>/<category>/panels/*.png          input | ground truth | heat map
"""

import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from sprs_jax import checkpoint
from sprs_jax import evaluate as evaluate_lib
from sprs_jax import input_pipeline
from sprs_jax import model as model_lib
from sprs_jax import train as train_lib

MODES = ("train", "evaluate", "train_and_evaluate")
ALL_CATEGORIES = "all"
# Config fields that fix the shapes in a checkpoint; a workdir trained with
# other values cannot be resumed or evaluated with these.
_SHAPE_FIELDS = ("model.widths", "model.num_groups", "model.embed_dim")

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
  """Raises if category_dir holds a model of other shapes than config."""
  path = os.path.join(category_dir, "config.json")
  if not os.path.exists(path):
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
        f"{category_dir} holds a model trained with other shapes "
        f"({'; '.join(mismatches)}). Use another --workdir, or set these "
        "fields back to the workdir's values.")


def _write_json_atomically(path: str, payload) -> None:
  temporary = path + ".tmp"
  with open(temporary, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(temporary, path)


def _restore_for_evaluation(config, category_dir: str):
  """Returns the EMA params of the latest checkpoint in category_dir."""
  directory = os.path.join(category_dir, "checkpoints")
  checkpointer = checkpoint.Checkpointer(directory)
  try:
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(
          f"No checkpoint in {directory}. Train first with "
          "--mode=train_and_evaluate (or --mode=train) and the same --workdir.")
    model = model_lib.create_model(config.model, config.sde.sigma_max)
    optimizer = train_lib.create_optimizer(config.training, 1)
    rng = jax.random.key(config.seed)
    template = jax.eval_shape(
        lambda: train_lib.create_train_state(
            rng, model, optimizer, config.data.image_size))
    state, _ = checkpointer.restore(template, rng)
  finally:
    checkpointer.close()
  return state.ema_params


def run_category(config, workdir: str, mode: str) -> dict | None:
  """Trains and/or evaluates config.data.category; returns its metrics.

  Returns None in "train" mode, which computes no metrics.
  """
  category = config.data.category
  category_dir = os.path.join(workdir, category)
  logging.info("Category %s: %s, workdir %s", category, mode, category_dir)

  # The data set is checked (and built) before anything is written.
  input_pipeline.prepare(config.data)
  _check_config_matches(config, category_dir)
  os.makedirs(category_dir, exist_ok=True)
  _write_json_atomically(os.path.join(category_dir, "config.json"),
                         config.to_dict())

  params = None
  if mode in ("train", "train_and_evaluate"):
    train_loader = input_pipeline.TrainLoader(
        input_pipeline.load_split(config.data, "train"),
        image_size=config.data.image_size,
        global_batch_size=config.training.batch_size,
        seed=config.seed)
    logging.info("Loaded %d training images of %s.", train_loader.num_examples,
                 category)
    state = train_lib.train(config, category_dir, train_loader)
    params = state.ema_params
  if mode == "train":
    return None
  if params is None:
    params = _restore_for_evaluation(config, category_dir)

  results = evaluate_lib.evaluate(
      config, category_dir, params,
      input_pipeline.load_split(config.data, "test"))
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
  rewritten from it. Returns the metrics of the categories run now.
  """
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r} is not one of {', '.join(MODES)}.")
  categories = resolve_categories(config.data)
  _check_workdir(workdir)
  metrics_path = os.path.join(workdir, "metrics.json")

  results = {}
  for category in categories:
    category_config = ml_collections.ConfigDict(config.to_dict())
    category_config.data.category = category
    category_results = run_category(category_config, workdir, mode)
    if category_results is None:
      continue
    results[category] = category_results

    all_metrics = {}
    if os.path.exists(metrics_path):
      with open(metrics_path) as f:
        all_metrics = json.load(f)
    all_metrics[category] = category_results
    _write_json_atomically(metrics_path, all_metrics)
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(f"# Results in {os.path.abspath(workdir)}\n\n")
      f.write(format_results_table(all_metrics))

  if results:
    table = format_results_table(results, categories=list(results))
    print(table)
    logging.info("Wrote %s and %s", metrics_path,
                 os.path.join(workdir, "results.md"))
  return results
